"""The GPU smoke run: what a maintainer runs on the first GPU machine they get (sized for at most 8 minutes on
one GPU: 8 runs of one small epoch, each with its own Ray start-up; not yet timed on a GPU).

    python benchmarks/gpu_check.py                  # everything below, then one table
    python benchmarks/gpu_check.py --dry-run        # print the commands, run nothing (works without a GPU)
    python benchmarks/gpu_check.py --data-dir ../shared/data   # real CoLA instead of a generated one

Every run goes through the command lines a user types (`python -m sinkd_ray.train` / `python -m sinkd_ray.tune`,
each in its own process, each starting its own local Ray runtime), with the offline all-MiniLM-L6-v2 as the
teacher (fine-tuned here for one epoch, itself the first row) and its first 3 layers as the student:

  teacher CE        the teacher's fine-tuning: 1 worker, 1 GPU
  1 worker bf16     distillation (cached teacher logits), --bf16
  1 worker fp32     the same, --no-bf16
  2 workers fault   --workers 2 (NCCL, FSDP2) with --fault-at-step: the run must recover from its checkpoint;
                    needs 2 GPUs (NCCL refuses two ranks on one device), skipped with a note on one GPU
  live 8-bit        --teacher-source live --teacher-quantization 8bit (bitsandbytes LLM.int8 on the GPU)
  2 trials x 0.5    a 2-trial study, --gpus-per-worker 0.5 --max-concurrent-trials 2: two trials share the GPU
  logits GPU / CPU  the teacher's logits over the train split on the GPU (bf16) — where the CLIs compute the
                    cache when the runs use GPUs (a Ray task on a GPU worker) — next to the same on this
                    machine's CPU (where a CPU head would compute it)

For each: the run's status, training examples/s (the median of the per-evaluation figures the CLI prints,
`epoch … step …: dev_metric=… examples/s=…`, the first one left out as warm-up), the last dev metric, the
peak GPU memory (`nvidia-smi` polled every 0.2 s, whole device minus what was in use before the run: it includes
each process's CUDA context) and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROGRESS = re.compile(r"epoch \S+ step (\d+): dev_metric=(\S+) .*examples/s=([\d.]+)")
SPACE = """\
sampler: grid
search:
  lr: {choice: [5.0e-5, 1.0e-4]}
fixed:
  batch_size: 32
  epochs: 1
"""


def write_cola(root: Path, n_train: int, n_dev: int, seed: int = 0) -> Path:
    """A CoLA-format folder (source, label, mark, sentence) with a learnable rule: label 1 iff the predicate is
    a 'good' one. Enough to exercise every code path at realistic sequence lengths; not a quality benchmark."""
    rng = random.Random(seed)
    subjects = ["the man", "a woman", "the old dog", "this cat", "they", "we", "the people", "his sister"]
    good = ["is good", "was great", "is correct", "were good", "is acceptable"]
    bad = ["is bad", "was terrible", "is incorrect", "were bad", "is unacceptable"]
    filler = "yesterday in the small house near the river where the children played all afternoon".split()
    (root / "CoLA").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = []
        for i in range(n):
            label = i % 2
            words = " ".join(rng.sample(filler, rng.randint(3, 12)))
            rows.append(
                f"gc{i}\t{label}\t{'' if label else '*'}\t{rng.choice(subjects)} "
                f"{rng.choice(good if label else bad)} {words} ."
            )
        (root / "CoLA" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return root


class GpuMemoryPeak:
    """Peak of `nvidia-smi --query-gpu=memory.used` (MiB, summed over devices) while the block runs, minus the
    value before it. Per-process counters (torch.cuda.max_memory_allocated) do not see the Ray workers."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self.baseline = self._used()

    @staticmethod
    def _used() -> int:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        return sum(int(x) for x in out.split())

    def _poll(self):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self._used() - self.baseline)
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@dataclass
class Run:
    name: str
    command: list[str]
    skip: str | None = None
    expect: str | None = None  # a line the output must contain (e.g. the injected fault)
    results: Path | None = None  # a study's Train runs: examples/s read from their checkpoints' metrics
    status: str = "not run"
    rates: list[float] = field(default_factory=list)
    metric: float | None = None
    peak_mib: int | None = None
    wall_s: float | None = None


def plan(args, work: Path, data_dir: Path, gpus: int) -> list[Run]:
    py = [sys.executable, "-m"]
    teacher = work / "teacher"
    common = [
        "--task",
        "cola",
        "--data-dir",
        str(data_dir),
        "--max-length",
        str(args.max_length),
        "--cpus-per-worker",
        str(args.cpus_per_worker),
        "--eval-batch-size",
        "128",
    ]
    # The study takes b from its search space (the tune CLI has no --batch-size): 32 there too.
    study = [
        "--teacher",
        str(teacher),
        "--student",
        args.model,
        "--student-layers",
        "3",
        "--epochs",
        "1",
        "--eval-every-steps",
        str(args.eval_every),
    ]
    student = [*study, "--batch-size", "32"]
    train = [*py, "sinkd_ray.train", *common, "--storage-path", str(work / "runs")]
    space = work / "space.yaml"
    runs = [
        Run(
            "teacher CE, 1 GPU",
            [
                *train,
                "--stage",
                "teacher",
                "--model",
                args.model,
                "--epochs",
                "1",
                "--gpus-per-worker",
                "1",
                "--eval-every-steps",
                str(args.eval_every),
                "--output-dir",
                str(teacher),
                "--name",
                "teacher",
            ],
        ),
        Run("1 worker, bf16", [*train, *student, "--gpus-per-worker", "1", "--bf16", "--name", "bf16"]),
        Run("1 worker, fp32", [*train, *student, "--gpus-per-worker", "1", "--no-bf16", "--name", "fp32"]),
        Run(
            "2 workers, fault+resume",
            [
                *train,
                *student,
                "--workers",
                "2",
                "--gpus-per-worker",
                "1",
                "--fault-at-step",
                str(args.eval_every + 2),
                "--max-failures",
                "1",
                "--name",
                "fault",
            ],
            skip=None if gpus >= 2 else "needs 2 GPUs: NCCL refuses two ranks on one device",
            expect="injected fault at step",
        ),
        Run(
            "live teacher, 8-bit",
            [
                *train,
                *student,
                "--gpus-per-worker",
                "1",
                "--teacher-source",
                "live",
                "--teacher-quantization",
                "8bit",
                "--name",
                "live8bit",
            ],
        ),
        Run(
            "2 trials x 0.5 GPU",
            [
                *py,
                "sinkd_ray.tune",
                *common,
                *study,
                "--search-space",
                str(space),
                "--num-trials",
                "2",
                "--max-concurrent-trials",
                "2",
                "--gpus-per-worker",
                "0.5",
                "--storage-path",
                str(work / "tune"),
                "--name",
                "share",
            ],
            results=work / "tune" / "share-train",
        ),
        Run(
            "teacher logits, GPU bf16",
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--_logits",
                "cuda",
                "--_teacher",
                str(teacher),
                "--data-dir",
                str(data_dir),
                "--max-length",
                str(args.max_length),
            ],
        ),
        Run(
            "teacher logits, CPU (a CPU head)",
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--_logits",
                "cpu",
                "--_teacher",
                str(teacher),
                "--data-dir",
                str(data_dir),
                "--max-length",
                str(args.max_length),
            ],
        ),
    ]
    return runs


def _study_rates(train_dir: Path) -> tuple[list[float], float | None]:
    """examples/s of every kept checkpoint of every trial of a study (the tune CLI prints no progress lines)."""
    rates, metric = [], None
    for metrics in sorted(train_dir.glob("trial_*/checkpoint_*/metrics.json")):
        data = json.loads(metrics.read_text())
        rates.append(float(data["examples_per_s"]))
        metric = data.get("dev_metric", metric)
    return rates, metric


def execute(run: Run, env: dict, timeout: float, log_dir: Path) -> None:
    if run.skip:
        run.status = f"skipped ({run.skip})"
        return
    log = log_dir / (re.sub(r"\W+", "_", run.name).strip("_") + ".log")
    t0 = time.monotonic()
    with GpuMemoryPeak() as peak, open(log, "w") as out:
        try:
            proc = subprocess.run(run.command, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, cwd=REPO)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
    run.wall_s, run.peak_mib = time.monotonic() - t0, peak.peak
    text = log.read_text(errors="replace")
    for _step, metric, rate in PROGRESS.findall(text):
        run.rates.append(float(rate))
        run.metric = float(metric)
    logits = re.search(r"teacher logits: (\d+) examples .*examples/s=([\d.]+)", text)
    if logits:
        run.rates.append(float(logits.group(2)))
    if run.results:
        run.rates, run.metric = _study_rates(run.results)
    if code is None:
        run.status = f"TIMEOUT after {timeout:.0f} s (log: {log})"
    elif code != 0:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        run.status = f"FAILED ({code}): {(lines[-1] if lines else '')[:120]} (log: {log})"
    elif run.expect and run.expect not in text:
        run.status = f"FAILED: no '{run.expect}' in the output (log: {log})"
    else:
        run.status = "ok" + (" (fault injected, resumed from checkpoint)" if run.expect else "")


def table(runs: list[Run]) -> str:
    rows = [("run", "status", "examples/s", "dev metric", "peak GPU MiB", "wall s")]
    for r in runs:
        rates = r.rates[1:] if len(r.rates) > 1 else r.rates
        rows.append(
            (
                r.name,
                r.status,
                f"{statistics.median(rates):,.0f}" if rates else "-",
                f"{r.metric:.4f}" if r.metric is not None else "-",
                f"{r.peak_mib:,}" if r.peak_mib is not None else "-",
                f"{r.wall_s:.0f}" if r.wall_s is not None else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    return "\n".join([lines[0], "-+-".join("-" * w for w in widths), *lines[1:]])


def teacher_logits(device: str, teacher: str, data_dir: str, max_length: int, batch_size: int = 128) -> None:
    """One pass of the teacher over CoLA's train split on ``device`` (bf16 autocast on CUDA), as the cache does."""
    import torch

    from sinkd_ray.data import GlobalBatchSampler, load_split, make_loader, tokenize_split
    from sinkd_ray.models import load_teacher
    from sinkd_ray.tasks import get_task

    task = get_task("cola")
    model = load_teacher(teacher, task).to(device)
    tokenized = tokenize_split(load_split(task, "train", data_dir), task, model.tokenizer, max_length)
    loader = make_loader(
        tokenized, model.tokenizer, GlobalBatchSampler(len(tokenized), batch_size, shuffle=False, drop_last=False)
    )
    keys = ("input_ids", "attention_mask", "token_type_ids")
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in loader:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                model(**{k: batch[k].to(device) for k in keys if k in batch}).float().cpu()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    print(
        f"teacher logits: {len(tokenized)} examples on {device} in {seconds:.1f} s: "
        f"examples/s={len(tokenized) / seconds:.1f}"
    )


def main(argv: list[str] | None = None) -> int:
    from sinkd_ray.errors import SinkdError

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit (no GPU needed)")
    parser.add_argument("--data-dir", help="GLUE copy with CoLA (default: a generated CoLA-format set)")
    parser.add_argument(
        "--model",
        default="offline:all-minilm-l6-v2",
        help="teacher base and student (its first 3 layers): a path or an offline: name",
    )
    parser.add_argument("--train-examples", type=int, default=8192, help="size of the generated train split")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=64, help="optimiser steps between evaluations")
    parser.add_argument("--cpus-per-worker", type=float, default=4)
    parser.add_argument("--timeout-s", type=float, default=240, help="per run")
    parser.add_argument("--work-dir", help="where runs are written (default: a new temporary folder)")
    parser.add_argument("--_logits", choices=("cuda", "cpu"), help=argparse.SUPPRESS)
    parser.add_argument("--_teacher", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._logits:
        teacher_logits(args._logits, args._teacher, args.data_dir, args.max_length)
        return 0

    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not args.dry_run and (gpus == 0 or shutil.which("nvidia-smi") is None):
        raise SinkdError(
            f"no CUDA device here (torch {torch.__version__}: cuda available = "
            f"{torch.cuda.is_available()}) — run this on a GPU machine, or add --dry-run to see the commands"
        )
    if args.work_dir:
        work = Path(args.work_dir).resolve()
    else:  # a dry run creates nothing
        work = Path(tempfile.gettempdir(), "gpu_check") if args.dry_run else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    data_dir = Path(args.data_dir).resolve() if args.data_dir else work / "glue"
    runs = plan(args, work, data_dir, gpus if not args.dry_run else 1)
    if args.dry_run:
        if not args.data_dir:
            print(f"# data: a generated CoLA-format set in {data_dir} ({args.train_examples} train, 1024 dev)")
        print(
            f"# search space of the study: {work / 'space.yaml'}\n"
            + "\n".join(f"#   {ln}" for ln in SPACE.splitlines())
        )
        for run in runs:
            print(f"# {run.name}" + (f" — on one GPU: skipped ({run.skip})" if run.skip else ""))
            print(shlex.join(run.command))
        return 0
    work.mkdir(parents=True, exist_ok=True)
    (work / "space.yaml").write_text(SPACE)
    if not args.data_dir:
        write_cola(data_dir, args.train_examples, 1024)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "RAY_DEDUP_LOGS": "0",
    }
    env.pop("RAY_ADDRESS", None)  # each CLI starts its own local runtime: its GPU memory is its own
    print(
        f"{torch.cuda.get_device_name(0)} x{gpus}, torch {torch.__version__} (CUDA {torch.version.cuda}); "
        f"work dir {work}",
        flush=True,
    )
    for run in runs:
        execute(run, env, args.timeout_s, work)
        print(f"{run.name}: {run.status}", flush=True)
        if run is runs[0] and not run.status.startswith("ok"):
            for later in runs[1:]:  # everything else distils from this teacher
                later.status = "not run (no teacher)"
            break
    print()
    print(table(runs))
    return 0 if all(r.status.startswith(("ok", "skipped")) for r in runs) else 1


if __name__ == "__main__":
    from sinkd_ray.cli import run_cli

    run_cli(main)
