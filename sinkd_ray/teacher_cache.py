"""Teacher logits computed once and reused by every run and trial that asks for the same ones.

The teacher is frozen, so its logits on a split depend only on (teacher weights, task, split, max length,
prompt template, logit space, quantization, precision). That tuple is the cache key; its digest names a
safetensors file under the cache directory. A matching file is loaded, never recomputed; any change in the
key gives a new file. Writes are atomic (temp file + rename) so concurrent trials never read half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sinkd_ray.data import load_split, make_loader, tokenize_split, GlobalBatchSampler
from sinkd_ray.models import (LogitModel, detect_family, load_config, load_teacher, model_fingerprint,
                              resolve_logit_space)
from sinkd_ray.tasks import Task


@dataclass(frozen=True)
class TeacherLogitsKey:
    """Everything the cached logits depend on."""

    teacher_fingerprint: str
    task: str
    split: str
    max_length: int
    template: str
    logit_space: str
    quantization: str
    precision: str  # "fp32" or "bf16": the autocast dtype of the teacher forward

    def digest(self) -> str:
        payload = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:20]

    def filename(self) -> str:
        return f"{self.task}-{self.split}-{self.digest()}.safetensors"


def teacher_logits_key(teacher: str, task: Task, split: str, *, max_length: int, logit_space: str,
                       quantization: str | None, bf16: bool, prompt: bool) -> TeacherLogitsKey:
    return TeacherLogitsKey(
        teacher_fingerprint=model_fingerprint(teacher),
        task=task.name,
        split=split,
        max_length=max_length,
        template=task.template if prompt else "",
        logit_space=logit_space,
        quantization=quantization or "none",
        precision="bf16" if bf16 else "fp32",
    )


@torch.no_grad()
def compute_logits(teacher: LogitModel, tokenized, *, batch_size: int, bf16: bool) -> torch.Tensor:
    """Teacher logits (n × d, float32) for a tokenized split, rows in ``idx`` order."""
    n = len(tokenized)
    sampler = GlobalBatchSampler(n, batch_size, shuffle=False, drop_last=False)
    loader = make_loader(tokenized, teacher.tokenizer, sampler)
    out: torch.Tensor | None = None
    for batch in loader:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = teacher(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")
                                if k in batch}).float()
        if out is None:
            out = torch.empty(n, logits.shape[-1], dtype=torch.float32)
        out[batch["idx"]] = logits
    assert out is not None, "empty split"
    return out


def cached_teacher_logits(teacher: str, task: Task, split: str, *, cache_dir: str | Path,
                          data_dir: str | None = None, max_length: int = 128, logit_space: str = "label",
                          quantization: str | None = None, bf16: bool = False, batch_size: int = 64,
                          family: str | None = None) -> tuple[Path, bool]:
    """Return ``(path, computed)``: the safetensors file holding the teacher's logits for ``split``.

    ``computed`` is False when a file with the same key already existed (the logits were reused).
    The file holds one tensor ``logits`` (n × d, float32) indexed by the dataset's ``idx`` column.
    """
    # Only the config is read to build the key, so a cache hit never loads the teacher's weights.
    family = detect_family(load_config(teacher), family)
    prompt = family != "encoder"
    logit_space = resolve_logit_space(logit_space, family)
    key = teacher_logits_key(teacher, task, split, max_length=max_length, logit_space=logit_space,
                             quantization=quantization, bf16=bf16, prompt=prompt)
    path = Path(cache_dir) / key.filename()
    if path.exists():
        return path, False

    teacher_model = load_teacher(teacher, task, family=family, logit_space=logit_space,
                                 quantization=quantization)
    dataset = load_split(task, split, data_dir)
    tokenized = tokenize_split(dataset, task, teacher_model.tokenizer, max_length, prompt=prompt)
    logits = compute_logits(teacher_model, tokenized, batch_size=batch_size, bf16=bf16)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file({"logits": logits.contiguous()}, tmp, metadata={"key": json.dumps(asdict(key))})
    os.replace(tmp, path)
    return path, True


def load_teacher_logits(path: str | Path) -> torch.Tensor:
    """The cached logits tensor (n × d, float32)."""
    return load_file(str(path))["logits"]
