"""What the device a process runs on can do: native bf16, and the precision a run uses there.

bf16 autocast pays only where the hardware computes in bf16 natively: measured here, 1.5× faster on a CPU with
AVX-512 BF16 and AMX, 16× *slower* on an AVX2-only CPU (emulated), and on GPUs from Ampere on it is the fast
path. So the default is ``auto``: decided per device, in the process that runs the model (a CPU head and a GPU
worker can decide differently), and said in one line.
"""

from __future__ import annotations

import torch


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX (``torch.cpu.get_capabilities``)."""
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """(does ``device`` compute bf16 natively, why), the reason phrased for the one-line report."""
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported(including_emulation=False)
        name = torch.cuda.get_device_name(device)
        return supported, f"{name} {'supports' if supported else 'lacks'} bf16"
    if device.type == "cpu":
        native = cpu_has_native_bf16()
        return native, f"this CPU {'has' if native else 'lacks'} AVX-512 BF16 / AMX"
    return False, f"no bf16 probe for {device.type}"


def resolve_bf16(setting: bool | None, device: torch.device) -> bool:
    """``--bf16`` / ``--no-bf16`` (True / False) as given; None (auto) = native bf16 on ``device``."""
    return native_bf16(device)[0] if setting is None else setting


def describe_precision(setting: bool | None, device: torch.device) -> str:
    """One line for the start of a run, e.g. ``precision: bf16 autocast (auto: this CPU has AVX-512 BF16 / AMX)``."""
    use = resolve_bf16(setting, device)
    why = native_bf16(device)[1] if setting is None else ("--bf16" if setting else "--no-bf16")
    mode = "bf16 autocast" if use else "float32"
    return f"precision: {mode} on {device.type} ({'auto: ' if setting is None else ''}{why})"
