"""What a user sees for bad input: each case through the real CLI, its exit code, wall time and first line.

    python benchmarks/bad_inputs.py            # a table, one row per case (~3 minutes on 2 CPU cores)

Builds a tiny BERT teacher/student and a CoLA-format folder in a temporary directory (offline), then runs
`python -m sinkd_ray.train` / `python -m sinkd_ray.tune` with one bad input each. A good answer: exit 2, one
line starting with ``error:`` that says what to do, in seconds — never a traceback or a hang.
"""

from __future__ import annotations

import os
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
    return {
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
    ]


def main() -> int:
    import argparse

    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fixtures = _fixtures(Path(tmp))
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
        print("| case | exit | wall s | first line |\n|---|---|---|---|")
        for name, argv in cases(fixtures):
            t0 = time.time()
            proc = subprocess.run(
                [sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
            )
            lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(("error:", "usage:", "Traceback"))]
            first = lines[-1] if lines and lines[-1].startswith("error:") else (lines[0] if lines else "")
            traceback = " (traceback!)" if "Traceback" in proc.stderr else ""
            print(f"| {name} | {proc.returncode} | {time.time() - t0:.0f} | {first[:160]}{traceback} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
