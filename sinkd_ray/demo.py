"""`make demo`: a CoLA study sized to this machine, so that it ends with signal in about 20 minutes.

    python -m sinkd_ray.demo --data-dir ../shared/data                # what `make demo` runs
    python -m sinkd_ray.demo --data-dir ../shared/data --dry-run      # measure, plan, print the study's command

1. Measure this host (about a minute): training examples/s of the teacher (all-mpnet-base-v2, BERT-base size) and
   of the student (all-MiniLM-L6-v2, 6 layers), a few steps on CoLA batches grouped by length as the demo trains
   (`--group-by-length`), at the precision `auto` picks here (bf16 where the CPU computes it natively, float32
   elsewhere: 16× apart on an AVX2-only CPU).
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
from sinkd_ray.config import TEACHER_BATCH_SIZE
from sinkd_ray.errors import SinkdError
from sinkd_ray.progress import duration

TEACHER, STUDENT = "offline:all-mpnet-base-v2", "offline:all-minilm-l6-v2"
MAX_LENGTH, EPOCHS, TRIALS = 64, 2, 2
COLA_TRAIN, COLA_DEV = 8551, 1043
# Fixed costs seen on 2 cores (seconds): Ray's start and the study's own set-up, each Ray Train run's start, the
# teacher's dev logits and export, the summary (registration loads the model once more). Evaluation runs at
# about 3× the training rate.
FIXED_S, PER_RUN_S, EVAL_SPEEDUP = 60.0, 30.0, 3.0
# A study's worker trains slower than these steps in the demo's own process (Ray Train's reporting, checkpoints,
# the objective's teacher logits, the driver beside it), measured on 2 cores: the teacher 10.8 against 11.7
# examples/s (float32, AVX-512) and 5.5 against 6.0 (float32, AVX2); the student 30 against 44 (AVX2).
TEACHER_IN_STUDY, STUDENT_IN_STUDY = 0.9, 0.7
TEACHER_SHARE = 0.4  # of the compute time: enough examples for a teacher with signal (one epoch of full CoLA: ~0.5)
STUDENT_BATCH = 32  # search_spaces/demo.yaml
# The least that shows anything, measured on 2 cores: a one-epoch teacher on 3,938 CoLA examples (b 32, lr 5e-5)
# reached dev MCC 0.42, on ~1,500 it stayed at the majority class (MCC 0) at b 32 and at b 16 with lr 5e-5, 1e-4 and
# 2e-4; students on 1,681 examples (2 epochs) all stayed at MCC 0, on all of CoLA they reached 0.25 (CE-only 0.20).
MIN_TEACHER_EXAMPLES, MIN_STUDENT_EXAMPLES = 3900, 4000
DEFAULT_BUDGET_MIN = 20.0
# How far one run of each kind says anything: measured over 5 seeds on full CoLA (docs/results.md, the weighting
# table), a MiniLM-L6 student's dev MCC spreads ±0.025 from seed to seed, CE-only and distilled alike.
READING = (
    "demo: one run of each, one seed: a student's dev MCC moves ±0.025 from seed to seed here (5 seeds, full CoLA, "
    "docs/results.md), so the difference of two runs is noise below ~0.07; benchmarks/reproduce.py measures it "
    "over paired seeds"
)


@dataclass(frozen=True)
class Plan:
    bf16: bool
    teacher_rate: float  # training examples/s, in a study
    student_rate: float
    teacher_examples: int
    student_examples: int
    expected_s: float
    extended_from_s: float | None = None  # the budget the plan did not fit into

    def line(self) -> str:
        host = "bf16" if self.bf16 else "float32"
        longer = (
            f"demo: {duration(self.extended_from_s)} are too few on this host for a demo with signal (a teacher "
            f"needs ~{MIN_TEACHER_EXAMPLES:,} CoLA examples, the students ~{MIN_STUDENT_EXAMPLES:,}), so it plans "
            f"the least that has it (--budget-min to refuse instead)\n"
            if self.extended_from_s
            else ""
        )
        return longer + (
            f"demo: {host} host at ~{self.teacher_rate:.0f} examples/s for the teacher and ~{self.student_rate:.0f} "
            f"for the student (measured, as in a study) → teacher (mpnet, 12 layers) fine-tuned 1 epoch on "
            f"{self.teacher_examples:,} CoLA examples, {TRIALS} SinKD trials and a CE-only student (MiniLM, 6 "
            f"layers) {EPOCHS} epochs on {self.student_examples:,}, expect ~{duration(self.expected_s)}"
        )


def plan_for(teacher_rate: float, student_rate: float, bf16: bool, compute_s: float, *, extend: bool = False) -> Plan:
    """The most examples that fit ``compute_s`` seconds (rates as in a study): the teacher's epoch takes
    ``TEACHER_SHARE`` of the time (and its logits for the students' examples), the student runs the rest. Where
    that leaves the teacher or the students fewer examples than show anything, ``extend`` plans those minimums
    (and says how long they take); without it, one line says how long this host needs."""
    available = compute_s - FIXED_S - (TRIALS + 2) * PER_RUN_S
    teacher_eval = COLA_DEV / (EVAL_SPEEDUP * teacher_rate)
    share = max(0.0, TEACHER_SHARE * available - teacher_eval) * teacher_rate
    teacher_examples = int(min(COLA_TRAIN, max(MIN_TEACHER_EXAMPLES, share)))  # the students get the rest
    rates = (teacher_rate, student_rate)
    per_example = _cost(*rates, teacher_examples, 1) - _cost(*rates, teacher_examples, 0)
    student_examples = int(min(COLA_TRAIN, max(0.0, (compute_s - _cost(*rates, teacher_examples, 0)) / per_example)))
    if student_examples >= MIN_STUDENT_EXAMPLES:
        used = _cost(*rates, teacher_examples, student_examples)
        return Plan(bf16, teacher_rate, student_rate, teacher_examples, student_examples, used)
    needed = _cost(*rates, MIN_TEACHER_EXAMPLES, MIN_STUDENT_EXAMPLES)
    if not extend:
        raise SinkdError(
            f"this host trains at ~{teacher_rate:.1f} examples/s (teacher) and ~{student_rate:.1f} (student): "
            f"{duration(compute_s)} leave too few examples for a demo with signal, which needs ~{duration(needed)} "
            "here — give it that (--budget-min) or run it on a faster machine"
        )
    return Plan(
        bf16, teacher_rate, student_rate, MIN_TEACHER_EXAMPLES, MIN_STUDENT_EXAMPLES, needed, extended_from_s=compute_s
    )


def _cost(teacher_rate: float, student_rate: float, teacher_examples: int, student_examples: int) -> float:
    """Seconds of a plan: fixed costs, the teacher's epoch and dev evaluation, its logits for the students'
    examples and dev, then the runs × EPOCHS × (train + evaluate dev)."""
    teacher = teacher_examples / teacher_rate + COLA_DEV / (EVAL_SPEEDUP * teacher_rate)
    logits = (student_examples + COLA_DEV) / (EVAL_SPEEDUP * teacher_rate)
    runs = (TRIALS + 1) * EPOCHS * (student_examples / student_rate + COLA_DEV / (EVAL_SPEEDUP * student_rate))
    return FIXED_S + (TRIALS + 2) * PER_RUN_S + teacher + logits + runs


def measure(model: str, bf16: bool, data_dir: str | None, batch: int, steps: int = 4) -> float:
    """Training examples/s of ``model`` (a classification head) on CoLA batches at ``MAX_LENGTH`` grouped by
    length as the demo trains (``--group-by-length``): a warm-up step on the longest batch, then ``steps`` timed
    forward + backward + AdamW steps on batches spread evenly from the longest to the shortest of a seeded random
    sample (CoLA's first rows are its shortest: measured on them, the demo over-planned its runs twice over)."""
    import numpy as np
    import torch

    from sinkd_ray.config import DistillConfig
    from sinkd_ray.data import GlobalBatchSampler, load_split, make_loader, token_lengths, tokenize_split
    from sinkd_ray.models import load_student
    from sinkd_ray.objective import sinkd_objective
    from sinkd_ray.tasks import get_task

    task = get_task("cola")
    student = load_student(model, task)
    pool = tokenize_split(
        load_split(task, "train", data_dir).shuffle(seed=0).select(range(batch * GlobalBatchSampler.GROUP_BATCHES)),
        task,
        student.tokenizer,
        MAX_LENGTH,
    )
    grouped = GlobalBatchSampler.for_eval(len(pool), batch, lengths=token_lengths(pool)).global_batches()
    picked = [0, *np.linspace(0, len(grouped) - 1, steps).round().astype(int)]
    data = pool.select(np.concatenate([grouped[i] for i in picked]))
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
    return steps * batch / elapsed


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
        # batches of similar lengths: half the padded tokens of random CoLA batches, so about twice the examples
        # in the same minutes (the teacher's fine-tuning too)
        "--group-by-length",
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
    parser.add_argument(
        "--budget-min",
        type=float,
        help="the whole demo, install included (default: 20, or the least with signal where this host needs more; "
        "given, a budget too short for signal is refused)",
    )
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
    teacher_rate = TEACHER_IN_STUDY * measure(TEACHER, bf16, args.data_dir, TEACHER_BATCH_SIZE)
    student_rate = STUDENT_IN_STUDY * measure(STUDENT, bf16, args.data_dir, STUDENT_BATCH)
    spent = time.time() - args.started_at if args.started_at else spent
    budget_min = args.budget_min if args.budget_min is not None else DEFAULT_BUDGET_MIN
    plan = plan_for(teacher_rate, student_rate, bf16, 60 * budget_min - spent, extend=args.budget_min is None)
    print(plan.line() + (f" (after {duration(spent)} of install and measuring)" if spent else ""), flush=True)
    command = study_argv(plan, args)
    if args.dry_run:
        print("python -m sinkd_ray.tune " + " ".join(command))
        return 0
    from sinkd_ray import tune

    code = tune.main(command)
    if code == 0:
        print(READING, flush=True)
    return code


if __name__ == "__main__":
    run_cli(main)
