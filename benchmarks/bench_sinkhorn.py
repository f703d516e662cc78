"""Batch-wise Sinkhorn loss: this project's implementation vs the authors' released algorithm, side by side.

    python benchmarks/bench_sinkhorn.py              # full table (several minutes on 2 CPU cores)
    python benchmarks/bench_sinkhorn.py --quick      # smoke run, seconds
    python benchmarks/bench_sinkhorn.py --domains    # the exp- vs log-domain measurement behind EXP_DOMAIN_MAX_SPREAD
    python benchmarks/bench_sinkhorn.py --envelope   # how far the envelope gradient is from the unrolled one

Both sides compute the same number (ours with the "released" preset: unit marginals, ×0.001, T = 20,
λ = 0.1, τ_SD = 2, p = 1), from student logits (b × d) with requires_grad to the loss and back:
  - released: exp domain, alternating full (b × b) row/column normalisation, autograd through all 20
    iterations (``losses.released_sinkhorn_reference``, the algorithm of github.com/2018cx/SinKD loss.py);
  - ours: ``losses.sinkhorn_loss`` (scaling vectors, hand-written reverse pass saving C and 2T+1 vectors).
Time: forward + backward, median of the repeats after one warm-up. Memory: bytes of the tensors autograd
keeps for backward (``torch.autograd.graph.saved_tensors_hooks``, which also sees custom Functions'
``save_for_backward``; storages counted once). Targets at b ≥ 1024: time ratio ≤ 0.5, memory ratio ≤ 0.1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sinkd_ray.losses import SINKHORN_PRESETS, released_sinkhorn_reference, sinkhorn_cost, sinkhorn_loss

TAU_SD, T_ITERS = 2.0, 20


def ours(teacher_probs, student_probs):
    return sinkhorn_loss(teacher_probs, student_probs, **SINKHORN_PRESETS["released"])


def released(teacher_probs, student_probs):
    return released_sinkhorn_reference(teacher_probs, student_probs)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def available_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info()[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def run_once(method, teacher_logits, student_logits, device, measure_memory=False):
    """One forward + backward; returns (seconds, saved bytes or None, loss value, gradient)."""
    student_logits.grad = None
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    sync(device)
    start = time.perf_counter()
    if measure_memory:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = method(torch.softmax(teacher_logits / TAU_SD, -1), torch.softmax(student_logits / TAU_SD, -1))
    else:
        loss = method(torch.softmax(teacher_logits / TAU_SD, -1), torch.softmax(student_logits / TAU_SD, -1))
    loss.backward()
    sync(device)
    seconds = time.perf_counter() - start
    return seconds, (sum(saved.values()) if measure_memory else None), loss.item(), student_logits.grad.clone()


def measure(method, teacher_logits, student_logits, device, repeats):
    _, saved, value, grad = run_once(method, teacher_logits, student_logits, device, measure_memory=True)
    times = [run_once(method, teacher_logits, student_logits, device)[0] for _ in range(repeats)]
    return statistics.median(times), saved, value, grad


def comparison_table(sizes, repeats, device):
    header = (f"{'b':>5} {'d':>6} | {'ours s':>8} {'released s':>10} {'ratio':>6} | {'ours MiB':>9} "
              f"{'released MiB':>12} {'ratio':>6} | {'value rel.diff':>14} {'grad rel.diff':>13} | target")
    print(header)
    print("-" * len(header))
    warm_teacher, warm_student = torch.randn(64, 3, device=device), torch.randn(64, 3, device=device).requires_grad_()
    for _ in range(5):  # thread pools, allocator and kernels warmed before the first row
        for method in (ours, released):
            run_once(method, warm_teacher, warm_student, device)
    for b, d in sizes:
        g = torch.Generator().manual_seed(b * 7 + d)
        teacher = (torch.randn(b, d, generator=g) * 2).to(device)
        student = (torch.randn(b, d, generator=g) * 2).to(device).requires_grad_()
        t_ours, m_ours, v_ours, g_ours = measure(ours, teacher, student, device, repeats)
        # released: autograd keeps 2T + 2 (b × b) tensors plus K and P∘W; check it can fit before trying
        needed = (2 * T_ITERS + 6) * b * b * 4
        if needed > 0.7 * available_bytes(device):
            print(f"{b:>5} {d:>6} | {t_ours:>8.4f} {'-':>10} {'-':>6} | {m_ours / 2**20:>9.2f} {'-':>12} {'-':>6} | "
                  f"released does not fit: needs ~{needed / 2**30:.1f} GiB, "
                  f"{available_bytes(device) / 2**30:.1f} GiB free")
            continue
        try:
            t_rel, m_rel, v_rel, g_rel = measure(released, teacher, student, device, repeats)
        except (RuntimeError, MemoryError) as error:  # out of memory despite the estimate
            print(f"{b:>5} {d:>6} | {t_ours:>8.4f} released failed: {str(error).splitlines()[0][:60]}")
            continue
        value_diff = abs(v_ours - v_rel) / abs(v_rel)
        grad_diff = ((g_ours - g_rel).norm() / g_rel.norm()).item()
        time_ratio, mem_ratio = t_ours / t_rel, m_ours / m_rel
        verdict = ""
        if b >= 1024:
            verdict = "PASS" if time_ratio <= 0.5 and mem_ratio <= 0.1 else "MISS"
        print(f"{b:>5} {d:>6} | {t_ours:>8.4f} {t_rel:>10.4f} {time_ratio:>6.2f} | {m_ours / 2**20:>9.2f} "
              f"{m_rel / 2**20:>12.2f} {mem_ratio:>6.3f} | {value_diff:>14.1e} {grad_diff:>13.1e} | {verdict}")


def domains_table():
    """Exp-domain accuracy vs a float64 log-domain reference as the spread (max C − min C)/λ grows."""
    print("exp-domain iterations vs float64 log-domain reference, T = 20, b = 64, worst of 3 draws;")
    print("cost: uniform in [0, 0.1] with one student row shifted by +1 (no teacher near it: the hard case)")
    print(f"{'dtype':>8} {'spread':>7} | {'value rel.err':>13} {'grad rel.err':>12} | non-finite")
    for dtype, spreads in ((torch.float32, (20, 40, 50, 60, 80, 90, 100, 120)),
                           (torch.float64, (300, 350, 500, 700, 750, 800))):
        for spread in spreads:
            worst_value = worst_grad = 0.0
            bad = 0
            for seed in range(3):
                g = torch.Generator().manual_seed(seed)
                cost = torch.rand(64, 64, generator=g, dtype=torch.float64) * 0.1
                cost[0] += 1.0
                lam = ((cost.max() - cost.min()) / spread).item()
                ref_cost = cost.clone().requires_grad_()
                ref = sinkhorn_cost(ref_cost, lam, T_ITERS, domain="log")
                (ref_grad,) = torch.autograd.grad(ref, ref_cost)
                x = cost.to(dtype).requires_grad_()
                value = sinkhorn_cost(x, lam, T_ITERS, domain="exp")
                (grad,) = torch.autograd.grad(value, x)
                if not (torch.isfinite(value) and torch.isfinite(grad).all()):
                    bad += 1
                    continue
                worst_value = max(worst_value, abs(value.item() - ref.item()) / abs(ref.item()))
                worst_grad = max(worst_grad, ((grad.double() - ref_grad).abs().max() / ref_grad.abs().max()).item())
            print(f"{str(dtype).split('.')[-1]:>8} {spread:>7} | {worst_value:>13.1e} {worst_grad:>12.1e} | {bad}/3")
    print("\nforward + backward seconds, float32, λ = 0.1, random costs in [0, 2]:")
    print(f"{'b':>5} | {'exp':>8} {'log':>8}")
    for b in (256, 1024, 4096):
        row = []
        for domain in ("exp", "log"):
            cost = (torch.rand(b, b) * 2).requires_grad_()
            start = time.perf_counter()
            sinkhorn_cost(cost, 0.1, T_ITERS, domain=domain).backward()
            row.append(time.perf_counter() - start)
        print(f"{b:>5} | {row[0]:>8.3f} {row[1]:>8.3f}")


def envelope_table():
    """Relative L2 difference of the student-logit gradient, envelope vs unrolled (5 draws each)."""
    print("‖∇_unrolled − ∇_envelope‖ / ‖∇_unrolled‖ (student logits), λ = 0.1, T = 20, τ_SD = 2")
    print(f"{'d':>4} {'b':>5} | min   median max")
    for d in (2, 3, 50):
        for b in (16, 64, 256):
            diffs = []
            for seed in range(5):
                g = torch.Generator().manual_seed(seed)
                teacher = torch.softmax(torch.randn(b, d, generator=g) * 2 / TAU_SD, -1)
                logits = (torch.randn(b, d, generator=g) * 2).requires_grad_()
                grads = [torch.autograd.grad(sinkhorn_loss(teacher, torch.softmax(logits / TAU_SD, -1), grad=mode),
                                             logits)[0] for mode in ("unrolled", "envelope")]
                diffs.append(((grads[0] - grads[1]).norm() / grads[0].norm()).item())
            print(f"{d:>4} {b:>5} | {min(diffs):.2f}  {statistics.median(diffs):.2f}  {max(diffs):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 repeat (smoke run)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per cell (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--domains", action="store_true", help="print the exp/log-domain measurement instead")
    parser.add_argument("--envelope", action="store_true", help="print the envelope-gradient difference instead")
    args = parser.parse_args()
    if args.domains:
        return domains_table()
    if args.envelope:
        return envelope_table()
    device = torch.device(args.device)
    print(f"device: {device} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"T = {T_ITERS}, λ = 0.1, τ_SD = 2, float32")
    if args.quick:
        sizes, repeats = [(16, 2), (64, 3), (256, 3), (16, 50257)], 1
    else:
        sizes = [(b, d) for d in (2, 3) for b in (16, 64, 256, 1024, 4096)]
        sizes += [(b, 50257) for b in (16, 64, 256)]
        repeats = args.repeats
    comparison_table(sizes, repeats, device)


if __name__ == "__main__":
    main()
