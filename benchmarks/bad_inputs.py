"""What a user sees for bad input and hostile conditions: each case through the real CLI, its exit code, wall time
and first line, and a verdict.

    python benchmarks/bad_inputs.py            # a table, one row per case (~15 minutes on 2 CPU cores)

Builds a tiny BERT teacher/student and CoLA-format folders in a temporary directory (offline), then runs
`python -m sinkd_ray.train` / `python -m sinkd_ray.tune` with one bad input each, or interferes with a running study
(SIGTERM, SIGKILL then --resume, a second study of the same name, a changed search space on --resume, a disk that
fills up: the last needs root for a tmpfs). Verdicts: **clear** (the expected exit code and line, in under a
minute, no traceback), **late** (clear, but after a minute), **unclear** (a traceback, no `error:` line, or another
exit code), **hang** (killed after 10 minutes).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def _fixtures(root: Path) -> dict[str, str]:
    import torch
    from conftest import build_tiny_bert, write_cola_fixture

    from sinkd_ray.models import load_student
    from sinkd_ray.tasks import get_task

    bert = build_tiny_bert(root / "bert")
    torch.manual_seed(0)
    teacher = load_student(str(bert), get_task("cola")).save_pretrained(root / "teacher")
    data = write_cola_fixture(root / "glue")
    binary = root / "binary" / "CoLA"
    binary.mkdir(parents=True)
    (binary / "train.tsv").write_bytes(bytes(range(256)) * 64)
    (binary / "dev.tsv").write_text("x\t1\t\ta b .\n")
    (root / "a-file").write_text("")
    broken = root / "broken-teacher"
    shutil.copytree(teacher, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    one_class = root / "one-class" / "CoLA"
    one_class.mkdir(parents=True)
    (one_class / "train.tsv").write_text("".join(f"x{i}\t1\t\tthe man is good .\n" for i in range(64)))
    (one_class / "dev.tsv").write_text("x\t1\t\ta b .\nx\t0\t*\tb a .\n")
    (root / "bad-db").mkdir()
    (root / "bad-db" / "mlflow.db").write_bytes(b"not a database" * 100)
    (root / "text-float.yaml").write_text(
        "search:\n  lr: {loguniform: [1.0e-5, 1.0e-4]}\nfixed:\n  weight_decay: 1e-2\n"
    )
    (root / "space.yaml").write_text(SPACE)
    return {
        "broken_teacher": str(broken),
        "one_class": str(one_class.parent),
        "bad_db": str(root / "bad-db"),
        "text_float": str(root / "text-float.yaml"),
        "space": str(root / "space.yaml"),
        "bert": str(bert),
        "teacher": str(teacher),
        "data": str(data),
        "binary": str(binary.parent),
        "file": str(root / "a-file"),
        "runs": str(root / "runs"),
    }


def _with(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with the value after ``flag`` replaced."""
    i = argv.index(flag) + 1
    return [*argv[:i], value, *argv[i + 1 :]]


SPACE = "sampler: grid\nsearch:\n  lr: {choice: [1.0e-2, 3.0e-3]}\nfixed:\n  batch_size: 16\n  epochs: 12\n"


def cases(f: dict[str, str]) -> list[tuple[str, list[str]]]:
    # the same tiny models, data and storage for both CLIs; each case adds its one bad input
    common = ["--task", "cola", "--student", f["bert"], "--student-layers", "2", "--teacher", f["teacher"]]
    common += ["--data-dir", f["data"], "--max-length", "32", "--storage-path", f["runs"], "--resources-wait", "0"]
    train = ["-m", "sinkd_ray.train", *common, "--epochs", "1", "--batch-size", "16"]
    tune = ["-m", "sinkd_ray.tune", *common]
    return [
        ("lr 1e30: the run diverges", [*train, "--lr", "1e30", "--max-grad-norm", "0", "--warmup-ratio", "0"]),
        ("--gpus-per-worker 1 without a GPU", [*train, "--gpus-per-worker", "1"]),
        ("--workers 4 on 2 CPUs", [*train, "--workers", "4"]),
        ("--tracking-uri http://127.0.0.1:9", [*tune, "--tracking-uri", "http://127.0.0.1:9"]),
        ("--tracking-uri foo://bar", [*tune, "--tracking-uri", "foo://bar"]),
        ("a binary train.tsv", _with(train, "--data-dir", f["binary"])),
        ("--storage-path on a file", _with(train, "--storage-path", f["file"])),
        ("--student-layers 12 (the model has 4)", _with(train, "--student-layers", "12")),
        ("--max-train-examples 1", [*train, "--max-train-examples", "1"]),
        ("--lr -1e-5", [*train, "--lr", "-1e-5"]),
        ("--alpha 1.5", [*train, "--alpha", "1.5"]),
        ("a hub id without network", _with(train, "--student", "some-org/not-cached-model")),
        ("unknown task", _with(train, "--task", "colaa")),
        ("--search-space nope", [*tune, "--search-space", "nope"]),
        ("--cpus-per-worker 2 in a study on 2 cores", [*tune, "--cpus-per-worker", "2"]),
        # issue 25's cases
        ("RAY_ADDRESS at a closed port", ["@RAY_ADDRESS=127.0.0.1:1", *train]),
        ("a truncated teacher model.safetensors", _with(train, "--teacher", f["broken_teacher"])),
        ("--seed -1", [*train, "--seed=-1"]),
        ("a corrupt mlflow.db", _with(tune, "--storage-path", f["bad_db"])),
        ("YAML weight_decay: 1e-2 (no dot)", [*tune, "--search-space", f["text_float"]]),
        ("a one-class train file", _with(train, "--data-dir", f["one_class"])),
        ("flags fixing every searched key", [*tune, "--search-space", f["space"], "--lr", "1e-3"]),
    ]


def run(argv: list[str], env: dict, timeout: float = 600) -> tuple[int | None, float, str]:
    """(exit code or None for a hang, wall seconds, stderr) of one CLI call; ``@NAME=value`` items set env vars."""
    extra = dict(a[1:].split("=", 1) for a in argv if a.startswith("@"))
    t0 = time.time()
    try:
        proc = subprocess.run(
            [sys.executable, *(a for a in argv if not a.startswith("@"))],
            cwd=REPO,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return proc.returncode, time.time() - t0, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired:
        return None, time.time() - t0, ""


def verdict(code: int | None, wall: float, output: str, expect_code: int = 2, expect: str | tuple = "error:") -> str:
    if code is None:
        return "hang"
    expected = (expect,) if isinstance(expect, str) else expect
    if "Traceback" in output or code != expect_code or not any(e in output for e in expected):
        return "unclear"
    return "clear" if wall < 60 else "late"


def first_line(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.startswith(("error:", "usage:", "interrupted", "Traceback"))]
    return (lines[-1] if lines and lines[-1].startswith("error:") else (lines[0] if lines else ""))[:160]


def _study(f: dict, storage: str, name: str, env: dict, *extra: str) -> subprocess.Popen:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import tiny_study_argv

    argv = tiny_study_argv(f["teacher"], f["bert"], f["data"], f["space"], storage, "--name", name, *extra)
    return subprocess.Popen(
        [sys.executable, "-m", "sinkd_ray.tune", *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _first_checkpoint(storage: str, name: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not list(Path(storage).glob(f"{name}-train/trial_*/checkpoint_*/metrics.json")):
        if proc.poll() is not None or time.time() > deadline:
            return
        time.sleep(1)


def running(storage: str) -> int:
    """MLflow runs left RUNNING in the study's store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{Path(storage) / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sinkd-cola")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return sum(r.info.status == "RUNNING" for r in runs)


def choreographed(f: dict, root: Path, env: dict) -> list[tuple[str, int | None, float, str, str]]:
    """Cases that interfere with a running study; (name, exit, wall, first line, verdict)."""
    rows = []

    def finish(name: str, proc: subprocess.Popen, t0: float, expect_code: int, expect: str, storage: str) -> None:
        try:
            out, _ = proc.communicate(timeout=600)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            proc.kill()
            out, code = "", None
        wall = time.time() - t0
        left = running(storage) if code is not None else -1
        note = "" if left == 0 else f" ({left} MLflow runs left RUNNING)"
        judged = verdict(code, wall, out, expect_code, expect) if left == 0 else "unclear"
        rows.append((name, code, wall, first_line(out) + note, judged))
        return out

    # SIGTERM during a trial: the graceful stop of Ctrl+C
    storage = str(root / "sigterm")
    proc = _study(f, storage, "term", env)
    _first_checkpoint(storage, "term", proc)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    finish("SIGTERM during a trial", proc, t0, 130, "interrupted", storage)
    # SIGKILL of the driver, then --resume
    storage = str(root / "sigkill")
    proc = _study(f, storage, "kill", env)
    _first_checkpoint(storage, "kill", proc)
    proc.kill()
    proc.wait()
    t0 = time.time()
    resumed = _study(f, storage, "kill", env, "--resume")
    finish("SIGKILL of the driver, then --resume", resumed, t0, 0, "registered model", storage)
    # two studies with the same --name started at once: one runs, the other is refused (the lock, or the state
    # the first has written already)
    storage = str(root / "twice")
    t0 = time.time()
    first, second = _study(f, storage, "same", env), _study(f, storage, "same", env)
    while first.poll() is None and second.poll() is None:
        time.sleep(1)
    refused, runs_on = (first, second) if first.poll() is not None else (second, first)
    expect = ("is running in another command", "already exists")
    finish("two studies with the same --name at once", refused, t0, 2, expect, storage + "-none")
    _first_checkpoint(storage, "same", runs_on)
    runs_on.send_signal(signal.SIGINT)
    runs_on.wait(timeout=300)
    # --resume after the search space changed
    Path(f["space"]).write_text(SPACE.replace("3.0e-3", "1.0e-3"))
    t0 = time.time()
    changed = _study(f, storage, "same", env, "--resume")
    finish("--resume after the search-space file changed", changed, t0, 2, "is not the one study", storage)
    Path(f["space"]).write_text(SPACE)
    # the storage fills up mid-study (a tmpfs: root only)
    if os.geteuid() == 0:
        disk = root / "disk"
        disk.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(disk)], check=True)
        try:
            storage = str(disk / "runs")
            proc = _study(f, storage, "full", env)
            _first_checkpoint(storage, "full", proc)
            with (disk / "filler").open("wb") as out:
                out.write(b"\0" * max(0, shutil.disk_usage(disk).free - 256 * 1024))
            t0 = time.time()
            finish("the storage fills up mid-study", proc, t0, 2, "is full", storage)
        finally:
            subprocess.run(["umount", "-l", str(disk)], check=False)
    return rows


def main() -> int:
    import argparse

    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fixtures = _fixtures(Path(tmp))
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
        env["HF_HUB_OFFLINE"] = "1"
        print("| case | exit | wall s | first line | verdict |\n|---|---|---|---|---|", flush=True)
        verdicts = []
        for name, argv in cases(fixtures):
            code, wall, output = run(argv, env)
            verdicts.append(verdict(code, wall, output))
            print(f"| {name} | {code} | {wall:.0f} | {first_line(output)} | {verdicts[-1]} |", flush=True)
        for name, code, wall, line, judged in choreographed(fixtures, Path(tmp), env):
            verdicts.append(judged)
            print(f"| {name} | {code} | {wall:.0f} | {line} | {judged} |", flush=True)
        counts = {v: verdicts.count(v) for v in ("clear", "late", "unclear", "hang")}
        print(f"\n{len(verdicts)} kinds: " + ", ".join(f"{n} {v}" for v, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
