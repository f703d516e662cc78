"""`python -m sinkd_ray.tune` end to end on tiny models: MLflow parent/child runs, registry, ASHA, resume,
and one-line errors for bad input."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sinkd_ray.models import load_student
from sinkd_ray.tasks import get_task
from sinkd_ray.tune import main as tune_main

REPO = Path(__file__).resolve().parents[1]
# lr 1e-2 learns the fixture's rule within the first epoch (24 steps), lr 1e-5 does not: ASHA has something
# to stop. A grid (Optuna's GridSampler) so both learning rates are tried; with --seed 0 a learning trial
# comes first, so a later non-learning one falls below the cutoff at the first rung.
SPACE = """\
sampler: grid
search:
  lr: {choice: [1.0e-2, 1.0e-5]}
  alpha: {choice: [0.0, 0.3]}
fixed:
  batch_size: 16
  epochs: 3
"""


@pytest.fixture(scope="module")
def tune_data_dir(tmp_path_factory):
    from conftest import write_cola_fixture

    return write_cola_fixture(tmp_path_factory.mktemp("glue-tune"), n_train=384, n_dev=40)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory, tiny_bert_dir):
    torch.manual_seed(0)
    return load_student(str(tiny_bert_dir), get_task("cola")).save_pretrained(tmp_path_factory.mktemp("teacher"))


def _argv(tmp_path, tiny_bert_dir, tiny_teacher, tune_data_dir, *extra):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    return ["--task", "cola", "--teacher", str(tiny_teacher), "--student", str(tiny_bert_dir),
            "--student-layers", "2", "--data-dir", str(tune_data_dir), "--search-space", str(space),
            "--storage-path", str(tmp_path / "runs"), "--max-length", "32", "--eval-batch-size", "20",
            "--warmup-ratio", "0", "--seed", "0", *extra]


def _client(tmp_path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")


def _study_runs(client):
    exp = client.get_experiment_by_name("sinkd-cola")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


@pytest.mark.ray
def test_three_trial_study_tracks_registers_and_stops_early(tmp_path, ray_runtime, tiny_bert_dir, tiny_teacher,
                                                            tune_data_dir, capsys):
    argv = _argv(tmp_path, tiny_bert_dir, tiny_teacher, tune_data_dir, "--num-trials", "4", "--name", "s1")
    assert tune_main(argv) == 0
    out = capsys.readouterr().out
    assert "best trial" in out and "registered model: sinkd-cola-student version 1" in out
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'runs' / 'mlflow.db'}" in out

    client = _client(tmp_path)
    parents, children = _study_runs(client)
    assert len(parents) == 1 and len(children) == 4
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    for child in children:
        assert {"lr", "alpha"} <= set(child.data.params)
        history = client.get_metric_history(child.info.run_id, "dev_metric")
        assert len(history) >= 1 and "train_sd" in child.data.metrics
        assert child.data.tags["task"] == "cola" and "code_version" in child.data.tags
    # ASHA (grace 1, reduction 2) cut at least one trial before its last epoch.
    iterations = [len(client.get_metric_history(c.info.run_id, "dev_metric")) for c in children]
    assert min(iterations) < 3, iterations

    # The leaderboard and plots are artifacts of the parent run.
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id, "study")}
    assert {"study/leaderboard.csv", "study/parallel_coordinate.png"} <= artifacts

    # The registered version loads with from_pretrained and reproduces the best reported dev metric.
    import mlflow

    version = client.get_model_version_by_alias("sinkd-cola-student", "best")
    local = mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(tmp_path / "dl"),
                                                tracking_uri=client.tracking_uri)
    from sinkd_ray.data import load_split, tokenize_split
    from sinkd_ray.train import evaluate

    task = get_task("cola")
    student = load_student(local, task)
    dev = tokenize_split(load_split(task, "dev", str(tune_data_dir)), task, student.tokenizer, 32)
    metrics = evaluate(student, task, dev, per_worker=20, rank=0, world=1, device=torch.device("cpu"), bf16=False)
    assert metrics["mcc"] == pytest.approx(parents[0].data.metrics["best_dev_metric"], abs=1e-6)


@pytest.mark.ray
def test_an_interrupted_study_resumes_without_rerunning_or_duplicating(tmp_path, ray_runtime, tiny_bert_dir,
                                                                       tiny_teacher, tune_data_dir):
    argv = _argv(tmp_path, tiny_bert_dir, tiny_teacher, tune_data_dir, "--num-trials", "3", "--name", "s2",
                 "--grace-period", "3")  # no early stopping here: every trial runs all 3 epochs
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONUNBUFFERED"] = "1"
    log = tmp_path / "study.log"  # a file, not a pipe: an unread pipe fills up and blocks the study
    proc = subprocess.Popen([sys.executable, "-m", "sinkd_ray.tune", *argv], cwd=REPO, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    # Interrupt as soon as one trial has reported all 3 epochs. Poll Tune's files, not the SQLite store: opening
    # the store while the study is still creating its tables races with it.
    deadline = time.time() + 300
    while time.time() < deadline:
        time.sleep(2)
        progress = (tmp_path / "runs" / "s2").glob("*/progress.csv")
        if any(len(p.read_text().splitlines()) >= 4 for p in progress):  # header + 3 evaluations
            time.sleep(5)  # let Tune record the trial's end
            break
        assert proc.poll() is None, log.read_text()[-3000:]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=180) == 130, log.read_text()[-3000:]  # "interrupted … --resume", not a summary
    client = _client(tmp_path)
    _, before = _study_runs(client)
    finished_before = {c.data.tags["sinkd.trial_id"]: c.info.run_id for c in before if c.info.status == "FINISHED"}
    assert finished_before and len(before) < 3

    assert tune_main([*argv, "--resume"]) == 0
    parents, after = _study_runs(client)
    trial_ids = [c.data.tags["sinkd.trial_id"] for c in after]
    assert len(parents) == 1 and len(after) == 3 and len(set(trial_ids)) == 3  # no duplicate MLflow run
    for run_id in finished_before.values():  # the finished trial was not run again
        history = client.get_metric_history(run_id, "dev_metric")
        assert sorted(m.step for m in history) == [1, 2, 3]
    assert parents[0].info.status == "FINISHED"


@pytest.mark.parametrize("extra, message", [
    (["--task", "stsb"], "STS-B, a regression task"),
    (["--task", "colaa"], "unknown task"),
    (["--alpha", "1.5"], None),  # alpha is a search-space key, not a flag: argparse refuses it
    (["--epochs", "0"], "epochs=0 is outside [1, inf)"),
    (["--workers", "3"], "not divisible by workers=3"),
    (["--search-space", "nope"], "search space 'nope' not found"),
    (["--student", "/no/such/model"], "model path '/no/such/model' not found"),
    (["--data-dir", "/no/such/dir"], "/no/such/dir"),
    (["--num-trials", "0"], "num_trials=0 must be ≥ 1"),
])
def test_bad_cli_values_are_one_line_errors(tmp_path, tiny_bert_dir, tiny_teacher, tune_data_dir, extra,
                                            message):
    argv = _argv(tmp_path, tiny_bert_dir, tiny_teacher, tune_data_dir, *extra)
    proc = subprocess.run([sys.executable, "-m", "sinkd_ray.tune", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err
    if message:
        assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs" / "mlflow.db").exists()  # nothing started
