"""`make demo`: a CoLA study sized to this machine, so that it ends with signal in about 20 minutes.

    python -m sinkd_ray.demo --data-dir ../shared/data                # what `make demo` runs
    python -m sinkd_ray.demo --data-dir ../shared/data --dry-run      # measure, plan, print the study's command

1. Measure this host (about a minute): training examples/s of the teacher (all-mpnet-base-v2, BERT-base size) and
   of the student (all-MiniLM-L6-v2, 6 layers), a few steps on CoLA batches, at the precision `auto` picks here
   (bf16 where the CPU computes it natively, float32 elsewhere: 16× apart on an AVX2-only CPU).
2. Plan: what fits the budget (default 20 minutes, the install included when `--started-at` says when it
   began): the teacher fine-tunes one epoch on as many CoLA examples as ~40 % of the compute time allows, the
   two SinKD trials and the CE-only student train 2 epochs on as many as the rest allows. Said in one line:
   ``demo: float32 host at ~N examples/s → teacher on M examples, …, expect ~K min``.
3. Run the study (`python -m sinkd_ray.tune`) with that plan; it ends with the teacher / best student / CE-only
   table and the registered student.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

from sinkd_ray.cli import run_cli
from sinkd_ray.errors import SinkdError
from sinkd_ray.progress import duration

TEACHER, STUDENT = "offline:all-mpnet-base-v2", "offline:all-minilm-l6-v2"
MAX_LENGTH, EPOCHS, TRIALS = 64, 2, 2
COLA_TRAIN, COLA_DEV = 8551, 1043
# Fixed costs seen on 2 cores (seconds): Ray's start and the study's own set-up, each Ray Train run's start, the
# teacher's dev logits and export, the summary (registration loads the model once more). Evaluation runs at
# about 3× the training rate.
FIXED_S, PER_RUN_S, EVAL_SPEEDUP = 60.0, 25.0, 3.0
# A study's worker trains a little slower than these steps in the demo's own process (Ray Train's reporting,
# checkpoints, the driver beside it): 10.8 against 11.7 examples/s for the teacher on 2 cores, float32.
IN_STUDY = 0.9
TEACHER_SHARE = 0.4  # of the compute time: enough examples for a teacher with signal (one epoch of full CoLA: ~0.5)
MIN_EXAMPLES = 1000


@dataclass(frozen=True)
class Plan:
    bf16: bool
    teacher_rate: float  # training examples/s
    student_rate: float
    teacher_examples: int
    student_examples: int
    expected_s: float

    def line(self) -> str:
        host = "bf16" if self.bf16 else "float32"
        return (
            f"demo: {host} host at ~{self.teacher_rate:.0f} examples/s for the teacher and ~{self.student_rate:.0f} "
            f"for the student (measured) → teacher (mpnet, 12 layers) fine-tuned 1 epoch on {self.teacher_examples:,} "
            f"CoLA examples, {TRIALS} SinKD trials and a CE-only student (MiniLM, 6 layers) {EPOCHS} epochs on "
            f"{self.student_examples:,}, expect ~{duration(self.expected_s)}"
        )


def plan_for(teacher_rate: float, student_rate: float, bf16: bool, compute_s: float) -> Plan:
    """The most examples that fit ``compute_s`` seconds: the teacher's epoch takes ``TEACHER_SHARE`` of the time
    (and its logits for the students' examples), the three student runs the rest."""
    available = compute_s - FIXED_S - (TRIALS + 2) * PER_RUN_S
    teacher_eval = COLA_DEV / (EVAL_SPEEDUP * teacher_rate)
    teacher_examples = int(min(COLA_TRAIN, max(0.0, TEACHER_SHARE * available - teacher_eval) * teacher_rate))
    rest = available - teacher_examples / teacher_rate - teacher_eval

    def students(n: int) -> float:  # logits for n examples, then 3 runs × EPOCHS × (train n + evaluate dev)
        logits = (n + COLA_DEV) / (EVAL_SPEEDUP * teacher_rate)
        runs = (TRIALS + 1) * EPOCHS * (n / student_rate + COLA_DEV / (EVAL_SPEEDUP * student_rate))
        return logits + runs

    per_example = students(1) - students(0)
    student_examples = int(min(COLA_TRAIN, max(0.0, (rest - students(0)) / per_example)))
    if min(teacher_examples, student_examples) < MIN_EXAMPLES:
        raise SinkdError(
            f"this host trains at ~{teacher_rate:.1f} examples/s (teacher) and ~{student_rate:.1f} (student): "
            f"{duration(compute_s)} leave too few examples for a demo with signal — give it more time "
            "(--budget-min) or run it on a faster machine"
        )
    used = FIXED_S + (TRIALS + 2) * PER_RUN_S + teacher_examples / teacher_rate + teacher_eval
    used += students(student_examples)
    return Plan(bf16, teacher_rate, student_rate, teacher_examples, student_examples, used)


def measure(model: str, bf16: bool, data_dir: str | None, steps: int = 4, batch: int = 32) -> float:
    """Training examples/s of ``model`` (a classification head) on CoLA batches at ``MAX_LENGTH``: a warm-up step,
    then ``steps`` timed forward + backward + AdamW steps, on a seeded random sample at the study's batch size
    (CoLA's first rows are its shortest: measured on them, the demo over-planned its runs twice over), times
    ``IN_STUDY``."""
    import torch

    from sinkd_ray.config import DistillConfig
    from sinkd_ray.data import GlobalBatchSampler, load_split, make_loader, tokenize_split
    from sinkd_ray.models import load_student
    from sinkd_ray.objective import sinkd_objective
    from sinkd_ray.tasks import get_task

    task = get_task("cola")
    student = load_student(model, task)
    data = tokenize_split(
        load_split(task, "train", data_dir).shuffle(seed=0).select(range(batch * (steps + 1))),
        task,
        student.tokenizer,
        MAX_LENGTH,
    )
    loader = make_loader(data, student.tokenizer, GlobalBatchSampler(len(data), batch, shuffle=False))
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=True)
    cfg = DistillConfig(alpha=0.0, beta=0.0, batch_size=batch)
    elapsed = 0.0
    for i, batch_ in enumerate(loader):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = student(input_ids=batch_["input_ids"], attention_mask=batch_["attention_mask"])
        loss, _ = sinkd_objective(logits.float(), None, batch_["labels"], cfg)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:  # the first step warms up
            elapsed += time.perf_counter() - t0
    return IN_STUDY * steps * batch / elapsed


def study_argv(plan: Plan, args) -> list[str]:
    argv = [
        "--task",
        "cola",
        "--teacher-base",
        TEACHER,
        "--teacher-epochs",
        "1",
        # one epoch of a few thousand examples: at the default 3e-5 the teacher stayed at the majority class (dev MCC
        # 0 on 3,938 examples); at 5e-5 it reached 0.42
        "--teacher-lr",
        "5e-5",
        "--teacher-max-train-examples",
        str(plan.teacher_examples),
        "--student",
        STUDENT,
        "--search-space",
        "demo",
        "--num-trials",
        str(TRIALS),
        "--ce-baseline",
        "--max-length",
        str(MAX_LENGTH),
        "--max-train-examples",
        str(plan.student_examples),
        # 1.99: the trial's own 0.01 CPU fits beside the worker on 2 cores, and the worker still runs 2 threads
        "--cpus-per-worker",
        f"{max(1.0, (os.cpu_count() or 2) - 0.01):.2f}",
        "--storage-path",
        args.storage_path,
        "--bf16" if plan.bf16 else "--no-bf16",
    ]
    return argv + (["--data-dir", args.data_dir] if args.data_dir else [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sinkd_ray.demo",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data-dir", help="local GLUE copy (else $SINKD_DATA_DIR, else the hub)")
    parser.add_argument("--storage-path", default="./sinkd_runs/demo")
    parser.add_argument("--budget-min", type=float, default=20.0, help="the whole demo, install included")
    parser.add_argument("--started-at", type=float, help="Unix time the demo began (the install counts)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="default: auto")
    parser.add_argument("--dry-run", action="store_true", help="measure and plan, print the study's command")
    args = parser.parse_args(argv)
    import torch

    from sinkd_ray.hardware import describe_precision, resolve_bf16

    torch.set_num_threads(os.cpu_count() or 1)
    bf16 = resolve_bf16(args.bf16, torch.device("cpu"))
    print(describe_precision(args.bf16, torch.device("cpu")), flush=True)
    spent = time.time() - args.started_at if args.started_at else 0.0
    print("demo: measuring this host (teacher and student training steps, about a minute)", flush=True)
    teacher_rate = measure(TEACHER, bf16, args.data_dir)
    student_rate = measure(STUDENT, bf16, args.data_dir)
    spent = time.time() - args.started_at if args.started_at else spent
    plan = plan_for(teacher_rate, student_rate, bf16, 60 * args.budget_min - spent)
    print(plan.line() + (f" (after {duration(spent)} of install and measuring)" if spent else ""), flush=True)
    command = study_argv(plan, args)
    if args.dry_run:
        print("python -m sinkd_ray.tune " + " ".join(command))
        return 0
    from sinkd_ray import tune

    return tune.main(command)


if __name__ == "__main__":
    run_cli(main)
