"""bf16 'auto' precision: decided from the device's capability probe (mocked here), forced by --bf16 / --no-bf16."""

import pytest
import torch

from sinkd_ray import hardware
from sinkd_ray.config import TrainConfig

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "caps, native",
    [
        ({"avx512_bf16": True, "amx_bf16": True}, True),
        ({"avx512_bf16": True}, True),
        ({"amx_bf16": True}, True),
        ({"avx2": True, "avx512": True}, False),  # AVX-512 without its BF16 extension: emulated, slow
        ({}, False),
    ],
)
def test_auto_follows_the_cpu_capability_probe(monkeypatch, caps, native):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    assert hardware.resolve_bf16(None, CPU) is native
    line = hardware.describe_precision(None, CPU)
    assert line.startswith(f"precision: {'bf16 autocast' if native else 'float32'} on cpu (auto: this CPU")
    # forced either way whatever the probe says
    assert hardware.resolve_bf16(True, CPU) is True and hardware.resolve_bf16(False, CPU) is False
    assert "(--no-bf16)" in hardware.describe_precision(False, CPU)


def test_auto_on_cuda_asks_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    assert hardware.resolve_bf16(None, torch.device("cuda", 0)) is False  # only emulated: auto says no
    assert "Tesla V100 lacks bf16" in hardware.describe_precision(None, torch.device("cuda", 0))


def test_train_config_default_is_auto_and_flags_force_it():
    from sinkd_ray.train import build_parser

    assert TrainConfig().bf16 is None
    parser = build_parser()
    assert parser.parse_args(["--student", "x"]).bf16 is None
    assert parser.parse_args(["--student", "x", "--bf16"]).bf16 is True
    assert parser.parse_args(["--student", "x", "--no-bf16"]).bf16 is False
