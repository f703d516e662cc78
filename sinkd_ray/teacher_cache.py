"""Teacher logits computed once and reused by every run and trial that asks for the same ones.

The teacher is frozen, so its logits on a split depend only on (teacher weights, task, split, max length,
prompt template, logit space, quantization, precision, the dtype its weights are loaded in). That tuple is the
cache key; its digest names a safetensors file under the cache directory. A matching file is loaded, never
recomputed; any change in the key gives a new file. Writes are atomic (temp file + rename) so concurrent trials
never read half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sinkd_ray.data import GlobalBatchSampler, first_examples, load_split, make_loader, token_lengths, tokenize_split
from sinkd_ray.models import (
    LogitModel,
    detect_family,
    load_config,
    load_teacher,
    model_fingerprint,
    resolve_logit_space,
    uses_prompt,
)
from sinkd_ray.progress import ProgressLine
from sinkd_ray.tasks import Task, get_task


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
    examples: int | None = None  # the split's first N examples only (--max-train-examples); None: all of it
    # the dtype the teacher's weights were loaded in, when not the precision's own (float32 for fp32, bfloat16 for
    # bf16: what --teacher-dtype auto gives); a float32 teacher under bf16 autocast gives other logits than a
    # bfloat16 one
    dtype: str | None = None

    def digest(self) -> str:
        fields = asdict(self)
        for name in (
            "examples",
            "dtype",
        ):  # left out when unset: earlier caches keep the digests they were written under
            if fields[name] is None:
                del fields[name]
        payload = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:20]

    def filename(self) -> str:
        return f"{self.task}-{self.split}-{self.digest()}.safetensors"


def teacher_logits_key(
    teacher: str,
    task: Task,
    split: str,
    *,
    max_length: int,
    logit_space: str,
    quantization: str | None,
    bf16: bool,
    prompt: bool,
    examples: int | None = None,
    dtype: str | None = None,
) -> TeacherLogitsKey:
    """``dtype``: the teacher's weights' dtype (None or the precision's own: not part of the digest)."""
    own = "bfloat16" if bf16 else "float32"
    return TeacherLogitsKey(
        teacher_fingerprint=model_fingerprint(teacher),
        task=task.key,  # a task of the user's own: its name and the digest of its files
        split=split,
        max_length=max_length,
        template=task.template if prompt else "",
        logit_space=logit_space,
        quantization=quantization or "none",
        precision="bf16" if bf16 else "fp32",
        examples=examples,
        dtype=None if dtype in (None, own) else dtype,
    )


@torch.no_grad()
def compute_logits(teacher: LogitModel, tokenized, *, batch_size: int, bf16: bool) -> torch.Tensor:
    """Teacher logits (n × d, float32, on the CPU) for a tokenized split, rows in ``idx`` order, computed on the
    teacher's own device."""
    device = teacher.label_token_ids.device
    n = len(tokenized)
    # longest first, similar lengths together: less padding, rows still land at their ``idx``
    sampler = GlobalBatchSampler.for_eval(n, batch_size, lengths=token_lengths(tokenized))
    loader = make_loader(tokenized, teacher.tokenizer, sampler)
    out: torch.Tensor | None = None
    line, done = ProgressLine("teacher logits", n), 0
    for batch in loader:
        line.update(done)
        done += len(batch["idx"])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = (
                teacher(
                    **{k: batch[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
                )
                .float()
                .cpu()
            )
        if out is None:
            out = torch.empty(n, logits.shape[-1], dtype=torch.float32)
        out[batch["idx"]] = logits
    assert out is not None, "empty split"
    return out


@dataclass(frozen=True)
class LogitsRequest:
    """What a cache file holds: the teacher's logits on one split, and how they are computed."""

    teacher: str
    task: str
    split: str
    data_dir: str | None = None
    max_length: int = 128
    logit_space: str = "label"
    quantization: str | None = None
    bf16: bool = False
    family: str | None = None
    dtype: str = "float32"
    batch_size: int = 64
    # The first N examples only, as the run trains on (--max-train-examples): a vocabulary cache of a whole large
    # split would be n × d floats (SST-2 at d = 49,152: 13 GB) computed for examples no run reads.
    max_examples: int | None = None

    def key(self) -> TeacherLogitsKey:
        """Only the config is read to build the key, so a cache hit never loads the teacher's weights."""
        family = detect_family(load_config(self.teacher), self.family)
        return teacher_logits_key(
            self.teacher,
            get_task(self.task),
            self.split,
            max_length=self.max_length,
            logit_space=resolve_logit_space(self.logit_space, family),
            quantization=self.quantization,
            bf16=self.bf16,
            prompt=uses_prompt(family),
            examples=self.max_examples,
            dtype=self.dtype,
        )

    def compute(self, device: torch.device | str = "cpu") -> torch.Tensor:
        from sinkd_ray.storage import localize  # inputs shipped for other nodes are fetched where this runs

        task = get_task(self.task)
        teacher = load_teacher(
            localize(self.teacher),
            task,
            family=self.family,
            logit_space=self.logit_space,
            quantization=self.quantization,
            dtype=getattr(torch, self.dtype),
            device=device,
        )
        tokenized = tokenize_split(
            load_split(task, self.split, localize(self.data_dir)),
            task,
            teacher.tokenizer,
            self.max_length,
            prompt=uses_prompt(teacher.family),
        )
        tokenized = first_examples(tokenized, self.max_examples)  # the rows the run trains on
        return compute_logits(teacher, tokenized, batch_size=self.batch_size, bf16=self.bf16)


def write_logits(path: Path, logits: torch.Tensor, key: TeacherLogitsKey) -> None:
    """Atomically (temp file + rename): a concurrent reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file({"logits": logits.contiguous()}, tmp, metadata={"key": json.dumps(asdict(key))})
    os.replace(tmp, path)


def cached_teacher_logits(
    request: LogitsRequest, cache_dir: str | Path, compute: Callable[[LogitsRequest], torch.Tensor] | None = None
) -> tuple[Path, bool]:
    """Return ``(path, computed)``: the safetensors file holding the requested logits, computed (by ``compute``,
    default: here, on the CPU) only when no file with the same key exists. The file holds one tensor ``logits``
    (n × d, float32) indexed by the dataset's ``idx`` column."""
    key = request.key()
    path = Path(cache_dir) / key.filename()
    if path.exists():
        return path, False
    # A limit at least as large as the split is the whole split: one file for both (its length is known only
    # from the data, so from a cached whole split, or from the computed logits falling short of the limit). The
    # whole split's key is this key without the limit: `key()` hashes the teacher's weight files, once is enough.
    limit = request.max_examples
    whole_key = replace(key, examples=None)
    whole_path = Path(cache_dir) / whole_key.filename()
    if limit is not None and whole_path.exists():
        with safe_open(str(whole_path), "pt") as cached:
            if cached.get_slice("logits").get_shape()[0] <= limit:
                return whole_path, False
    logits = compute(request) if compute is not None else request.compute()
    if limit is not None and logits.shape[0] < limit:
        key, path = whole_key, whole_path
    write_logits(path, logits, key)
    return path, True


def load_teacher_logits(path: str | Path) -> torch.Tensor:
    """The cached logits tensor (n × d, float32)."""
    return load_file(str(path))["logits"]


@dataclass(frozen=True)
class CachedTeacherLogits:
    """The train split's cached teacher logits as a run's workers reach them: a file on a disk they share with
    the driver, or (remote storage: workers on other nodes) the same tensor through Ray's object store."""

    path: str | None = None
    object_ref: Any = None

    def tensor(self) -> torch.Tensor:
        if self.object_ref is not None:
            import ray

            return ray.get(self.object_ref)
        return load_teacher_logits(self.path)
