"""Batch-wise Sinkhorn loss: this project's implementation vs the authors' released algorithm, side by side.

    python benchmarks/bench_sinkhorn.py              # full table (several minutes on 2 CPU cores)
    python benchmarks/bench_sinkhorn.py --quick      # smoke run, seconds
    python benchmarks/bench_sinkhorn.py --domains    # the exp- vs log-domain measurement behind EXP_DOMAIN_MAX_SPREAD
    python benchmarks/bench_sinkhorn.py --envelope   # how far the envelope gradient is from the unrolled one
    python benchmarks/bench_sinkhorn.py --vocab      # vocabulary-level b × b cost: exact vs support (+ tail bucket)
    python benchmarks/bench_sinkhorn.py --vocab-crossover  # the measurement behind cost="auto"'s thresholds

Both sides compute the same number (ours with the "released" preset: unit marginals, ×0.001, T = 20,
λ = 0.1, τ_SD = 2, p = 1), from student logits (b × d) with requires_grad to the loss and back:
  - released: exp domain, alternating full (b × b) row/column normalisation, autograd through all 20
    iterations (``losses.released_sinkhorn_reference``, the algorithm of github.com/2018cx/SinKD loss.py);
  - ours: ``losses.sinkhorn_loss`` (scaling vectors, hand-written reverse pass saving C and 2T+1 vectors).
Time: forward + backward, median of the repeats after one warm-up. Memory: bytes of the tensors autograd
keeps for backward (``torch.autograd.graph.saved_tensors_hooks``, which also sees custom Functions'
``save_for_backward``; storages counted once). Targets at b ≥ 1024: time ratio ≤ 0.5, memory ratio ≤ 0.1.

``--vocab``: the batch-wise cost on a vocabulary, exact vs ``cost="auto"`` (kept columns plus a tail bucket,
``losses.support_l1_cost``), on SmolLM2-135M vs its first 6 layers (real CoLA prompts; logits computed once and
cached under $SINKD_CACHE_DIR), random and peaked logits. Targets on the real rows at b ∈ {256, 1024}: forward +
backward ≥ 10× faster, loss within 1 %, gradient cosine ≥ 0.99, peak memory no larger.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sinkd_ray.losses import (
    SINKHORN_PRESETS,
    SUPPORT_MAX_TAIL_MASS,
    choose_batch_cost,
    released_sinkhorn_reference,
    sinkhorn_cost,
    sinkhorn_loss,
    sinkhorn_plan,
    support_l1_cost,
    vocabulary_support,
)

TAU_SD, T_ITERS = 2.0, 20


def ours(teacher_probs, student_probs):
    return sinkhorn_loss(teacher_probs, student_probs, cost="exact", **SINKHORN_PRESETS["released"])


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
    header = (
        f"{'b':>5} {'d':>6} | {'ours s':>8} {'released s':>10} {'ratio':>6} | {'ours MiB':>9} "
        f"{'released MiB':>12} {'ratio':>6} | {'value rel.diff':>14} {'grad rel.diff':>13} | target"
    )
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
            print(
                f"{b:>5} {d:>6} | {t_ours:>8.4f} {'-':>10} {'-':>6} | {m_ours / 2**20:>9.2f} {'-':>12} {'-':>6} | "
                f"released does not fit: needs ~{needed / 2**30:.1f} GiB, "
                f"{available_bytes(device) / 2**30:.1f} GiB free"
            )
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
        print(
            f"{b:>5} {d:>6} | {t_ours:>8.4f} {t_rel:>10.4f} {time_ratio:>6.2f} | {m_ours / 2**20:>9.2f} "
            f"{m_rel / 2**20:>12.2f} {mem_ratio:>6.3f} | {value_diff:>14.1e} {grad_diff:>13.1e} | {verdict}"
        )


def domains_table():
    """Exp-domain accuracy vs a float64 log-domain reference as the spread (max C − min C)/λ grows."""
    print("exp-domain iterations vs float64 log-domain reference, T = 20, b = 64, worst of 3 draws;")
    print("cost: uniform in [0, 0.1] with one student row shifted by +1 (no teacher near it: the hard case)")
    print(f"{'dtype':>8} {'spread':>7} | {'value rel.err':>13} {'grad rel.err':>12} | non-finite")
    for dtype, spreads in (
        (torch.float32, (20, 40, 50, 60, 80, 90, 100, 120)),
        (torch.float64, (300, 350, 500, 700, 750, 800)),
    ):
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
                grads = [
                    torch.autograd.grad(sinkhorn_loss(teacher, torch.softmax(logits / TAU_SD, -1), grad=mode), logits)[
                        0
                    ]
                    for mode in ("unrolled", "envelope")
                ]
                diffs.append(((grads[0] - grads[1]).norm() / grads[0].norm()).item())
            print(f"{d:>4} {b:>5} | {min(diffs):.2f}  {statistics.median(diffs):.2f}  {max(diffs):.2f}")


# --------------------------------------------------------------------------------------------------
# Vocabulary-level batch-wise cost: exact (b × b × d) vs kept support plus a tail bucket
# --------------------------------------------------------------------------------------------------

REAL_MODEL, REAL_STUDENT_LAYERS, REAL_MAX_LENGTH, REAL_ROWS = "smollm2-135m", 6, 64, 1024


def real_vocab_logits() -> dict[str, torch.Tensor]:
    """Next-token logits (1024 × 49,152) of SmolLM2-135M (teacher) and its first 6 layers (student) at the answer
    position of the first 1024 CoLA training prompts (bf16 autocast): computed once (~12 min on 2 CPU cores),
    cached under $SINKD_CACHE_DIR (400 MB)."""
    from sinkd_ray.pretrained import cache_root, offline_model_path

    n = REAL_ROWS
    path = cache_root() / f"vocab-logits-{REAL_MODEL}-cola-n{n}-student{REAL_STUDENT_LAYERS}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    from sinkd_ray.data import GlobalBatchSampler, load_split, make_loader, tokenize_split
    from sinkd_ray.models import load_student, load_teacher
    from sinkd_ray.tasks import get_task

    data_dir = os.environ.get("SINKD_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data"
    print(f"computing real logits once ({n} CoLA prompts, teacher + student forward) -> {path}", flush=True)
    task, model_path = get_task("cola"), offline_model_path(REAL_MODEL)
    teacher = load_teacher(model_path, task, logit_space="vocab")
    student = load_student(model_path, task, num_layers=REAL_STUDENT_LAYERS, logit_space="vocab").eval()
    tokenizer = teacher.tokenizer
    tokenized = tokenize_split(
        load_split(task, "train", data_dir).select(range(n)), task, tokenizer, REAL_MAX_LENGTH, prompt=True
    )
    loader = make_loader(tokenized, tokenizer, GlobalBatchSampler(n, min(n, 64), shuffle=False))
    logits = {"teacher": [], "student": []}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for batch in loader:
            for name, model in (("teacher", teacher), ("student", student)):
                logits[name].append(model(batch["input_ids"], batch["attention_mask"]).float())
    logits = {name: torch.cat(parts) for name, parts in logits.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(logits, path)
    return logits


def vocab_case(kind: str, b: int, d: int, real: dict[str, torch.Tensor] | None):
    """(teacher logits, student logits), each (b × d); probabilities are softmax(z / τ_SD) as in the objective.

    real: SmolLM2 teacher vs its 6-layer student (d ≤ 49,152: the first d vocabulary columns, renormalised by
    the softmax); random: z ~ 2·N(0, 1) (flat: both sides spread over all d columns); peaked: the same plus 40 on
    one random column per row (≈ 0.9998 of each row's mass at τ_SD = 2), teacher and student on different columns.
    """
    if kind == "real":
        return real["teacher"][:b, :d].clone(), real["student"][:b, :d].clone()
    g = torch.Generator().manual_seed(b * 7 + d)
    teacher, student = torch.randn(b, d, generator=g) * 2, torch.randn(b, d, generator=g) * 2
    if kind == "peaked":
        rows = torch.arange(b)
        teacher[rows, torch.randint(0, d, (b,), generator=g)] += 40.0
        student[rows, torch.randint(0, d, (b,), generator=g)] += 40.0
    return teacher, student


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_memory(fn, device):
    """(fn(), peak bytes above the start): CUDA peak allocation, or on the CPU the peak resident set size
    (VmHWM after resetting it through /proc/self/clear_refs; glibc's mmap threshold is fixed by `vocab_table`
    so that freed (b × d) buffers return to the OS and one measurement does not hide the next)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - start
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start = _status_kib("VmRSS")
    result = fn()
    return result, (_status_kib("VmHWM") - start) * 1024


class Clock:
    """Wall and process CPU seconds (all threads) since creation: on a CPU shared with other jobs the wall time
    also counts the waits for a core, so both are printed; the CPU time is the steadier of the two there."""

    def __init__(self, device):
        self.device = device
        sync(device)
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        sync(self.device)
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def vocab_step(teacher_logits, student_logits, cost, device):
    """One forward + backward from logits, timed whole and for the loss alone (probabilities in, ∂L/∂s out:
    from the loss call to the moment the backward reaches the student probabilities, a tensor hook; the rest
    is the two softmaxes and their backward, the same in both paths).
    Returns ({"loss": (wall, cpu), "total": (wall, cpu)}, loss, ∇ student logits, ∇ student probabilities)."""
    student_logits.grad = None
    marks = {}
    clock = Clock(device)
    student = torch.softmax(student_logits / TAU_SD, -1)
    teacher = torch.softmax(teacher_logits / TAU_SD, -1)
    student.retain_grad()  # for the ∇s column; one (b × d) buffer more, in both paths alike
    student.register_hook(lambda grad: marks.setdefault("reached", clock.read()) and None)
    marks["called"] = clock.read()
    loss = sinkhorn_loss(teacher, student, cost=cost)
    loss.backward()
    total = clock.read()
    loss_only = tuple(reached - called for reached, called in zip(marks["reached"], marks["called"]))
    return {"loss": loss_only, "total": total}, loss.item(), student_logits.grad.clone(), student.grad.clone()


def vocab_measure(teacher_logits, student_logits, cost, device, repeats):
    """Memory and value of the first run; times = that run's if it took > 20 s, else the medians of ``repeats``
    runs (at least 9 when a run takes < 5 s: a step of many small ops varies 2× on a shared CPU)."""
    (times, value, grad_z, grad_s), peak = peak_memory(
        lambda: vocab_step(teacher_logits, student_logits, cost, device), device
    )
    if times["total"][0] < 20:
        runs = [
            vocab_step(teacher_logits, student_logits, cost, device)[0]
            for _ in range(repeats if times["total"][0] > 5 else max(repeats, 9))
        ]
        times = {part: tuple(statistics.median(run[part][i] for run in runs) for i in range(2)) for part in times}
    return times, peak, value, grad_z, grad_s


def _cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), 0).item()


def vocab_table(sizes, kinds, repeats, device):
    """Exact vs `cost="auto"` per (b, d, kind); the bound is the support cost's own (`support_l1_cost`)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: buffers ≥ 1 MiB are mmapped, and unmapped when freed
    print(
        f"device: {device} ({torch.get_num_threads()} threads), torch {torch.__version__}, T = {T_ITERS}, "
        f"λ = 0.1, τ_SD = 2, p = 1, float32, mass 'unit', max_tail_mass = {SUPPORT_MAX_TAIL_MASS}"
    )
    print("loss: sinkhorn_loss forward + backward to the student probabilities (process CPU s, all threads; wall s);")
    print("with softmax: the same from logits, both softmaxes and their backward included (CPU); speed-up = exact /")
    print("auto; mem: peak memory above the start of the step from logits (CPU: resident set); path: what")
    print("cost='auto' chose (when it keeps the exact cost, auto = exact + the time to decide); K: kept columns;")
    print("bound: max_ij W_ij / L̃ (each cost entry C_ij lies in [C̃_ij, C̃_ij + W_ij], W_ij = 2·min(S_i, T_j); moving")
    print("every entry by max W moves the loss by exactly max W); plan-wtd: ⟨P̃, W⟩ / ⟨P̃, C̃⟩ (first-order bound)")
    header = (
        f"{'b':>5} {'d':>6} {'kind':>6} | {'loss cpu: exact':>15} {'auto':>6} {'speed-up':>8} | "
        f"{'wall: exact':>11} {'auto':>6} {'speed-up':>8} | {'with softmax':>12} | {'MiB: exact':>10} "
        f"{'auto':>6} | {'path':>7} {'K':>6} | {'loss rel.err':>12} {'cos ∇z':>8} {'cos ∇s':>8} | "
        f"{'bound':>7} {'plan-wtd':>8}"
    )
    print(header)
    print("-" * len(header))
    real = real_vocab_logits() if "real" in kinds else None
    for _ in range(3):  # thread pools and allocator warmed before the first row
        warm_t, warm_s = torch.randn(64, 4096, device=device), torch.randn(64, 4096, device=device).requires_grad_()
        for cost in ("exact", "support"):
            vocab_step(warm_t, warm_s, cost, device)
    for b, d in sizes:
        for kind in kinds:
            d_row = min(d, real["teacher"].shape[1]) if kind == "real" else d  # SmolLM2 has 49,152 columns
            teacher, student = (x.to(device) for x in vocab_case(kind, b, d_row, real))
            student.requires_grad_()
            t_exact, m_exact, v_exact, gz_exact, gs_exact = vocab_measure(teacher, student, "exact", device, repeats)
            with torch.no_grad():
                t_probs, s_probs = torch.softmax(teacher / TAU_SD, -1), torch.softmax(student / TAU_SD, -1)
                clock = Clock(device)
                support = choose_batch_cost(t_probs, s_probs, cost="auto")
                decide = clock.read()
            if support is None:  # auto kept the exact cost: the same computation, plus the time to decide
                found = vocabulary_support(t_probs, s_probs)
                k = found.numel() if found is not None else d_row
                t_auto = {part: tuple(x + y for x, y in zip(times, decide)) for part, times in t_exact.items()}
                m_auto, v_auto, gz_auto, gs_auto = m_exact, v_exact, gz_exact, gs_exact
                path, bound, weighted = "exact", 0.0, 0.0
            else:
                t_auto, m_auto, v_auto, gz_auto, gs_auto = vocab_measure(teacher, student, "auto", device, repeats)
                with torch.no_grad():
                    cost, slack = support_l1_cost(s_probs, t_probs, support)
                    plan = sinkhorn_plan(cost)
                k, path = support.numel(), "support"
                loss = (plan * cost).sum()
                bound, weighted = (slack.max() / loss).item(), ((plan * slack).sum() / loss).item()
            del t_probs, s_probs
            (exact_wall, exact_cpu), (auto_wall, auto_cpu) = t_exact["loss"], t_auto["loss"]
            print(
                f"{b:>5} {d_row:>6} {kind:>6} | {exact_cpu:>15.3f} {auto_cpu:>6.3f} {exact_cpu / auto_cpu:>7.1f}x | "
                f"{exact_wall:>11.3f} {auto_wall:>6.3f} {exact_wall / auto_wall:>7.1f}x | "
                f"{t_exact['total'][1] / t_auto['total'][1]:>11.1f}x | "
                f"{m_exact / 2**20:>10.1f} {m_auto / 2**20:>6.1f} | {path:>7} {k:>6} | "
                f"{abs(v_auto - v_exact) / abs(v_exact):>12.1e} {_cosine(gz_auto, gz_exact):>8.5f} "
                f"{_cosine(gs_auto, gs_exact):>8.5f} | {bound:>7.1e} {weighted:>8.1e}",
                flush=True,
            )


def vocab_crossover(device, repeats):
    """Where the support cost starts to pay: small b on real distributions, and the kept fraction K/d at b = 256."""
    print(
        f"device: {device} ({torch.get_num_threads()} threads); forward + backward from logits, median of "
        f"{repeats}; process CPU s (all threads) and wall s"
    )
    real = real_vocab_logits()

    def median_times(step):
        runs = [step() for _ in range(repeats)]
        return tuple(statistics.median(run[i] for run in runs) for i in range(2))

    print(f"real SmolLM2 distributions, d = 49,152, max_tail_mass = {SUPPORT_MAX_TAIL_MASS}, cost='support' forced")
    print(
        f"{'b':>5} {'b·b·d':>13} | {'exact cpu':>9} {'support cpu':>11} {'ratio':>6} | {'exact wall':>10} "
        f"{'support wall':>12} {'ratio':>6} | {'K':>6}"
    )
    for b in (8, 16, 32, 48, 64, 96, 128):
        teacher, student = (x.to(device) for x in vocab_case("real", b, 49152, real))
        student.requires_grad_()
        times = {
            cost: median_times(lambda t=teacher, s=student, c=cost: vocab_step(t, s, c, device)[0]["total"])
            for cost in ("exact", "support")
        }
        with torch.no_grad():
            k = vocabulary_support(torch.softmax(teacher / TAU_SD, -1), torch.softmax(student / TAU_SD, -1)).numel()
        (exact_wall, exact_cpu), (support_wall, support_cpu) = times["exact"], times["support"]
        print(
            f"{b:>5} {b * b * 49152:>13,} | {exact_cpu:>9.4f} {support_cpu:>11.4f} {exact_cpu / support_cpu:>6.2f} | "
            f"{exact_wall:>10.4f} {support_wall:>12.4f} {exact_wall / support_wall:>6.2f} | {k:>6}",
            flush=True,
        )
    b, d = 256, 49152
    print(f"\nsupport cost at b = {b}, d = {d} with a given kept fraction K/d (random logits, columns chosen evenly)")
    print(
        f"{'K/d':>5} | {'exact cpu':>9} {'support cpu':>11} {'ratio':>6} | {'exact wall':>10} {'support wall':>12} "
        f"{'ratio':>6}"
    )
    teacher, student = (x.to(device) for x in vocab_case("random", b, d, None))
    student.requires_grad_()

    def fixed_support_step(support):
        student.grad = None
        clock = Clock(device)
        cost, _ = support_l1_cost(torch.softmax(student / TAU_SD, -1), torch.softmax(teacher / TAU_SD, -1), support)
        sinkhorn_cost(cost).backward()
        return clock.read()

    exact_wall, exact_cpu = median_times(lambda: vocab_step(teacher, student, "exact", device)[0]["total"])
    for fraction in (0.05, 0.1, 0.25, 0.5):
        support = torch.linspace(0, d - 1, int(fraction * d), device=device).long()
        wall, cpu = median_times(lambda s=support: fixed_support_step(s))
        print(
            f"{fraction:>5.2f} | {exact_cpu:>9.3f} {cpu:>11.3f} {exact_cpu / cpu:>6.2f} | {exact_wall:>10.3f} "
            f"{wall:>12.3f} {exact_wall / wall:>6.2f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 repeat (smoke run)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per cell (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--domains", action="store_true", help="print the exp/log-domain measurement instead")
    parser.add_argument("--envelope", action="store_true", help="print the envelope-gradient difference instead")
    parser.add_argument(
        "--vocab",
        action="store_true",
        help="vocabulary-level batch-wise cost: exact vs cost='auto' (support + tail bucket)",
    )
    parser.add_argument(
        "--vocab-crossover",
        action="store_true",
        help="the measurement behind cost='auto''s size and kept-fraction thresholds",
    )
    parser.add_argument("--b", type=int, nargs="+", default=[256, 1024], help="--vocab: batch sizes")
    parser.add_argument(
        "--d",
        type=int,
        nargs="+",
        default=[32000, 50257],
        help="--vocab: vocabulary sizes (real rows stop at SmolLM2's 49,152)",
    )
    parser.add_argument(
        "--kinds",
        nargs="+",
        default=["real", "random", "peaked"],
        choices=["real", "random", "peaked"],
        help="--vocab: distributions",
    )
    args = parser.parse_args()
    if args.domains:
        return domains_table()
    if args.envelope:
        return envelope_table()
    device = torch.device(args.device)
    if args.vocab:
        sizes = [(b, d) for d in args.d for b in args.b]
        return vocab_table(sizes, args.kinds, 1 if args.quick else args.repeats, device)
    if args.vocab_crossover:
        return vocab_crossover(device, 1 if args.quick else args.repeats)
    print(
        f"device: {device} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
        f"T = {T_ITERS}, λ = 0.1, τ_SD = 2, float32"
    )
    if args.quick:
        sizes, repeats = [(16, 2), (64, 3), (256, 3), (16, 50257)], 1
    else:
        sizes = [(b, d) for d in (2, 3) for b in (16, 64, 256, 1024, 4096)]
        sizes += [(b, 50257) for b in (16, 64, 256)]
        repeats = args.repeats
    comparison_table(sizes, repeats, device)


if __name__ == "__main__":
    main()
