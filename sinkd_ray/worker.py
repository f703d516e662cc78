"""The distillation worker: one student's training, the same in a Ray Train worker and in a plain process.

A small recipe, read top to bottom:

    recipe = DistillRecipe(spec, ctx, teacher_logits)  # what to train, on which rank and device
    recipe.setup(resume_dir)                            # data, student (FSDP2), teacher, optimizer; restore
    recipe.train(report)                                # steps; at each evaluation: metric, checkpoint, report

Per step: student logits → objective ((1−α)·CE + α·KL + β·D); the batch-wise Sinkhorn couples all b samples of
the global batch through a differentiable all-gather (W workers × b/W = 1 worker × b). Each evaluation writes a
sharded checkpoint (`checkpoints`) and calls ``report(metrics, checkpoint_dir)``.

A run that cannot succeed by retrying — it diverged (non-finite loss, gradients or weights), or its inputs are
wrong — raises `RunFailed`; `ray_worker` turns that into a failure record for the driver instead of an exception
Ray Train would retry. ``distill()`` is the plain-process entry point (tests, benchmarks/reproduce.py).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from sinkd_ray import checkpoints
from sinkd_ray.config import RunSpec
from sinkd_ray.data import (
    GlobalBatchSampler,
    first_examples,
    holdout_split,
    load_split,
    make_loader,
    token_lengths,
    tokenize_split,
)
from sinkd_ray.errors import SinkdError
from sinkd_ray.hardware import describe_precision, resolve_bf16
from sinkd_ray.models import LogitModel, load_student, load_student_skeleton, load_teacher, uses_prompt
from sinkd_ray.objective import sinkd_objective
from sinkd_ray.online_teacher import OnlineTeacher
from sinkd_ray.progress import ProgressLine
from sinkd_ray.storage import localize
from sinkd_ray.tasks import Task, compute_metrics, get_task

FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # where torch ships a fused AdamW kernel
FAILURE_FILE = "sinkd_failure.json"  # in a Ray Train run's folder: why the run failed without retrying
ReportFn = Callable[[dict, "Path | None"], None]


class RunFailed(SinkdError):
    """The run cannot succeed as configured (diverged, or bad input found only on the worker): not retried."""


@dataclass(frozen=True)
class WorkerContext:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


@dataclass
class Progress:
    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    resumed_from_step: int | None = None


# ------------------------------------------------------------------------------------------ building blocks
def global_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (b/W × d) from all workers into (b × d), differentiably.

    The backward is a sum over workers (reduce-scatter), so every worker receives W·∂L/∂x_local for the
    identical loss L each computes; FSDP's gradient averaging divides by W again, giving exactly the
    gradient one worker would get on the whole batch.
    """
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def shard_student(student: LogitModel, world_size: int, device: torch.device, bf16: bool) -> None:
    """FSDP2: shard each transformer layer, then the root (the standard per-block wrapping). Under bf16 the
    parameters are all-gathered in bf16 (half the traffic) and gradients reduced in float32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    )
    for layer in student.transformer_layers():
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(student.hf_model, mesh=mesh, mp_policy=policy)


def linear_schedule_with_warmup(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    """lr × t / warmup for t < warmup, then lr × (total − t) / (total − warmup), down to 0 at ``total``: the
    schedule of transformers' ``get_linear_schedule_with_warmup`` (a test compares the two step by step), as
    torch's own LambdaLR. Not imported from transformers: ``transformers.optimization`` imports its Trainer's
    utilities, which import peft, bitsandbytes and torch's inductor — 2.7 s of CPU in every worker process."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def model_inputs(batch: dict, device: torch.device) -> dict:
    """The tensors a LogitModel forward takes (token_type_ids only when the tokenizer made them)."""
    return {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over data-parallel workers (the identity with one): gradient norms of the global batch."""
    if not dist.is_initialized():
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    """``flag`` on every rank (one tiny all-reduce with several workers)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


class TeacherLogits:
    """Teacher logits for a batch: a row lookup in the cached logits, or a live forward of the frozen teacher."""

    def __init__(
        self,
        *,
        cached: torch.Tensor | None = None,
        teacher: LogitModel | None = None,
        tokenized: dict | None = None,
        bf16: bool = False,
    ):
        self.cached, self.teacher, self.tokenized, self.bf16 = cached, teacher, tokenized, bf16
        if teacher is not None:
            from transformers import DataCollatorWithPadding

            self.collate = DataCollatorWithPadding(teacher.tokenizer)

    @torch.no_grad()
    def __call__(self, split: str, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
        if self.cached is not None:
            return self.cached[idx].to(device)
        return self.forward(split, idx, device)

    def forward(self, split: str, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A live forward of the teacher on the examples ``idx`` (with gradients where grad mode is on)."""
        assert self.teacher is not None and self.tokenized is not None
        rows = self.tokenized[split].select(idx.tolist())
        batch = self.collate(
            [{k: r[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in r} for r in rows]
        )
        teacher_device = self.teacher.label_token_ids.device  # a quantized teacher sits where bitsandbytes put it
        with torch.autocast(teacher_device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.teacher(**model_inputs(batch, teacher_device))
        return logits.float().to(device)


def evaluate(
    student: LogitModel, task: Task, dev, *, per_worker: int, rank: int, world: int, device: torch.device, bf16: bool
) -> dict[str, float]:
    """Task metrics of the (possibly sharded) student on the dev split, identical on every worker."""
    student.eval()
    idx_all, pred_all, label_all = [], [], []
    # Every worker must run the same number of (collective) FSDP forwards: for_eval pads the last batch with
    # repeated examples, dropped again below by example id. Longest first, similar lengths together: less padding,
    # the same predictions (put back in order by example id).
    sampler = GlobalBatchSampler.for_eval(
        len(dev), per_worker * world, rank=rank, world_size=world, lengths=token_lengths(dev)
    )
    line = ProgressLine("evaluating", len(dev), enabled=rank == 0)
    with torch.no_grad():
        for batch in make_loader(dev, student.tokenizer, sampler):
            line.update(len(idx_all) * world)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = student(**model_inputs(batch, device))
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


# ------------------------------------------------------------------------------------------------ the recipe
class DistillRecipe:
    """One student's training on one worker (rank ``ctx.rank`` of ``ctx.world``)."""

    def __init__(self, spec: RunSpec, ctx: WorkerContext = WorkerContext(), teacher_logits: torch.Tensor | None = None):
        # inputs the driver shipped to the storage (remote runs) are fetched to this node (`storage.localize`)
        tcfg = replace(spec.train, student=localize(spec.train.student), data_dir=localize(spec.train.data_dir))
        self.spec, self.tcfg, self.dcfg, self.ctx = spec, tcfg, spec.distill, ctx
        self.task = get_task(spec.train.task)
        self.bf16 = resolve_bf16(spec.train.bf16, ctx.device)
        self.cached_teacher_logits = teacher_logits
        self.progress = Progress()

    # --- setup
    def setup(self, resume_dir: Path | None = None) -> None:
        tcfg, ctx = self.tcfg, self.ctx
        if ctx.rank == 0:
            print(describe_precision(tcfg.bf16, ctx.device), flush=True)
        if ctx.device.type == "cuda":  # TF32 matmuls: ~8× the float32 throughput on Ampere+, ample for training
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        seed_everything(tcfg.seed)
        self.student = self._load_student(resume_dir)
        self.train_ds, self.dev_ds = (
            self._tokenized(self.student.tokenizer, "train"),
            self._tokenized(self.student.tokenizer, "dev"),
        )
        cached = self.cached_teacher_logits
        if cached is not None and len(cached) < len(self.train_ds):
            raise RunFailed(
                f"the cached teacher logits cover {len(cached)} training examples, the run trains on "
                f"{len(self.train_ds)} — compute them with the run's --max-train-examples (the driver does)"
            )
        self.train_ds, self.holdout_ds = holdout_split(self.train_ds, tcfg.holdout_fraction)
        self.teacher = self._teacher()
        if ctx.world > 1:
            shard_student(self.student, ctx.world, ctx.device, self.bf16)
        self.optimizer = self._optimizer()
        self.sampler = GlobalBatchSampler(
            len(self.train_ds),
            self.dcfg.batch_size,
            rank=ctx.rank,
            world_size=ctx.world,
            seed=tcfg.seed,
            lengths=token_lengths(self.train_ds) if tcfg.group_by_length else None,
        )
        self.steps_per_epoch = len(self.sampler) // tcfg.grad_accum_steps
        if self.steps_per_epoch == 0:
            raise RunFailed(
                f"{len(self.train_ds)} training examples give no full step of batch_size="
                f"{self.dcfg.batch_size} × grad_accum_steps={tcfg.grad_accum_steps} — use a smaller "
                "batch or more data"
            )
        total = self.steps_per_epoch * tcfg.epochs
        warmup = int(tcfg.warmup_ratio * total)
        self.scheduler = linear_schedule_with_warmup(self.optimizer, warmup, total)
        self.online = (
            OnlineTeacher(self.teacher, self.dcfg, total_steps=total, warmup_steps=warmup)
            if self.dcfg.online_teacher
            else None
        )
        self.fault_armed = tcfg.fault_at_step is not None and resume_dir is None
        self._reset_shares()
        if resume_dir is not None:
            self._restore(resume_dir)

    def _load_student(self, resume_dir: Path | None) -> LogitModel:
        tcfg = self.tcfg
        if resume_dir is None:
            student = load_student(
                tcfg.student,
                self.task,
                num_layers=tcfg.student_layers,
                family=tcfg.family,
                logit_space=tcfg.logit_space,
            )
        elif checkpoints.is_legacy(resume_dir):  # an earlier version's checkpoint: the full student is saved
            student = load_student(str(resume_dir / checkpoints.STUDENT_DIR), self.task)
        else:  # weights come from the shards once the student is sharded like the run that wrote them
            student = load_student_skeleton(resume_dir / checkpoints.STUDENT_DIR, self.task)
        return student.to(self.ctx.device)

    def _tokenized(self, tokenizer, split: str, prompt: bool | None = None):
        tcfg = self.tcfg
        prompt = uses_prompt(self.student.family) if prompt is None else prompt
        ds = tokenize_split(
            load_split(self.task, split, tcfg.data_dir), self.task, tokenizer, tcfg.max_length, prompt=prompt
        )
        return first_examples(ds, tcfg.max_train_examples if split == "train" else tcfg.max_eval_examples)

    def _teacher(self) -> TeacherLogits | None:
        tcfg, dcfg = self.tcfg, self.dcfg
        if tcfg.teacher is None:
            return None
        if self.cached_teacher_logits is not None and not dcfg.online_teacher:
            return TeacherLogits(cached=self.cached_teacher_logits)
        dtype = {
            "auto": torch.bfloat16 if self.bf16 else torch.float32,
            "float32": torch.float32,
            "bfloat16": torch.bfloat16,
            "float16": torch.float16,
        }[tcfg.teacher_dtype]
        if dcfg.online_teacher:
            dtype = torch.float32  # its LoRA modules train: keep the base in full precision
        teacher = load_teacher(
            localize(tcfg.teacher),
            self.task,
            family=tcfg.family,
            logit_space=tcfg.logit_space,
            quantization=tcfg.teacher_quantization,
            dtype=dtype,
            device=self.ctx.device,
        )
        tokenized = {"train": self._tokenized(teacher.tokenizer, "train", prompt=uses_prompt(teacher.family))}
        return TeacherLogits(teacher=teacher, tokenized=tokenized, bf16=self.bf16)

    def _optimizer(self) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for name, p in self.student.hf_model.named_parameters():
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
        # fused: one kernel per step instead of ~10 passes over every tensor; on a CPU this alone takes a 3-layer
        # MiniLM student from ~48 to ~80 examples/s (the for-loop default is memory-bound on the 12M embedding).
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.tcfg.lr,
            fused=self.ctx.device.type in FUSED_ADAMW_DEVICES,
        )

    # --- checkpoints
    def _save(self, directory: Path, metrics: dict) -> None:
        """Every rank writes its own shards and RNG state; rank 0 the rest (`checkpoints` has the layout)."""
        rank = self.ctx.rank
        checkpoints.save_training_state(directory, self.student.hf_model, self.optimizer, rank=rank)
        checkpoints.save_json(directory / checkpoints.RNG_DIR / f"rank{rank}.json", checkpoints.rng_state())
        if rank != 0:
            return
        self.student.save_config(directory / checkpoints.STUDENT_DIR)
        checkpoints.save_json(
            directory / checkpoints.TRAINER_FILE,
            {"progress": asdict(self.progress), "scheduler": self.scheduler.state_dict(), "world": self.ctx.world},
        )
        if self.online is not None:
            self.online.save(directory / checkpoints.ONLINE_FILE)
        checkpoints.save_json(directory / checkpoints.METRICS_FILE, metrics)
        checkpoints.save_json(directory / "train_config.json", self.tcfg.to_dict())
        checkpoints.save_json(directory / "distill_config.json", self.dcfg.to_dict())

    def _restore(self, directory: Path) -> None:
        rank = self.ctx.rank
        if checkpoints.is_legacy(directory):
            state = checkpoints.load_legacy_state(directory)
            self._restore_legacy(state)
            return
        checkpoints.load_training_state(directory, self.student.hf_model, self.optimizer, rank=rank)
        trainer = checkpoints.load_json(directory / checkpoints.TRAINER_FILE)
        self.scheduler.load_state_dict(trainer["scheduler"])
        self.progress = Progress(**{**trainer["progress"], "resumed_from_step": trainer["progress"]["step"]})
        if self.online is not None and (directory / checkpoints.ONLINE_FILE).is_file():
            self.online.load(directory / checkpoints.ONLINE_FILE)
        self.last_metrics = checkpoints.load_json(directory / checkpoints.METRICS_FILE)
        checkpoints.set_rng_state(checkpoints.load_json(directory / checkpoints.RNG_DIR / f"rank{rank}.json"))

    def _restore_legacy(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if dist.is_initialized():
            set_optimizer_state_dict(
                self.student.hf_model,
                self.optimizer,
                optim_state_dict=state["optimizer"],
                options=StateDictOptions(full_state_dict=True),
            )
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        progress = state["progress"]
        self.progress = Progress(progress["epoch"], progress["batch_in_epoch"], progress["step"], progress["step"])
        python, numpy_state, torch_state = state["rng"]["python"], state["rng"]["numpy"], state["rng"]["torch"]
        random.setstate(python)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        self.last_metrics = None

    # --- training
    def _step_batch(self, batch: dict) -> dict[str, torch.Tensor]:
        """Forward and backward of one micro-batch; the objective's detached components."""
        device, tcfg = self.ctx.device, self.tcfg
        labels = batch["labels"].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            s_logits = self.student(**model_inputs(batch, device))
        s_logits = s_logits.float()
        # vocabulary logits: the CE target is the label word's token id
        targets = labels if self.student.logit_space == "label" else self.student.label_token_ids[labels]
        if self.online is not None:
            t_logits = self.online.logits(batch["idx"], device)
        else:
            t_logits = self.teacher("train", batch["idx"], device) if self.teacher else None
        gather = global_gather if self.ctx.world > 1 else None
        measure = self.share_batches_left > 0
        loss, parts = sinkd_objective(
            s_logits, t_logits, targets, self.dcfg, gather=gather, shares=measure, reduce_sum=_all_reduce_sum
        )
        if measure:  # one batch's shares (the first of the interval), kept apart from the per-batch means
            self.share_batches_left -= 1
            for key in [k for k in parts if k.startswith("grad_")]:
                self.share_sums[key] = self.share_sums.get(key, 0.0) + float(parts.pop(key))
            self.share_count += 1
        if self.online is not None:
            teacher_loss = self.online.loss(t_logits, s_logits, targets)
            loss = loss + teacher_loss  # disjoint parameters: one backward serves both optimizers
            parts["teacher"] = teacher_loss.detach()
        (loss / tcfg.grad_accum_steps).backward()
        return parts

    def _optimizer_step(self) -> None:
        """Clip, refuse a non-finite gradient (a diverged run fails alone, not retried), step."""
        clip = self.tcfg.max_grad_norm if self.tcfg.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.student.hf_model.parameters(), clip)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: the global norm
        if not torch.isfinite(norm):  # the same global value on every rank: all fail together
            raise RunFailed(
                f"the loss or its gradients became non-finite at step {self.progress.step + 1} "
                f"(gradient norm {norm.item()}, lr {self.scheduler.get_last_lr()[0]:.3g}) — the run "
                "diverged: lower the learning rate"
            )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.online is not None:
            self.online.step()
        self.progress.step += 1

    def _weights_finite(self) -> bool:
        local = all(
            torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()
            for p in self.student.hf_model.parameters()
        )
        return all_ranks_true(bool(local), self.ctx.device)

    def train(self, report: ReportFn, checkpoint: bool = True) -> None:
        """Epochs of steps until ``epochs``; evaluate, checkpoint and report every epoch (or N steps)."""
        tcfg, progress = self.tcfg, self.progress
        if progress.epoch >= tcfg.epochs and getattr(self, "last_metrics", None):
            # resumed from the final checkpoint (interrupted just after it): say its result again, so a
            # restored study's trial ends with its metric instead of nothing
            report(self.last_metrics, None)
            return
        eval_every = tcfg.eval_every_steps or self.steps_per_epoch
        sums: dict[str, float] = {}
        seen, train_time = 0, 0.0
        self._reset_shares()
        self.student.train()
        line = ProgressLine("training", self.steps_per_epoch * tcfg.epochs, unit="steps", enabled=self.ctx.rank == 0)
        examples_per_step = self.dcfg.batch_size * tcfg.grad_accum_steps
        while progress.epoch < tcfg.epochs:
            self.sampler.set_epoch(progress.epoch)
            batches = list(self.sampler)[progress.batch_in_epoch :]
            for batch in make_loader(self.train_ds, self.student.tokenizer, batches):
                t0 = time.perf_counter()
                for k, v in self._step_batch(batch).items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                seen += 1
                progress.batch_in_epoch += 1
                if progress.batch_in_epoch % tcfg.grad_accum_steps == 0:
                    self._optimizer_step()
                    line.update(progress.step, f"epoch {progress.epoch + 1}/{tcfg.epochs}", examples_per_step)
                train_time += time.perf_counter() - t0
                if self.fault_armed and progress.step == tcfg.fault_at_step:
                    raise RuntimeError(f"injected fault at step {progress.step} (fault_at_step, testing only)")
                epoch_done = progress.batch_in_epoch == len(self.sampler)
                if epoch_done:
                    progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
                at_eval = progress.batch_in_epoch % tcfg.grad_accum_steps == 0 and (
                    epoch_done or progress.step % eval_every == 0
                )
                if not at_eval:
                    continue
                metrics = self._evaluate(sums, seen, train_time, epoch_done)
                self._report(report, metrics, checkpoint)
                sums, seen, train_time = {}, 0, 0.0
                self._reset_shares()
                if epoch_done:
                    break  # the sampler of the next epoch is a new permutation

    def _reset_shares(self) -> None:
        self.share_batches_left, self.share_sums, self.share_count = self.tcfg.grad_share_batches, {}, 0

    def _evaluate(self, sums: dict, seen: int, train_time: float, epoch_done: bool) -> dict:
        if not self._weights_finite():
            raise RunFailed(
                f"the student's weights became non-finite by step {self.progress.step} (lr "
                f"{self.scheduler.get_last_lr()[0]:.3g}) — the run diverged: lower the learning rate"
            )
        ctx, progress = self.ctx, self.progress

        def metrics_on(split) -> dict[str, float]:
            kwargs = dict(rank=ctx.rank, world=ctx.world, device=ctx.device, bf16=self.bf16)
            return evaluate(self.student, self.task, split, per_worker=self.tcfg.eval_batch_size, **kwargs)

        dev = metrics_on(self.dev_ds)
        held = metrics_on(self.holdout_ds) if self.holdout_ds is not None else {}
        epoch = progress.epoch if epoch_done else progress.epoch + progress.batch_in_epoch / len(self.sampler)
        return {
            "epoch": epoch,
            "step": progress.step,
            "dev_metric": dev[self.task.metric],
            **{f"dev_{k}": v for k, v in dev.items()},
            **({"holdout_metric": held[self.task.metric]} if held else {}),
            **{f"holdout_{k}": v for k, v in held.items()},
            **{f"train_{k}": v / max(seen, 1) for k, v in sums.items()},
            **{k: v / self.share_count for k, v in self.share_sums.items()},
            "examples_per_s": seen * self.dcfg.batch_size / max(train_time, 1e-9),
            "lr": self.scheduler.get_last_lr()[0],
            "resumed_from_step": -1 if progress.resumed_from_step is None else progress.resumed_from_step,
        }

    def _report(self, report: ReportFn, metrics: dict, checkpoint: bool) -> None:
        if not checkpoint:
            report(metrics, None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            try:
                self._save(Path(tmp), metrics)
                report(metrics, Path(tmp))
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                wait_for_stop_on_full_storage(metrics.get("step"), self.ctx.rank)


def wait_for_stop_on_full_storage(step, rank: int) -> None:
    """A checkpoint could not be written: the storage is full. The driver watches the free space and stops the
    study in one line (study.DiskWatch), with every checkpoint already written intact; a worker that raised here
    would instead fill the log with pyarrow's traceback and be retried into the same full disk. So it waits to be
    stopped, and raises a short error only if nothing stops it (the full disk was one the driver does not watch)."""
    wait_s = float(os.environ.get("SINKD_FULL_STORAGE_WAIT_S", "300"))
    print(
        f"[rank {rank}] the storage is full: the checkpoint of step {step} was not written; "
        f"waiting up to {wait_s:.0f} s for the study to stop",
        flush=True,
    )
    time.sleep(wait_s)
    raise SinkdError(f"the storage is full: the checkpoint of step {step} was not written — free space, then resume")


def distill(
    spec: RunSpec,
    *,
    report: ReportFn,
    teacher_logits: torch.Tensor | None = None,
    resume_dir: Path | None = None,
    ctx: WorkerContext = WorkerContext(),
    checkpoint: bool = True,
) -> None:
    """Train one student (the recipe's setup + train). ``report(metrics, checkpoint_dir)`` is called after every
    evaluation; every rank gets its own ``checkpoint_dir`` (deleted after the call; None with
    ``checkpoint=False``). ``teacher_logits``: the cached train-split logits (n × d), else the teacher runs live."""
    recipe = DistillRecipe(spec, ctx, teacher_logits)
    recipe.setup(resume_dir)
    recipe.train(report, checkpoint)


# ----------------------------------------------------------------------------------------------- Ray Train
def ray_worker(config: dict) -> None:
    """``train_loop_per_worker`` of the run's :class:`ray.train.torch.TorchTrainer`."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    context = ray.train.get_context()
    torch.set_num_threads(max(1, int(config["threads"])))
    ctx = WorkerContext(context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device())
    spec = RunSpec.from_dict(config["spec"])

    def report(metrics: dict, checkpoint_dir: Path | None) -> None:
        # Provenance: which Ray node each rank trained on, kept in the checkpoint (placement.json).
        node = ray.get_runtime_context().get_node_id()
        nodes = [node]
        if dist.is_initialized():
            nodes = [None] * ctx.world
            dist.all_gather_object(nodes, node)
        if checkpoint_dir and ctx.rank == 0:
            (checkpoint_dir / "placement.json").write_text(json.dumps({"node_ids": nodes}))
        checkpoint = Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    resume = ray.train.get_checkpoint()
    try:
        logits = config["teacher_logits"].tensor() if config.get("teacher_logits") else None
        with resume.as_directory() if resume else contextlib.nullcontext() as resume_dir:
            distill(
                spec, report=report, teacher_logits=logits, ctx=ctx, resume_dir=Path(resume_dir) if resume_dir else None
            )
    except SinkdError as err:  # the same on every rank; retrying (max_failures) would fail the same way
        if ctx.rank == 0:
            _record_failure(context.get_storage(), str(err))


def _record_failure(storage, message: str) -> None:
    """The run's failure, beside its checkpoints, for the driver to raise (`driver.fit_run`)."""
    path = f"{storage.experiment_fs_path}/{FAILURE_FILE}"
    with storage.storage_filesystem.open_output_stream(path) as out:
        out.write(json.dumps({"message": message}).encode())
