"""Distillation training: the worker loop, its Ray Train launcher and `python -m sinkd_ray.train`.

One run, top to bottom (the loop is plain PyTorch; Ray is only the launcher around it):

1. The driver makes sure the teacher's logits are cached (once per teacher/task/split, see teacher_cache).
2. ``TorchTrainer`` starts W workers. Each builds the student, shards it with FSDP2 (``fully_shard``),
   and draws the same seeded global batches of b examples, keeping its own b/W slice.
3. Per step: student logits -> objective ((1-α)CE + α·KL + β·Sinkhorn); the Sinkhorn plan couples all b
   samples of the global batch through a differentiable all-gather of the probabilities.
4. Every epoch (or every N steps): dev metric, ``ray.train.report(metrics, checkpoint)``. The checkpoint holds
   the full student (``save_pretrained``, safetensors + tokenizer) and what resuming needs (optimizer,
   scheduler, step, RNG). A crashed worker group restarts from it (``FailureConfig``).

With ``--stage teacher`` the same loop fine-tunes a teacher with CE only (no teacher, α = β = 0).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from ray.train import UserCallback

from sinkd_ray.cli import add_config_args, config_from_args, run_cli
from sinkd_ray.config import DistillConfig, TrainConfig, is_remote, parse_resources
from sinkd_ray.data import GlobalBatchSampler, load_split, make_loader, tokenize_split
from sinkd_ray.errors import SinkdError
from sinkd_ray.hardware import describe_precision, resolve_bf16
from sinkd_ray.objective import online_teacher_loss, sinkd_objective
from sinkd_ray.models import LogitModel, load_student, load_teacher
from sinkd_ray.tasks import Task, compute_metrics, get_task
from sinkd_ray.teacher_cache import cached_teacher_logits, load_teacher_logits

STUDENT_DIR = "student"  # inside a checkpoint: save_pretrained output
FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # where torch ships a fused AdamW kernel
STATE_FILE = "train_state.pt"  # inside a checkpoint: optimizer, scheduler, step, RNG
ReportFn = Callable[[dict, "Path | None"], None]


# --------------------------------------------------------------------------------------------- workers


def global_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (b/W × d) from all workers into (b × d), differentiably.

    The backward is a sum over workers (reduce-scatter), so every worker receives W·∂L/∂x_local for the
    identical loss L each computes; FSDP's gradient averaging divides by W again, giving exactly the
    gradient one worker would get on the whole batch.
    """
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def shard_student(student: LogitModel, world_size: int, device: torch.device) -> None:
    """FSDP2: shard each transformer layer, then the root (the standard per-block wrapping)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    for layer in student.transformer_layers():
        fully_shard(layer, mesh=mesh)
    fully_shard(student.hf_model, mesh=mesh)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _model_inputs(batch: dict, device: torch.device) -> dict:
    """The tensors a LogitModel forward takes (token_type_ids only when the tokenizer made them)."""
    return {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


class TeacherLogits:
    """Teacher logits for a batch: a row lookup in the cache, or a live forward of the frozen teacher."""

    def __init__(self, *, cached: dict[str, torch.Tensor] | None = None, teacher: LogitModel | None = None,
                 tokenized: dict | None = None, bf16: bool = False):
        self.cached, self.teacher, self.tokenized, self.bf16 = cached, teacher, tokenized, bf16
        if teacher is not None:
            from transformers import DataCollatorWithPadding

            self.collate = DataCollatorWithPadding(teacher.tokenizer)

    @torch.no_grad()
    def __call__(self, split: str, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
        if self.cached is not None:
            return self.cached[split][idx].to(device)
        return self.forward(split, idx, device)

    def forward(self, split: str, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A live forward of the teacher on the examples ``idx`` (with gradients where grad mode is on)."""
        assert self.teacher is not None and self.tokenized is not None
        rows = self.tokenized[split].select(idx.tolist())
        batch = self.collate([{k: r[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in r}
                              for r in rows])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.teacher(**_model_inputs(batch, device))
        return logits.float()


# Attention projections that get online LoRA modules, first match wins (BERT/RoBERTa, GPT-Neo/Llama, T5/MPNet).
LORA_TARGETS = (("query", "value"), ("q_proj", "v_proj"), ("q", "v"))


class OnlineTeacher:
    """OKD-style online teacher modules (arXiv 2409.12512): the teacher adapts to the student while both train.

    What is implemented:
    - LoRA modules (``peft``; rank r, scaling α = 2r, no dropout) on the teacher's attention query and value
      projections. Every base weight of the teacher stays frozen (``requires_grad=False``) and bit-identical;
      only the modules train. The teacher stays in eval mode (no dropout).
    - Each step the teacher runs live on the batch; the student's objective sees its logits detached, exactly
      as it sees a frozen teacher's (so the cache cannot be used: it is bypassed automatically).
    - Teacher loss  L_T = CE(y, z_T) + η·KL_τKL(s ‖ t),  with the student's probabilities s detached as the
      target: CE keeps the teacher on the task, the KL moves its distribution toward what the student can
      represent. Own AdamW (``online_lr``, same warm-up/linear decay as the student), stepped with the
      student's optimizer. With several workers the teacher is replicated, so its gradients are averaged by
      an all-reduce before each step.
    """

    def __init__(self, live: TeacherLogits, dcfg: DistillConfig, *, total_steps: int, warmup_steps: int):
        from peft import LoraConfig, inject_adapter_in_model
        from transformers import get_linear_schedule_with_warmup

        self.live, self.dcfg = live, dcfg
        model = live.teacher.hf_model
        linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        targets = next((list(pair) for pair in LORA_TARGETS if set(pair) <= linear), None)
        if targets is None:
            raise SinkdError(f"online teacher: no attention query/value projections found in "
                             f"{type(model).__name__} (looked for {LORA_TARGETS}) — this architecture is not "
                             f"supported with --online-teacher")
        inject_adapter_in_model(LoraConfig(r=dcfg.online_rank, lora_alpha=2 * dcfg.online_rank,
                                           lora_dropout=0.0, target_modules=targets), model)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        live.teacher.eval()
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=dcfg.online_lr, weight_decay=0.0)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, warmup_steps, total_steps)

    def logits(self, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
        return self.live.forward("train", idx, device)

    def loss(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """L_T = CE(y, z_T) + η·KL_τKL(s ‖ t), gradients to the teacher's modules only."""
        return online_teacher_loss(teacher_logits, student_logits, labels, self.dcfg)

    def step(self) -> None:
        if dist.is_initialized():
            for p in self.params.values():
                if p.grad is not None:
                    dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"modules": {n: p.detach().clone() for n, p in self.params.items()},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for name, value in state["modules"].items():
                self.params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def evaluate(student: LogitModel, task: Task, dev, *, per_worker: int, rank: int, world: int,
             device: torch.device, bf16: bool) -> dict[str, float]:
    """Task metrics of the (possibly sharded) student on the dev split, identical on every worker."""
    student.eval()
    idx_all, pred_all, label_all = [], [], []
    # Every worker must run the same number of (collective) FSDP forwards: for_eval pads the last batch with
    # repeated examples, dropped again below by example id.
    sampler = GlobalBatchSampler.for_eval(len(dev), per_worker * world, rank=rank, world_size=world)
    loader = make_loader(dev, student.tokenizer, sampler)
    with torch.no_grad():
        for batch in loader:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = student(**_model_inputs(batch, device))
            idx_all += batch["idx"].tolist()
            pred_all += student.class_logits(logits).argmax(-1).tolist()
            label_all += batch["labels"].tolist()
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (idx_all, pred_all, label_all))
        idx_all, pred_all, label_all = (sum((g[k] for g in gathered), []) for k in range(3))
    by_idx = {i: (p, y) for i, p, y in zip(idx_all, pred_all, label_all)}  # drops the padding repeats
    preds, labels = zip(*(by_idx[i] for i in sorted(by_idx)))
    student.train()
    return compute_metrics(task, list(preds), list(labels))


def save_checkpoint(directory: Path, student: LogitModel, optimizer, scheduler, progress: dict,
                    tcfg: TrainConfig, dcfg: DistillConfig, metrics: dict, *, rank: int,
                    online: OnlineTeacher | None = None) -> None:
    """Write the full (unsharded) student and the resume state. Collective: every worker must call it."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    if dist.is_initialized():
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(student.hf_model, options=options)
        optim_state = get_optimizer_state_dict(student.hf_model, optimizer, options=options)
    else:
        model_state, optim_state = student.hf_model.state_dict(), optimizer.state_dict()
    if rank != 0:
        return
    student.save_pretrained(directory / STUDENT_DIR, state_dict=model_state)
    torch.save({"optimizer": optim_state, "scheduler": scheduler.state_dict(), "progress": progress,
                "rng": _rng_state(), "online_teacher": online.state_dict() if online else None},
               directory / STATE_FILE)
    (directory / "distill_config.json").write_text(json.dumps(dcfg.to_dict(), indent=2))
    (directory / "train_config.json").write_text(json.dumps(asdict(tcfg), indent=2))
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=2))


def distill(tcfg: TrainConfig, dcfg: DistillConfig, *, report: ReportFn, teacher_cache: dict | None = None,
            resume_dir: Path | None = None, rank: int = 0, world: int = 1,
            device: torch.device = torch.device("cpu"), checkpoint: bool = True) -> None:
    """Train one student. Runs the same in a Ray Train worker and in a plain process (world = 1).

    ``report(metrics, checkpoint_dir)`` is called after every evaluation; ``checkpoint_dir`` is only given
    on rank 0 and is deleted after the call returns (``checkpoint=False``: never written, always None).
    ``teacher_cache`` maps split -> cached-logits file (or the tensor itself); ignored with an online teacher.
    """
    if dcfg.batch_size % world:
        raise SinkdError(f"batch_size={dcfg.batch_size} is not divisible by workers={world} — the Sinkhorn "
                         f"batch b is split evenly across workers; choose b as a multiple of {world}")
    task = get_task(tcfg.task)
    bf16 = resolve_bf16(tcfg.bf16, device)
    if rank == 0:
        print(describe_precision(tcfg.bf16, device), flush=True)
    _seed_everything(tcfg.seed)
    state = torch.load(resume_dir / STATE_FILE, weights_only=False) if resume_dir else None
    student_source = str(resume_dir / STUDENT_DIR) if resume_dir else tcfg.student
    student = load_student(student_source, task, num_layers=None if resume_dir else tcfg.student_layers,
                           family=tcfg.family, logit_space=tcfg.logit_space).to(device)
    prompt = student.family != "encoder"

    def split_data(tokenizer, split: str, limit: int | None):
        ds = tokenize_split(load_split(task, split, tcfg.data_dir), task, tokenizer, tcfg.max_length, prompt=prompt)
        return ds.select(range(min(limit, len(ds)))) if limit else ds

    train_ds = split_data(student.tokenizer, "train", tcfg.max_train_examples)
    dev_ds = split_data(student.tokenizer, "dev", tcfg.max_eval_examples)

    distilling = tcfg.teacher is not None
    teacher_logits: TeacherLogits | None = None
    if distilling and teacher_cache and not dcfg.online_teacher:
        teacher_logits = TeacherLogits(cached={s: p if isinstance(p, torch.Tensor) else load_teacher_logits(p)
                                               for s, p in teacher_cache.items()})
    elif distilling:
        if dcfg.online_teacher and tcfg.teacher_quantization:
            raise SinkdError("--online-teacher trains LoRA modules on a full-precision teacher: drop "
                             "--teacher-quantization")
        teacher = load_teacher(tcfg.teacher, task, family=tcfg.family, logit_space=tcfg.logit_space,
                               quantization=tcfg.teacher_quantization)
        if tcfg.teacher_quantization is None:
            teacher.to(device)
        t_prompt = teacher.family != "encoder"
        tok = {"train": tokenize_split(load_split(task, "train", tcfg.data_dir), task, teacher.tokenizer,
                                       tcfg.max_length, prompt=t_prompt)}
        teacher_logits = TeacherLogits(teacher=teacher, tokenized=tok, bf16=bf16)

    if dist.is_initialized():
        shard_student(student, world, device)
    decay, no_decay = [], []
    for name, p in student.hf_model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    # fused: one kernel per step instead of ~10 passes over every tensor; on a CPU this alone takes a 3-layer
    # MiniLM student from ~48 to ~80 examples/s (the for-loop default is memory-bound on the 12M embedding).
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": tcfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=tcfg.lr,
                                  fused=device.type in FUSED_ADAMW_DEVICES)
    local_batch = dcfg.batch_size // world
    sampler = GlobalBatchSampler(len(train_ds), dcfg.batch_size, rank=rank, world_size=world, seed=tcfg.seed)
    steps_per_epoch = len(sampler) // tcfg.grad_accum_steps
    if steps_per_epoch == 0:
        raise SinkdError(f"{len(train_ds)} training examples give no full step of batch_size={dcfg.batch_size}"
                         f" × grad_accum_steps={tcfg.grad_accum_steps} — use a smaller batch or more data")
    total_steps = steps_per_epoch * tcfg.epochs
    from transformers import get_linear_schedule_with_warmup

    scheduler = get_linear_schedule_with_warmup(optimizer, int(tcfg.warmup_ratio * total_steps), total_steps)
    online = None
    if distilling and dcfg.online_teacher:
        online = OnlineTeacher(teacher_logits, dcfg, total_steps=total_steps,
                               warmup_steps=int(tcfg.warmup_ratio * total_steps))

    progress = {"epoch": 0, "batch_in_epoch": 0, "step": 0, "resumed_from_step": None}
    if state is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if dist.is_initialized():
            set_optimizer_state_dict(student.hf_model, optimizer, optim_state_dict=state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        progress = dict(state["progress"], resumed_from_step=state["progress"]["step"])
        _set_rng_state(state["rng"])
        if online is not None and state.get("online_teacher"):
            online.load_state_dict(state["online_teacher"])
    fault_armed = tcfg.fault_at_step is not None and state is None

    gather = global_gather if world > 1 else None
    label_ids = student.label_token_ids  # vocab space: CE targets are the label words' token ids
    eval_every = tcfg.eval_every_steps or steps_per_epoch
    sums: dict[str, float] = {}
    seen, train_time = 0, 0.0
    student.train()
    while progress["epoch"] < tcfg.epochs:
        sampler.set_epoch(progress["epoch"])
        batches = list(sampler)[progress["batch_in_epoch"]:]
        for batch in make_loader(train_ds, student.tokenizer, batches):
            t0 = time.perf_counter()
            labels = batch["labels"].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                s_logits = student(**_model_inputs(batch, device))
            targets = labels if student.logit_space == "label" else label_ids.to(device)[labels]
            if online is not None:
                t_logits = online.logits(batch["idx"], device)
            else:
                t_logits = teacher_logits("train", batch["idx"], device) if teacher_logits else None
            loss, parts = sinkd_objective(s_logits.float(), t_logits, targets, dcfg, gather=gather)
            if online is not None:
                teacher_loss = online.loss(t_logits, s_logits.float(), targets)
                loss = loss + teacher_loss  # disjoint parameters: one backward serves both optimizers
                parts["teacher"] = teacher_loss.detach()
            (loss / tcfg.grad_accum_steps).backward()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            seen += 1
            progress["batch_in_epoch"] += 1
            if progress["batch_in_epoch"] % tcfg.grad_accum_steps == 0:
                if tcfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(student.hf_model.parameters(), tcfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if online is not None:
                    online.step()
                progress["step"] += 1
            train_time += time.perf_counter() - t0
            if fault_armed and progress["step"] == tcfg.fault_at_step:
                raise RuntimeError(f"injected fault at step {progress['step']} (fault_at_step, testing only)")
            epoch_done = progress["batch_in_epoch"] == len(sampler)
            if epoch_done:
                progress.update(epoch=progress["epoch"] + 1, batch_in_epoch=0)
            at_eval = progress["batch_in_epoch"] % tcfg.grad_accum_steps == 0 and (
                epoch_done or progress["step"] % eval_every == 0)
            if not at_eval:
                continue
            dev_metrics = evaluate(student, task, dev_ds, per_worker=tcfg.eval_batch_size, rank=rank,
                                   world=world, device=device, bf16=bf16)
            metrics = {
                "epoch": progress["epoch"] if epoch_done else progress["epoch"] + progress["batch_in_epoch"] / len(sampler),
                "step": progress["step"],
                "dev_metric": dev_metrics[task.metric],
                **{f"dev_{k}": v for k, v in dev_metrics.items()},
                **{f"train_{k}": v / max(seen, 1) for k, v in sums.items()},
                "examples_per_s": seen * local_batch * world / max(train_time, 1e-9),
                "lr": scheduler.get_last_lr()[0],
                "resumed_from_step": -1 if progress["resumed_from_step"] is None else progress["resumed_from_step"],
            }
            if not checkpoint:
                report(metrics, None)
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    save_checkpoint(Path(tmp), student, optimizer, scheduler, dict(progress), tcfg, dcfg,
                                    metrics, rank=rank, online=online)
                    report(metrics, Path(tmp) if rank == 0 else None)
            sums, seen, train_time = {}, 0, 0.0
            if epoch_done:
                break  # the sampler of the next epoch is a new permutation


def ray_worker(config: dict) -> None:
    """``train_loop_per_worker`` for :class:`ray.train.torch.TorchTrainer`."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    ctx = ray.train.get_context()
    torch.set_num_threads(max(1, int(config["cpus_per_worker"])))

    def report(metrics: dict, checkpoint_dir: Path | None) -> None:
        # Provenance: which Ray node each rank trained on, kept in the checkpoint (placement.json).
        node = ray.get_runtime_context().get_node_id()
        nodes = [node]
        if dist.is_initialized():
            nodes = [None] * ctx.get_world_size()
            dist.all_gather_object(nodes, node)
        if checkpoint_dir:
            (checkpoint_dir / "placement.json").write_text(json.dumps({"node_ids": nodes}))
        checkpoint = Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    checkpoint = ray.train.get_checkpoint()
    tcfg, dcfg = TrainConfig(**config["train"]), DistillConfig.from_dict(config["distill"])
    cache = config.get("teacher_cache")
    if cache:  # shipped through the object store when the driver's disk is not shared (ship_teacher_cache)
        cache = {s: ray.get(v) if isinstance(v, ray.ObjectRef) else v for s, v in cache.items()}
    with (checkpoint.as_directory() if checkpoint else contextlib.nullcontext()) as resume_dir:
        distill(tcfg, dcfg, report=report, teacher_cache=cache,
                resume_dir=Path(resume_dir) if resume_dir else None, rank=ctx.get_world_rank(),
                world=ctx.get_world_size(), device=ray.train.torch.get_device())


# ---------------------------------------------------------------------------------------------- driver


def _absolute_if_local(path: str | None) -> str | None:
    """Workers run in another directory: a relative local path must travel as an absolute one."""
    return str(Path(path).expanduser().resolve()) if path and Path(path).expanduser().exists() else path


def local_work_dir(storage: str) -> Path:
    """Where the driver keeps fine-tuned teachers, teacher-logit caches and exported students: the storage
    folder itself when it is local, else $SINKD_CACHE_DIR (default ~/.cache/sinkd_ray) on the driver."""
    if not is_remote(storage):
        return Path(storage)
    return Path(os.environ.get("SINKD_CACHE_DIR") or "~/.cache/sinkd_ray").expanduser()


def ship_teacher_cache(cache: dict[str, str] | None, storage: str) -> dict | None:
    """With remote storage, workers on other nodes cannot read the driver's cache files: send the logits
    through Ray's object store (a few MB for GLUE label spaces). Needs ``ray.init`` first."""
    if not cache or not is_remote(storage):
        return cache
    import ray

    return {split: ray.put(load_teacher_logits(path)) for split, path in cache.items()}


def preflight(tcfg: TrainConfig) -> TrainConfig:
    """Check, in the driver, everything a worker would otherwise fail on minutes later (and retry).

    Returns the config with local paths made absolute. Reads only configs and the data files.
    """
    from sinkd_ray.models import load_config

    tcfg = replace(tcfg, student=_absolute_if_local(tcfg.student), teacher=_absolute_if_local(tcfg.teacher),
                   data_dir=_absolute_if_local(tcfg.data_dir))
    task = get_task(tcfg.task)
    if tcfg.student is not None:
        load_config(tcfg.student)
    if tcfg.teacher is not None:
        _check_teacher_head(load_config(tcfg.teacher), tcfg, task)
    for split in ("train", "dev"):
        load_split(task, split, tcfg.data_dir)
    return tcfg


def has_task_head(config, family: str | None, task: Task) -> bool:
    """Whether a teacher can be used as is: an encoder needs a trained classification head with the task's
    labels (a base model would get a random one); generative teachers read label words from their LM head."""
    from sinkd_ray.models import detect_family

    if detect_family(config, family) != "encoder":
        return True
    trained = any(a.endswith("ForSequenceClassification") for a in (config.architectures or ()))
    return trained and config.num_labels == task.num_labels


def _check_teacher_head(config, tcfg: TrainConfig, task: Task) -> None:
    if not has_task_head(config, tcfg.family, task):
        raise SinkdError(f"teacher '{tcfg.teacher}' is not a {task.name} classifier (architectures="
                         f"{config.architectures}, num_labels={config.num_labels}) — fine-tune it first with "
                         f"`python -m sinkd_ray.train --stage teacher --model {tcfg.teacher}`, or give it to "
                         f"`python -m sinkd_ray.tune` as --teacher-base")


def prepare_teacher_cache(tcfg: TrainConfig, cache_dir: Path, dcfg: DistillConfig | None = None
                          ) -> dict[str, str] | None:
    """Compute (or find) the teacher's cached logits for train and dev; None when not distilling from a cache.

    An online teacher (``dcfg.online_teacher``) changes during training, so it never uses the cache.
    """
    if tcfg.teacher is None or tcfg.teacher_source != "cache" or (dcfg is not None and dcfg.online_teacher):
        return None
    task = get_task(tcfg.task)
    paths = {}
    for split in ("train", "dev"):
        path, computed = cached_teacher_logits(
            tcfg.teacher, task, split, cache_dir=cache_dir, data_dir=tcfg.data_dir, max_length=tcfg.max_length,
            logit_space=tcfg.logit_space, quantization=tcfg.teacher_quantization,
            bf16=resolve_bf16(tcfg.bf16, torch.device("cpu")),
            family=tcfg.family)
        print(f"teacher logits for {task.name}/{split}: {'computed' if computed else 'reused'} ({path.name})")
        paths[split] = str(path)
    return paths


def build_trainer(tcfg: TrainConfig, dcfg: DistillConfig, *, storage_path: str, name: str,
                  teacher_cache: dict | None, callbacks: list | None = None):
    """A ``TorchTrainer`` for one run (used directly here and once per trial by the tuner)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if dcfg.batch_size % tcfg.workers:
        raise SinkdError(f"batch_size={dcfg.batch_size} is not divisible by workers={tcfg.workers} — choose b "
                         f"as a multiple of the number of workers")
    resources = {"CPU": tcfg.cpus_per_worker, **parse_resources(tcfg.worker_resources)}
    if tcfg.gpus_per_worker:
        resources["GPU"] = tcfg.gpus_per_worker
    return TorchTrainer(
        ray_worker,
        train_loop_config={"train": asdict(tcfg), "distill": dcfg.to_dict(), "teacher_cache": teacher_cache,
                           "cpus_per_worker": tcfg.cpus_per_worker},
        scaling_config=ScalingConfig(num_workers=tcfg.workers, use_gpu=tcfg.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=storage_path, callbacks=callbacks,
            failure_config=FailureConfig(max_failures=tcfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=tcfg.checkpoints_to_keep,
                                               checkpoint_score_attribute="dev_metric",
                                               checkpoint_score_order="max"),
        ),
    )


def _on_local_disk(item) -> bool:
    """A Ray Checkpoint / Result on the local filesystem (objects without a filesystem count as local)."""
    import pyarrow.fs

    return isinstance(getattr(item, "filesystem", None) or pyarrow.fs.LocalFileSystem(), pyarrow.fs.LocalFileSystem)


def best_checkpoint_dir(result, download_to: Path | None = None) -> Path:
    """The kept checkpoint with the best dev metric (``num_to_keep`` deletes the others), as a local folder:
    a checkpoint on remote storage is downloaded (into ``download_to``, else a new temporary folder)."""
    ranked = sorted(((metrics.get("dev_metric", float("-inf")), ckpt) for ckpt, metrics in result.best_checkpoints),
                    key=lambda pair: pair[0], reverse=True)
    for _, ckpt in ranked:
        local = Path(ckpt.path) if _on_local_disk(ckpt) else \
            Path(ckpt.to_directory(str(download_to) if download_to else None))
        if (local / STUDENT_DIR).is_dir():  # a listed checkpoint whose files are gone is skipped
            return local
    raise SinkdError(f"the run under {result.path} left no checkpoint — see its worker logs")


def export_best_student(result, output_dir: Path) -> dict:
    """Copy the best checkpoint's student (save_pretrained dir) into ``output_dir``; return its metrics.

    Nothing is deleted: files of the same name are overwritten, others stay.
    """
    best = best_checkpoint_dir(result)
    run_dir, out = Path(result.path).resolve(), output_dir.resolve()
    if _on_local_disk(result) and (out == run_dir or run_dir in out.parents):
        raise SinkdError(f"--output-dir {output_dir} overlaps the run's own folder {run_dir} — choose another")
    shutil.copytree(best / STUDENT_DIR, output_dir, dirs_exist_ok=True)
    metrics = json.loads((best / "metrics.json").read_text())
    (output_dir / "dev_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _print_progress(metrics: dict) -> None:
    comps = " ".join(f"{k[6:]}={v:.4f}" for k, v in metrics.items() if k.startswith("train_"))
    print(f"epoch {metrics['epoch']:.2f} step {metrics['step']}: dev_metric={metrics['dev_metric']:.4f} "
          f"{comps} examples/s={metrics['examples_per_s']:.1f}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sinkd_ray.train",
        description="One SinKD distillation run (or, with --stage teacher, CE fine-tuning of a teacher) on Ray "
                    "Train with FSDP workers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--stage", choices=("student", "teacher"), default="student",
                        help="'teacher': fine-tune --model with CE only; 'student': distil --teacher into --student")
    parser.add_argument("--model", metavar="PATH", help="with --stage teacher: the pretrained model to fine-tune")
    parser.add_argument("--output-dir", metavar="DIR",
                        help="where the best model is exported (save_pretrained + dev_metrics.json); "
                             "default <storage-path>/<name>-best")
    parser.add_argument("--storage-path", default="./sinkd_runs", metavar="DIR",
                        help="runs, checkpoints and the teacher-logit cache (local dir or s3:// / gs://)")
    parser.add_argument("--name", help="run name (an existing name resumes that run); default: task-stage-time")
    add_config_args(parser, TrainConfig, group="training")
    add_config_args(parser, DistillConfig, group="objective")
    return parser


def run(tcfg: TrainConfig, dcfg: DistillConfig, *, storage: str, name: str, output_dir: Path,
        callbacks: list | None = None) -> dict:
    """Cache the teacher's logits, fit one run on Ray Train, export the best student; return its metrics."""
    import ray
    from ray.train import TrainingFailedError

    tcfg = preflight(tcfg)
    teacher_cache = prepare_teacher_cache(tcfg, local_work_dir(storage) / "teacher_cache", dcfg)
    ray.init(ignore_reinit_error=True)
    teacher_cache = ship_teacher_cache(teacher_cache, storage)
    try:
        result = build_trainer(tcfg, dcfg, storage_path=storage, name=name, teacher_cache=teacher_cache,
                               callbacks=callbacks).fit()
    except TrainingFailedError as exc:
        raise SinkdError(f"run {name} failed: {_first_line(exc)} — full worker logs under "
                         f"{storage}/{name} and /tmp/ray/session_latest/logs; rerun the same command with "
                         f"--name {name} to resume from its last checkpoint") from exc
    return export_best_student(result, output_dir)


def _first_line(exc: BaseException) -> str:
    """The most specific line of a (possibly nested) worker error."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.strip().startswith(("File", "^", "..."))]
    errors = [ln for ln in lines if "Error:" in ln or "Error(" in ln]
    return (errors[-1] if errors else lines[-1] if lines else type(exc).__name__)[:300]


def finetune_teacher(base: str, tcfg: TrainConfig, *, storage: str, output_dir: Path | None = None) -> Path:
    """Fine-tune ``base`` on the task with CE only, once: a finished teacher with the same inputs is reused.

    The folder name carries the base model's fingerprint and the training settings, so changing either
    trains a new teacher rather than silently reusing a stale one.
    """
    from sinkd_ray.models import model_fingerprint

    tcfg = replace(tcfg, student=base, student_layers=None, teacher=None)
    settings = json.dumps({k: v for k, v in asdict(tcfg).items() if k not in ("fault_at_step",)}, sort_keys=True)
    key = hashlib.sha256((model_fingerprint(base) + settings).encode()).hexdigest()[:12]
    output_dir = output_dir or local_work_dir(storage) / "teachers" / f"{tcfg.task}-{key}"
    if (output_dir / "dev_metrics.json").exists():
        metrics = json.loads((output_dir / "dev_metrics.json").read_text())
        print(f"teacher: reusing {output_dir} (dev {metrics['dev_metric']:.4f})")
        return output_dir
    print(f"teacher: fine-tuning {base} on {tcfg.task} ({tcfg.epochs} epochs, CE only) -> {output_dir}")
    t0 = time.time()
    metrics = run(tcfg, DistillConfig(alpha=0.0, beta=0.0, batch_size=32), storage=storage,
                  name=f"teacher-{tcfg.task}-{key}", output_dir=output_dir, callbacks=[PrintProgress()])
    print(f"teacher: dev {get_task(tcfg.task).metric}={metrics['dev_metric']:.4f} in {time.time() - t0:.0f}s")
    return output_dir


class PrintProgress(UserCallback):
    """One line per evaluation. Runs in the Ray Train controller; Ray forwards its output to the driver."""

    def after_report(self, run_context, metrics, checkpoint):
        _print_progress(metrics[0])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    storage = args.storage_path if is_remote(args.storage_path) else \
        str(Path(args.storage_path).expanduser().resolve())
    if args.stage == "teacher":
        if not args.model:
            raise SinkdError("--stage teacher needs --model <pretrained model dir or hub id>")
        tcfg = config_from_args(TrainConfig, args, student=args.model, student_layers=None, teacher=None)
        get_task(tcfg.task)
        finetune_teacher(args.model, tcfg, storage=storage,
                         output_dir=Path(args.output_dir) if args.output_dir else None)
        return 0
    if not args.student:
        raise SinkdError("--student is required (a checkpoint, or a pretrained model with --student-layers K)")
    tcfg = config_from_args(TrainConfig, args)
    dcfg = config_from_args(DistillConfig, args)
    if tcfg.teacher is None and (dcfg.alpha > 0 or dcfg.beta > 0 or dcfg.gamma > 0 or dcfg.online_teacher):
        raise SinkdError("no --teacher given: pass a fine-tuned teacher, or --alpha 0 --beta 0 for CE only")
    task = get_task(tcfg.task)  # fail fast on an unknown task
    name = args.name or f"{tcfg.task}-student-{time.strftime('%Y%m%d-%H%M%S')}"
    output = Path(args.output_dir) if args.output_dir else local_work_dir(storage) / f"{name}-best"
    t0 = time.time()
    best = run(tcfg, dcfg, storage=storage, name=name, output_dir=output, callbacks=[PrintProgress()])
    print(f"done in {time.time() - t0:.0f}s: best dev {task.metric}={best['dev_metric']:.4f} at step "
          f"{best['step']}; student saved to {output}")
    return 0


if __name__ == "__main__":
    run_cli(main)
