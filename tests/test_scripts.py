"""Every script a user or maintainer runs imports and answers --help (a renamed function once broke
benchmarks/bench_step.py silently), and the GPU smoke run works where only torch, transformers and datasets are."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "benchmarks").glob("*.py"))
MODULES = ["sinkd_ray.train", "sinkd_ray.tune", "sinkd_ray.cluster"]


def _run(args, timeout=120, env=None):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_benchmark_script_answers_help(script):
    proc = _run([str(script), "--help"])
    assert proc.returncode == 0 and proc.stdout.startswith("usage:"), proc.stderr[-2000:]


@pytest.mark.parametrize("module", MODULES)
def test_every_module_cli_answers_help(module):
    proc = _run(["-m", module, "--help"])
    assert proc.returncode == 0 and proc.stdout.startswith("usage:"), proc.stderr[-2000:]


def _bare_gpu_host(tmp_path) -> dict:
    """An environment where Ray, MLflow, Optuna and bitsandbytes cannot be imported (a GPU host's image with
    torch, transformers, safetensors and the datasets wheels carried along)."""
    import os

    blocked = tmp_path / "blocked"
    for name in ("ray", "mlflow", "optuna", "bitsandbytes"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed on this host')\n")
    return {**os.environ, "PYTHONPATH": str(blocked)}


def test_gpu_check_on_a_machine_without_cuda_or_ray_says_so_in_one_line(tmp_path):
    proc = _run([str(REPO / "benchmarks" / "gpu_check.py")], env=_bare_gpu_host(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line
    assert proc.stderr.startswith("error: no CUDA device present") and "--device cpu" in proc.stderr


def test_gpu_check_help_lists_every_row():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    out = _run([str(REPO / "benchmarks" / "gpu_check.py"), "--help"]).stdout
    assert all(f"  {row} " in out for row in module.ROWS), out


def test_gpu_check_rows_run_on_the_cpu_without_ray_and_say_what_they_cannot_cover(tmp_path):
    """The rows' machinery on this CPU, small, with Ray & co. unimportable: the CPU-able rows hold, the CUDA-only
    ones say NOT COVERED, and that makes the exit code non-zero unless --allow-partial."""
    rows = "fsdp2-bf16,resume,teacher-logits,sinkhorn,bert-base-bf16,quantized,multi-rank-nccl"
    args = [str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--rows", rows, "--work-dir", str(tmp_path)]
    env = _bare_gpu_host(tmp_path)
    proc = _run([*args, "--json", str(tmp_path / "partial.json")], timeout=600, env=env)
    assert proc.returncode == 1 and "--allow-partial" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "partial.json").read_text())
    status = {row["name"]: row["status"] for row in report["rows"]}
    assert status == {
        "fsdp2-bf16": "ok",
        "resume": "ok",
        "teacher-logits": "ok",
        "sinkhorn": "ok",
        "bert-base-bf16": "ok",
        "quantized": "NOT COVERED",
        "multi-rank-nccl": "NOT COVERED",
    }, report
    figures = {row["name"]: row["figures"] for row in report["rows"]}
    assert figures["bert-base-bf16"]["examples/s"] > 0 and figures["resume"]["tensors compared"] > 10
    ok_only = _run([*args[:4], "fsdp2-bf16", "--work-dir", str(tmp_path), "--allow-partial"], timeout=300, env=env)
    assert ok_only.returncode == 0, ok_only.stdout[-2000:]
