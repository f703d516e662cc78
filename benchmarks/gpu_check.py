"""The GPU smoke run: what a maintainer runs on the first GPU machine they get, even a bare one.

    python benchmarks/gpu_check.py                      # every row on CUDA device 0: a table, and gpu_check.json
    python benchmarks/gpu_check.py --allow-partial      # exit 0 although rows one GPU cannot cover say NOT COVERED
    python benchmarks/gpu_check.py --device cpu         # the same rows on the CPU at small sizes (what CI runs)

It drives the distillation worker in this process (no Ray for any row that does not need it) on models built from
configs (no hub), and each row asserts what would be broken if that path were: a row reads ok, FAILED (what did not
hold), NOT RUN (an optional package is missing here, e.g. bitsandbytes) or NOT COVERED (this machine cannot, e.g.
multi-rank NCCL on one GPU). Needs torch, transformers, safetensors, datasets (and its small dependencies dill,
multiprocess: carry their wheels to a bare GPU host); Ray and bitsandbytes only for the rows that say so.
Sized for well under 8 minutes on one GPU.

Rows:
  fsdp2-bf16        FSDP2 forced at world size 1 on the device: parameters, gradients and AdamW moments float32,
                    the forward's parameters bfloat16 (MixedPrecisionPolicy), a training step finite
  resume            save, restore and continue on the device equals the uninterrupted run bit for bit (weights,
                    moments, metrics; deterministic algorithms on)
  quantized         8-bit and 4-bit teachers: bitsandbytes module types, its CUDA library loaded, logits close to
                    the full-precision teacher's
  teacher-logits    the teacher's logits through the project's cache path on the device, against CPU float32
  sinkhorn          the chunked exact and the support-cost Sinkhorn losses and gradients on the device against
                    float64 on the CPU
  shared-gpu        two trials sharing one GPU really overlap in time (a 2-trial study with --gpus-per-worker 0.5
                    when Ray is installed; two worker processes on the one device otherwise)
  bert-base-bf16    examples/s of a bf16 training step of a BERT-base-size student (12 layers, hidden 768,
                    b 32, length 128): the README's figure
  multi-rank-nccl   2 FSDP ranks over NCCL equal 1 rank on the global batch (needs 2 GPUs)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@dataclass
class Row:
    name: str
    status: str = "not run"
    detail: str = ""
    figures: dict = field(default_factory=dict)
    wall_s: float = 0.0


class NotRun(Exception):
    """An optional package is missing here: the row says NOT RUN and what to install."""


class NotCovered(Exception):
    """This machine cannot exercise the row (e.g. one GPU for multi-rank NCCL)."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


@dataclass
class Setup:
    device: str  # "cuda" or "cpu"
    work: Path
    small: bool  # CPU rehearsal: smaller sizes
    gpus: int

    @property
    def dev(self):
        import torch

        return torch.device("cuda", 0) if self.device == "cuda" else torch.device("cpu")


# ----------------------------------------------------------------------------------------------- fixtures
def tiny_models(work: Path) -> dict[str, Path]:
    """A BERT student base, a fine-tuned-like BERT teacher (classification head) and a CoLA-format folder, from
    configs (tests/conftest.py's builders: nothing from the hub)."""
    sys.path.insert(0, str(REPO / "tests"))
    import torch
    from conftest import build_tiny_bert, write_cola_fixture

    from sinkd_ray.models import load_student
    from sinkd_ray.tasks import get_task

    out = {"bert": work / "bert", "teacher": work / "teacher", "data": work / "glue"}
    if not (out["teacher"] / "config.json").exists():
        build_tiny_bert(out["bert"])
        torch.manual_seed(0)
        load_student(str(out["bert"]), get_task("cola")).save_pretrained(out["teacher"])
        write_cola_fixture(out["data"], n_train=256, n_dev=64)
    return out


def spec(models: dict, device_gpus: float, **train):
    from sinkd_ray.config import DistillConfig, RunSpec, TrainConfig

    base = dict(
        task="cola",
        student=str(models["bert"]),
        student_layers=2,
        teacher=str(models["teacher"]),
        teacher_source="live",
        data_dir=str(models["data"]),
        max_length=32,
        epochs=1,
        lr=1e-3,
        eval_batch_size=32,
        gpus_per_worker=device_gpus,
    )
    return RunSpec(TrainConfig(**{**base, **train}), DistillConfig(batch_size=16))


# --------------------------------------------------------------------------------------------------- rows
def row_fsdp2_bf16(s: Setup, models: dict) -> dict:
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from sinkd_ray.data import make_loader
    from sinkd_ray.worker import DistillRecipe, WorkerContext, shard_student

    backend = "nccl" if s.device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        recipe = DistillRecipe(spec(models, 1.0 if s.device == "cuda" else 0.0, bf16=True), WorkerContext(0, 1, s.dev))
        recipe.setup()
        shard_student(recipe.student, 1, s.dev, bf16=True)  # the worker shards only with 2+ ranks: forced here
        recipe.optimizer = recipe._optimizer()
        seen = {}
        layer = recipe.student.transformer_layers()[0]

        def record(module, args) -> None:  # a pre-hook's return value would replace the inputs
            seen.setdefault("forward", next(module.parameters()).dtype)

        hook = layer.register_forward_pre_hook(record)
        batch = next(iter(make_loader(recipe.train_ds, recipe.student.tokenizer, list(recipe.sampler)[:1])))
        parts = recipe._step_batch(batch)
        hook.remove()
        params = list(recipe.student.hf_model.parameters())
        check(all(isinstance(p, DTensor) for p in params), "FSDP2 did not shard every parameter into a DTensor")
        check({p.dtype for p in params} == {torch.float32}, f"master parameters { ({p.dtype for p in params}) }")
        check(seen.get("forward") == torch.bfloat16, f"forward ran with {seen.get('forward')} parameters, not bf16")
        grads = {p.grad.dtype for p in params if p.grad is not None}
        check(grads == {torch.float32}, f"gradient dtypes {grads}")
        recipe._optimizer_step()
        moments = {v.dtype for st in recipe.optimizer.state.values() for k, v in st.items() if k != "step"}
        check(moments == {torch.float32}, f"AdamW moment dtypes {moments}")
        check(math.isfinite(float(parts["total"])), "the step's loss is not finite")
        return {"loss": round(float(parts["total"]), 4), "forward dtype": str(seen["forward"])}
    finally:
        dist.destroy_process_group()


def row_resume(s: Setup, models: dict) -> dict:
    import shutil

    import torch
    from safetensors.torch import load_file

    from sinkd_ray.config import RunSpec, TrainConfig
    from sinkd_ray.worker import WorkerContext, distill

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's deterministic workspace
    torch.use_deterministic_algorithms(True, warn_only=False)
    try:
        base = spec(models, 1.0 if s.device == "cuda" else 0.0, eval_every_steps=2, epochs=2, bf16=False)
        if s.small:
            base = RunSpec(TrainConfig(**{**base.train.to_dict(), "max_train_examples": 96}), base.distill)
        ctx = WorkerContext(0, 1, s.dev)

        def collect(run, tag, resume=None):
            kept = {}

            def report(metrics, directory):
                target = s.work / tag / f"step{metrics['step']}"
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(directory, target)
                kept[metrics["step"]] = (metrics, target)

            distill(run, report=report, ctx=ctx, resume_dir=resume)
            return kept

        whole = collect(base, "whole")
        faulty = RunSpec(TrainConfig(**{**base.train.to_dict(), "fault_at_step": 5}), base.distill)
        try:
            collect(faulty, "faulty")
            raise AssertionError("the injected fault did not fire")
        except RuntimeError as err:
            check("injected fault" in str(err), f"unexpected error {err}")
        resumed = collect(faulty, "resumed", resume=s.work / "faulty" / "step4")
        last = max(whole)
        check(sorted(resumed) == [k for k in sorted(whole) if k > 4], f"resumed steps {sorted(resumed)}")
        for step in resumed:
            a, b = whole[step][0], resumed[step][0]
            keys = [k for k in a if k.startswith(("dev_", "train_"))]
            check({k: a[k] for k in keys} == {k: b[k] for k in keys}, f"metrics differ at step {step}")
        w, r = (load_file(str(x[last][1] / "shards" / "rank0.safetensors")) for x in (whole, resumed))
        different = [k for k in w if not torch.equal(w[k], r[k])]
        check(not different, f"{len(different)} tensors differ after resuming, e.g. {different[:2]}")
        return {"tensors compared": len(w), "steps": last}
    finally:
        torch.use_deterministic_algorithms(False)


def row_quantized(s: Setup, models: dict) -> dict:
    if s.device != "cuda":
        raise NotCovered("bitsandbytes' 8-bit / 4-bit kernels are the CUDA ones this row checks")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise NotRun("bitsandbytes is not installed here (pip install bitsandbytes)") from None
    import torch

    from sinkd_ray.models import load_teacher
    from sinkd_ray.tasks import get_task

    task = get_task("cola")
    full = load_teacher(str(models["teacher"]), task, dtype=torch.float32, device=s.dev)
    ids = torch.randint(5, 100, (8, 16), device=s.dev)
    reference = full(input_ids=ids, attention_mask=torch.ones_like(ids)).float()
    figures = {}
    library = getattr(getattr(bnb, "cextension", None), "lib", None)
    library_name = str(getattr(library, "_name", library))
    check("cuda" in library_name.lower(), f"bitsandbytes loaded {library_name!r}, not its CUDA library")
    for kind, cls in (("8bit", bnb.nn.Linear8bitLt), ("4bit", bnb.nn.Linear4bit)):
        teacher = load_teacher(str(models["teacher"]), task, quantization=kind, device=s.dev)
        linears = [m for m in teacher.hf_model.modules() if isinstance(m, cls)]
        check(linears, f"no {cls.__name__} modules in the {kind} teacher")
        logits = teacher(input_ids=ids, attention_mask=torch.ones_like(ids)).float()
        error = float((logits - reference).abs().max())
        check(error < 0.5, f"{kind} logits off by {error:.3f}")
        figures[f"{kind} modules"], figures[f"{kind} max error"] = len(linears), round(error, 4)
    figures["library"] = Path(library_name).name
    return figures


def row_teacher_logits(s: Setup, models: dict) -> dict:
    import torch

    from sinkd_ray.teacher_cache import LogitsRequest, cached_teacher_logits, load_teacher_logits

    figures = {}
    cpu = LogitsRequest(str(models["teacher"]), "cola", "train", str(models["data"]), max_length=32)
    reference = cpu.compute("cpu")
    for bf16, tolerance in ((False, 1e-3), (True, 0.1)):
        request = LogitsRequest(
            str(models["teacher"]),
            "cola",
            "train",
            str(models["data"]),
            max_length=32,
            bf16=bf16 and s.device == "cuda",
            dtype="bfloat16" if bf16 and s.device == "cuda" else "float32",
        )
        cache = s.work / "cache" / ("bf16" if bf16 else "fp32")
        path, computed = cached_teacher_logits(request, cache, compute=lambda r: r.compute(s.dev))
        check(computed, "the cache answered a request it had never seen")
        again, computed_again = cached_teacher_logits(request, cache, compute=lambda r: 1 / 0)
        check(again == path and not computed_again, "a second request recomputed the logits")
        logits = load_teacher_logits(path)
        error = float((logits - reference).abs().max())
        agree = float((logits.argmax(-1) == reference.argmax(-1)).float().mean())
        tag = "bf16" if request.bf16 else "fp32"
        check(logits.dtype == torch.float32 and logits.shape == reference.shape, f"{tag} cache {logits.shape}")
        check(error <= tolerance and agree >= 0.98, f"{tag} logits: max error {error:.2e}, argmax agreement {agree}")
        figures[f"{tag} max error"], figures[f"{tag} argmax agree"] = float(f"{error:.2e}"), agree
    return figures


def row_sinkhorn(s: Setup, models: dict) -> dict:
    import torch

    from sinkd_ray.losses import sinkhorn_cost, sinkhorn_loss, support_l1_cost, vocabulary_support

    b, d = (64, 4000) if s.small else (256, 32000)
    g = torch.Generator().manual_seed(0)
    zipf = -torch.log1p(torch.arange(d, dtype=torch.float64))[torch.randperm(d, generator=g)]
    t_logits = 2 * zipf + torch.randn(b, d, generator=g, dtype=torch.float64)
    s_logits = 4 * zipf + torch.randn(b, d, generator=g, dtype=torch.float64)
    figures = {}
    for cost in ("exact", "support"):
        values, grads = {}, {}
        for where, dtype in (("cpu64", torch.float64), (s.device, torch.float32)):
            z = s_logits.to(s.dev if where == s.device else "cpu", dtype).requires_grad_()
            teacher = torch.softmax(t_logits.to(z.device, dtype) / 2, -1)
            student = torch.softmax(z / 2, -1)
            if cost == "support":
                # the same kept columns on both sides: the comparison is of the arithmetic, not of the selection
                support = vocabulary_support(teacher.detach().cpu().double(), student.detach().cpu().double())
                coarse, _ = support_l1_cost(student, teacher, support.to(z.device))
                value = sinkhorn_cost(coarse, 0.1, 20)
            else:
                value = sinkhorn_loss(teacher, student, cost="exact")
            (grads[where],) = torch.autograd.grad(value, z)
            values[where] = float(value)
        rel = abs(values[s.device] - values["cpu64"]) / abs(values["cpu64"])
        a, c = grads[s.device].double().cpu().flatten(), grads["cpu64"].flatten()
        cosine = float(torch.nn.functional.cosine_similarity(a, c, 0))
        check(rel < 1e-4 and cosine > 0.9999, f"{cost}: loss rel. error {rel:.1e}, gradient cosine {cosine:.6f}")
        figures[f"{cost} rel err"], figures[f"{cost} grad cos"] = float(f"{rel:.1e}"), round(cosine, 7)
    figures["b x d"] = f"{b} x {d}"
    return figures


def row_shared_gpu(s: Setup, models: dict) -> dict:
    if s.device == "cuda" and s.gpus < 1:
        raise NotCovered("no GPU")
    script = s.work / "one_trial.py"
    script.write_text(
        "import json, sys, time, torch\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from sinkd_ray.config import DistillConfig, RunSpec, TrainConfig\n"
        "from sinkd_ray.worker import WorkerContext, distill\n"
        "spec = RunSpec.from_dict(json.loads(sys.argv[1]))\n"
        "device = torch.device(sys.argv[2])\n"
        "t0 = time.time()\n"
        "distill(spec, report=lambda m, d: None, ctx=WorkerContext(0, 1, device), checkpoint=False)\n"
        "print(json.dumps({'start': t0, 'end': time.time()}))\n"
    )
    run = spec(models, 0.5 if s.device == "cuda" else 0.0, epochs=1 if s.small else 8, bf16=False)
    device = "cuda:0" if s.device == "cuda" else "cpu"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), json.dumps(run.to_dict()), device], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    spans = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        check(proc.returncode == 0, f"a trial process failed ({proc.returncode})")
        spans.append(json.loads(out.strip().splitlines()[-1]))
    overlap = min(x["end"] for x in spans) - max(x["start"] for x in spans)
    longest = max(x["end"] - x["start"] for x in spans)
    check(overlap > 0.5 * longest, f"the two trials overlapped {overlap:.1f} s of {longest:.1f} s")
    how = "2 worker processes on one device (Ray's fractional GPUs are rehearsed by the test suite)"
    return {"overlap s": round(overlap, 1), "longest s": round(longest, 1), "how": how}


def row_bert_base(s: Setup, models: dict) -> dict:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from sinkd_ray.config import DistillConfig
    from sinkd_ray.objective import sinkd_objective

    layers, hidden, length, batch = (2, 128, 64, 16) if s.small else (12, 768, 128, 32)
    config = BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(2, hidden // 64),
        intermediate_size=4 * hidden,
        num_labels=2,
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).to(s.dev).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    cfg = DistillConfig(batch_size=batch)
    ids = torch.randint(1000, config.vocab_size, (batch, length), device=s.dev)
    mask, labels = torch.ones_like(ids), torch.randint(0, 2, (batch,), device=s.dev)
    teacher = torch.randn(batch, 2, device=s.dev)
    if s.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    def step():
        with torch.autocast(s.dev.type, dtype=torch.bfloat16):
            logits = model(input_ids=ids, attention_mask=mask).logits
        loss, _ = sinkd_objective(logits.float(), teacher, labels, cfg)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(3):
        step()
    sync = torch.cuda.synchronize if s.device == "cuda" else (lambda: None)
    sync()
    steps = 5 if s.small else 30
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    rate = steps * batch / (time.perf_counter() - t0)
    check(math.isfinite(float(loss)), "the bf16 step's loss is not finite")
    peak = torch.cuda.max_memory_allocated() / 2**30 if s.device == "cuda" else None
    return {
        "examples/s": round(rate, 1),
        "model": f"{layers} layers, hidden {hidden}, b {batch}, length {length}",
        **({"peak GiB": round(peak, 2)} if peak else {}),
    }


def _nccl_rank(rank: int, world: int, port: int, run_dict: dict, out: str) -> None:
    import torch
    import torch.distributed as dist

    from sinkd_ray.config import RunSpec
    from sinkd_ray.worker import WorkerContext, distill

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        seen = []
        ctx = WorkerContext(rank, world, torch.device("cuda", rank))
        distill(RunSpec.from_dict(run_dict), report=lambda m, d: seen.append(m), ctx=ctx, checkpoint=False)
        if rank == 0:
            Path(out).write_text(json.dumps(seen))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def row_multi_rank(s: Setup, models: dict) -> dict:
    if s.device != "cuda" or s.gpus < 2:
        raise NotCovered(f"needs 2 GPUs ({s.gpus} here): NCCL refuses two ranks on one device")
    import torch.multiprocessing as mp

    from sinkd_ray.worker import WorkerContext, distill

    run = spec(models, 1.0, bf16=False)
    one: list = []
    distill(run, report=lambda m, d: one.append(m), ctx=WorkerContext(0, 1, s.dev), checkpoint=False)
    two = with_workers(run, 2)
    out = s.work / "two.json"
    mp.spawn(_nccl_rank, args=(2, free_port(), two.to_dict(), str(out)), nprocs=2, join=True)
    both = json.loads(out.read_text())
    for a, b in zip(one, both):
        check(abs(a["train_total"] - b["train_total"]) < 1e-3, f"2 ranks {b['train_total']} vs 1 {a['train_total']}")
    return {"evaluations compared": len(one)}


def with_workers(run, workers: int):
    from sinkd_ray.config import RunSpec, TrainConfig

    return RunSpec(TrainConfig(**{**run.train.to_dict(), "workers": workers}), run.distill)


ROWS = {
    "fsdp2-bf16": row_fsdp2_bf16,
    "resume": row_resume,
    "quantized": row_quantized,
    "teacher-logits": row_teacher_logits,
    "sinkhorn": row_sinkhorn,
    "shared-gpu": row_shared_gpu,
    "bert-base-bf16": row_bert_base,
    "multi-rank-nccl": row_multi_rank,
}


# --------------------------------------------------------------------------------------------------- main
def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_row(name: str, setup: Setup, models: dict) -> Row:
    row, t0 = Row(name), time.monotonic()
    try:
        row.figures = ROWS[name](setup, models) or {}
        row.status = "ok"
    except NotRun as reason:
        row.status, row.detail = "NOT RUN", str(reason)
    except NotCovered as reason:
        row.status, row.detail = "NOT COVERED", str(reason)
    except Exception as err:  # AssertionError: what did not hold; anything else: the path is broken
        row.status = "FAILED"
        row.detail = f"{type(err).__name__}: {err}"[:300]
        (setup.work / f"{name}.traceback").write_text(traceback.format_exc())
    row.wall_s = round(time.monotonic() - t0, 1)
    return row


def table(rows: list[Row]) -> str:
    cells = [("row", "status", "figures / why", "wall s")]
    for r in rows:
        what = ", ".join(f"{k} {v}" for k, v in r.figures.items()) if r.status == "ok" else r.detail
        cells.append((r.name, r.status, what, f"{r.wall_s:.0f}"))
    widths = [min(90, max(len(c[i]) for c in cells)) for i in range(4)]
    lines = [" | ".join(c[i][:90].ljust(widths[i]) for i in range(4)) for c in cells]
    return "\n".join([lines[0], "-+-".join("-" * w for w in widths), *lines[1:]])


def main(argv: list[str] | None = None) -> int:
    from sinkd_ray.errors import SinkdError

    parser = argparse.ArgumentParser(
        prog="python benchmarks/gpu_check.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__[__doc__.index("Rows:") :],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: the rows at small sizes")
    parser.add_argument("--rows", help=f"comma-separated, from: {', '.join(ROWS)} (default: all)")
    parser.add_argument("--allow-partial", action="store_true", help="exit 0 with NOT COVERED / NOT RUN rows")
    parser.add_argument("--work-dir", help="models, data and checkpoints (default: a new temporary folder)")
    parser.add_argument("--json", help="where the rows' results go (default: gpu_check.json in the work dir)")
    args = parser.parse_args(argv)
    names = [r.strip() for r in (args.rows or ",".join(ROWS)).split(",") if r.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SinkdError(f"--rows: unknown row(s) {unknown} — choose from {', '.join(ROWS)}")
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.device == "cuda" and gpus == 0:
        raise SinkdError(
            f"no CUDA device present (torch {torch.__version__}, CUDA {torch.version.cuda}) — run this on a GPU "
            "machine, or rehearse the rows on this CPU with --device cpu"
        )
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu_check_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    setup = Setup(args.device, work, small=args.device == "cpu", gpus=gpus)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    where = torch.cuda.get_device_name(0) + f" x{gpus}" if args.device == "cuda" else "CPU"
    print(f"gpu_check on {where}, torch {torch.__version__}; work dir {work}", flush=True)
    models = tiny_models(work)
    rows = []
    for name in names:
        rows.append(run_row(name, setup, models))
        print(f"  {name}: {rows[-1].status} {rows[-1].detail}".rstrip(), flush=True)
    print("\n" + table(rows))
    report = Path(args.json) if args.json else work / "gpu_check.json"
    report.write_text(json.dumps({"device": where, "torch": torch.__version__, "rows": [asdict(r) for r in rows]}))
    print(f"\nwrote {report}")
    failed = [r.name for r in rows if r.status == "FAILED"]
    partial = [r.name for r in rows if r.status in ("NOT RUN", "NOT COVERED")]
    if failed or (partial and not args.allow_partial):
        hint = "" if failed else " (--allow-partial to accept them)"
        print(f"not all rows ok: failed {failed}, not covered / not run {partial}{hint}")
        return 1
    return 0


if __name__ == "__main__":
    from sinkd_ray.cli import run_cli

    run_cli(main)
