"""Checkpoints: what every worker writes at an evaluation, how a run resumes from it, and how the best one
becomes the exported student.

    checkpoint_<n>/
      shards/rank<r>.safetensors    rank r's shards of the student's weights and AdamW moments: with FSDP2 no
                                    host ever gathers the whole model (one file when there is one worker)
      rng/rank<r>.json              rank r's python / numpy / torch CPU and (its device's) CUDA generator states
      trainer.json                  progress, scheduler and optimizer hyper-parameters (rank 0)
      online_teacher.safetensors    the online teacher's LoRA modules and their AdamW state (when used)
      student/                      config, tokenizer and sinkd metadata; no weights (`export_student` adds them)
      metrics.json, train_config.json, distill_config.json, placement.json

Nothing is unpickled on load: tensors come from safetensors, the rest from JSON, so a tampered checkpoint on
shared storage cannot run code. Checkpoints written by earlier versions (``train_state.pt`` beside a full
``student/``) still load, through ``torch.load(weights_only=True)`` with numpy's RNG-state types allowed.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sinkd_ray.errors import SinkdError

STUDENT_DIR = "student"
SHARDS_DIR = "shards"
RNG_DIR = "rng"
TRAINER_FILE = "trainer.json"
METRICS_FILE = "metrics.json"
ONLINE_FILE = "online_teacher.safetensors"
LEGACY_STATE_FILE = "train_state.pt"  # earlier versions: one pickle of optimizer / scheduler / progress / RNG


# ------------------------------------------------------------------------------------------------ RNG states
def rng_state() -> dict[str, Any]:
    """Every generator a training step draws from, as JSON-able values. CUDA: the current device's generator only
    (the one this worker trains on): a run retried where fewer GPUs are visible restores it by no other index."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(words), gauss],
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        if isinstance(cuda[0], list):  # earlier versions saved every visible device's: this worker's is at its index
            device = torch.cuda.current_device()
            cuda = cuda[device] if device < len(cuda) else cuda[0]
        torch.cuda.set_rng_state(torch.tensor(cuda, dtype=torch.uint8))  # the current device


# ------------------------------------------------------------------------------------------- sharded state
def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2), or the tensor itself; detached, on the CPU, contiguous."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.detach().to("cpu").contiguous()


def _like(shard: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """A loaded shard placed like ``reference`` (a DTensor shard of the same mesh and placement, or a tensor)."""
    if hasattr(reference, "device_mesh"):
        from torch.distributed.tensor import DTensor

        local = shard.to(reference.to_local().device, reference.dtype)
        return DTensor.from_local(
            local,
            reference.device_mesh,
            reference.placements,
            run_check=False,
            shape=reference.shape,
            stride=reference.stride(),
        )
    return shard.to(reference.device, reference.dtype)


def save_training_state(
    directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, rank: int
) -> None:
    """Rank ``rank``'s shards of the model weights and the optimizer state (collective-free: local shards)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model_state = get_model_state_dict(model)
    optim_state = get_optimizer_state_dict(model, optimizer)
    tensors = {f"model/{k}": _local(v) for k, v in model_state.items()}
    for fqn, entries in optim_state["state"].items():
        tensors.update({f"optim/{fqn}/{name}": _local(v) for name, v in entries.items()})
    (directory / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    groups = [
        {k: v for k, v in g.items() if k != "params"} | {"params": list(g["params"])}
        for g in optim_state["param_groups"]
    ]
    tensors, aliases = _without_shared(tensors)
    save_file(
        tensors,
        str(directory / SHARDS_DIR / f"rank{rank}.safetensors"),
        metadata={"param_groups": json.dumps(groups), "aliases": json.dumps(aliases)},
    )


def _without_shared(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tied weights (an LM head sharing the embedding) are one tensor under two names; safetensors stores each
    tensor once, so the second name is kept as an alias of the first."""
    seen: dict[tuple, str] = {}
    unique, aliases = {}, {}
    for name, tensor in tensors.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen and tensor.numel():
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = tensor
    return unique, aliases


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    """A rank's shard file with its aliases (tied weights) filled back in."""
    from safetensors import safe_open

    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as handle:
        aliases = json.loads((handle.metadata() or {}).get("aliases", "{}"))
    return {**tensors, **{alias: tensors[name] for alias, name in aliases.items()}}


def load_training_state(
    directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, rank: int
) -> None:
    """Put rank ``rank``'s saved shards back into the (identically sharded) model and optimizer."""
    from safetensors import safe_open
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    path = directory / SHARDS_DIR / f"rank{rank}.safetensors"
    if not path.is_file():
        raise SinkdError(f"{directory} has no shard for rank {rank} — resume with the number of workers that wrote it")
    shards = _load_shard(path)
    with safe_open(str(path), "pt") as handle:
        groups = json.loads(handle.metadata()["param_groups"])
    model_state = get_model_state_dict(model)
    set_model_state_dict(model, {k: _like(shards[f"model/{k}"], v) for k, v in model_state.items()})
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, shard in shards.items():
        if key.startswith("optim/"):
            fqn, name = key[len("optim/") :].rsplit("/", 1)
            reference = model_state[fqn]
            if name == "step":  # a scalar kept on the parameters' device (the fused kernel reads it there)
                device = (reference.to_local() if hasattr(reference, "to_local") else reference).device
                state.setdefault(fqn, {})[name] = shard.to(device)
            else:
                state.setdefault(fqn, {})[name] = _like(shard, reference)
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups})


def save_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1))


def load_json(path: Path) -> Any:
    return json.loads(path.read_text())


def is_legacy(directory: Path) -> bool:
    return (directory / LEGACY_STATE_FILE).is_file()


def load_legacy_state(directory: Path) -> dict:
    """A checkpoint of an earlier version: its pickle read with ``weights_only=True`` (tensors, containers and
    numpy's RNG-state types only — nothing else can be constructed)."""
    core = getattr(np, "_core", None) or np.core  # numpy 2 moved it; pickles name whichever wrote them
    allowed = [np.ndarray, np.dtype, np.dtypes.UInt32DType, core.multiarray._reconstruct]
    with torch.serialization.safe_globals(allowed):
        return torch.load(directory / LEGACY_STATE_FILE, weights_only=True, map_location="cpu")


# ---------------------------------------------------------------------------------------- the best student
def student_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The full student state dict of a checkpoint: its rank shards concatenated along dim 0 in rank order
    (FSDP2's ``Shard(0)`` placement, torch.chunk semantics), on the CPU."""
    files = sorted((checkpoint / SHARDS_DIR).glob("rank*.safetensors"), key=lambda p: int(p.stem[4:]))
    if not files:
        raise SinkdError(f"{checkpoint} holds no student weights — is it a sinkd_ray checkpoint?")
    shards = [{k[len("model/") :]: v for k, v in _load_shard(f).items() if k.startswith("model/")} for f in files]
    if len(shards) == 1:
        return shards[0]
    return {k: shards[0][k] if shards[0][k].dim() == 0 else torch.cat([s[k] for s in shards], dim=0) for k in shards[0]}


def export_student(checkpoint: Path, output_dir: Path) -> dict:
    """Write the checkpoint's student as a ``save_pretrained`` folder (safetensors, config, tokenizer, sinkd
    metadata) into ``output_dir`` and return the checkpoint's metrics. Refuses non-finite weights: a diverged
    student is never exported. Files already in ``output_dir`` with other names stay."""
    from sinkd_ray.models import hf_model_from_config

    output_dir.mkdir(parents=True, exist_ok=True)
    if is_legacy(checkpoint):  # earlier versions saved the full student at every checkpoint
        weights = load_file(str(checkpoint / STUDENT_DIR / "model.safetensors"))
        _refuse_non_finite(weights, checkpoint)
        shutil.copytree(checkpoint / STUDENT_DIR, output_dir, dirs_exist_ok=True)
    else:
        weights = student_weights(checkpoint)
        _refuse_non_finite(weights, checkpoint)
        hf_model = hf_model_from_config(checkpoint / STUDENT_DIR)
        missing, unexpected = hf_model.load_state_dict(weights, strict=False)
        if unexpected or [k for k in missing if k not in getattr(hf_model, "_tied_weights_keys", None) or ()]:
            raise SinkdError(
                f"{checkpoint}: the saved weights do not fit the saved config (missing {missing[:3]},"
                f" unexpected {unexpected[:3]}) — the checkpoint is damaged"
            )
        for file in (checkpoint / STUDENT_DIR).iterdir():  # tokenizer, sinkd metadata
            if file.is_file() and file.name != "config.json":
                shutil.copy2(file, output_dir / file.name)
        hf_model.save_pretrained(output_dir)
    metrics = load_json(checkpoint / METRICS_FILE)
    save_json(output_dir / "dev_metrics.json", metrics)
    return metrics


def _refuse_non_finite(weights: dict[str, torch.Tensor], where: Path) -> None:
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise SinkdError(
            f"{where}: the student's weights are not finite ({', '.join(bad[:3])}) — this run "
            "diverged; nothing is exported"
        )
