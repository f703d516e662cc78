"""`python -m sinkd_ray.tune` end to end on tiny models: MLflow parent/child runs, registry, ASHA, resume,
and one-line errors for bad input."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import one_error_line, run_watched, tiny_study_argv

from sinkd_ray.models import load_student
from sinkd_ray.tasks import get_task

TPE_SPACE = """\
sampler: tpe
search:
  lr: {choice: [1.0e-2, 1.0e+30]}
  alpha: {uniform: [0.0, 0.3]}
fixed:
  batch_size: 16
  epochs: 2
  max_grad_norm: 0.0
"""

REPO = Path(__file__).resolve().parents[1]
# lr 1e-2 learns the fixture's rule within the first epoch (24 steps), lr 1e-5 does not: ASHA has something
# to stop. A grid (Optuna's GridSampler): with --seed 0 its first two points are (1e-2, 0.3) then (1e-5, 0.3), so
# a two-trial study tries both learning rates, the learning one first, and the second falls below the cutoff at
# the first rung (sinkd_ray.study.searcher(load_search_space(path, "cola"), 0).suggest(...) shows the order).
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


def _argv(tmp_path, tiny_bert_dir, tiny_teacher, tune_data_dir, *extra, space_text=SPACE, storage=None):
    space = tmp_path / "space.yaml"
    space.write_text(space_text)
    storage = storage or tmp_path / "runs"
    return tiny_study_argv(
        tiny_teacher, tiny_bert_dir, tune_data_dir, space, storage, "--warmup-ratio", "0", "--no-bf16", *extra
    )


def _study(argv, log: Path | None = None) -> str:
    """Run `python -m sinkd_ray.tune` in its own process (a fresh Ray driver attached to the session's runtime,
    as a user's shell would be) and return its stdout; a non-zero exit fails with the end of its stderr. It may
    take as long as it keeps making progress (a loaded host is slow, not hung); a stall fails it.
    In-process, a long-lived pytest driver that had created and lost many Train actors was once left waiting
    for an actor-started notification that never came."""
    import tempfile

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    log = log or Path(tempfile.mkdtemp(prefix="study-")) / "study.log"
    proc = run_watched([sys.executable, "-m", "sinkd_ray.tune", *argv], log, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _fresh_process(tracking_uri: str, code: str, *args: str) -> dict:
    """Run ``code`` in a new interpreter that knows only the tracking URI; its last line of output, as JSON."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd="/",
        env={**env, "MLFLOW_TRACKING_URI": tracking_uri, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _served(tracking_uri: str, model_uri: str, inputs: list) -> dict:
    """`mlflow models serve` on a free loopback port, asked once it answers /ping (a bounded loop), then stopped."""
    import urllib.request

    from conftest import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(MLFLOW_TRACKING_URI=tracking_uri, HF_HUB_OFFLINE="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # its uvicorn
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"]
        + ["-h", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).read()
                break
            except OSError:
                assert server.poll() is None, server.stderr.read()[-2000:]
                assert time.monotonic() < deadline, "the model server did not answer /ping in 180 s"
                time.sleep(1)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": inputs}).encode(),
            headers={"Content-Type": "application/json"},
        )
        return json.loads(urllib.request.urlopen(request, timeout=60).read())
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _client(tmp_path, storage=None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{(storage or tmp_path / 'runs') / 'mlflow.db'}")


def _study_runs(client):
    exp = client.get_experiment_by_name("sinkd-cola")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "sinkd.trial_id" in r.data.tags]  # the trials (not the teacher's nested run)
    return parents, children


def _nested(client) -> dict:
    """The study's other nested runs by role: "teacher", "ce-baseline"."""
    exp = client.get_experiment_by_name("sinkd-cola")
    return {
        r.data.tags["sinkd.role"]: r for r in client.search_runs([exp.experiment_id]) if "sinkd.role" in r.data.tags
    }


@pytest.mark.ray
def test_a_two_trial_study_tracks_registers_and_stops_early(
    tmp_path, ray_runtime, tiny_bert_dir, tiny_teacher, tune_data_dir
):
    # two trials where two show it: each trial is a Ray Train run of several processes (seconds of CPU each)
    argv = _argv(tmp_path, tiny_bert_dir, tiny_teacher, tune_data_dir, "--num-trials", "2", "--name", "s1")
    out = _study(argv)
    assert "best trial" in out and "registered model: sinkd-cola-student version 1" in out
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'runs' / 'mlflow.db'}" in out

    client = _client(tmp_path)
    parents, children = _study_runs(client)
    nested = _nested(client)
    assert len(parents) == 1 and len(children) == 2
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    for child in children:
        # every setting of the run, not only the searched ones; the run's own metrics, not Tune's bookkeeping
        assert {"lr", "alpha", "beta", "tau_kl", "tau_sd", "sinkhorn_lambda", "batch_size", "epochs", "student"} <= set(
            child.data.params
        )
        assert child.data.params["student"] == str(tiny_bert_dir) and child.data.params["batch_size"] == "16"
        history = client.get_metric_history(child.info.run_id, "dev_metric")
        assert len(history) >= 1 and {"train_sd", "grad_share_sd", "examples_per_s"} <= set(child.data.metrics)
        assert not {"pid", "timestamp", "done", "time_this_iter_s"} & set(child.data.metrics)
        assert not [m for m in child.data.metrics if m.startswith("config/")]
        assert child.data.tags["task"] == "cola" and "code_version" in child.data.tags
    # the teacher is a nested run with its dev metric; the table's figures are the parent's metrics
    assert nested["teacher"].data.metrics["dev_metric"] == parents[0].data.metrics["teacher_dev_metric"]
    best = max(m.value for c in children for m in client.get_metric_history(c.info.run_id, "dev_metric"))
    assert parents[0].data.metrics["best_dev_metric"] == pytest.approx(best)
    experiment = client.get_experiment_by_name("sinkd-cola")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the training view, not GenAI
    # ASHA (grace 1, reduction 2) cut at least one trial before its last epoch — and none of them crashed
    # (a crashed trial also stops early, so the statuses are checked too).
    # The learning trial (lr 1e-2, first) ran its 3 epochs; the other was cut at the first rung.
    iterations = {
        float(c.data.params["lr"]): len(client.get_metric_history(c.info.run_id, "dev_metric")) for c in children
    }
    assert iterations == {1e-2: 3, 1e-5: 1}, iterations
    assert all(c.info.status == "FINISHED" for c in children), [c.info.status for c in children]
    assert "stopped early by ASHA" in out and "failed" not in out

    # The leaderboard and plots are artifacts of the parent run.
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id, "study")}
    assert {"study/leaderboard.csv", "study/parallel_coordinate.png"} <= artifacts

    # The registered version is an MLflow model: tags to filter on, a model card, MLflow's own loaders in a fresh
    # process with only the tracking URI, and a model server answering on the loopback.

    version = client.get_model_version_by_alias("sinkd-cola-student", "best")
    assert {"task", "teacher", "objective", "dev_mcc", "study", "student"} <= set(version.tags)
    assert version.tags["study"] == "s1" and "| teacher |" in version.description
    from sinkd_ray.data import load_split

    dev = load_split(get_task("cola"), "dev", str(tune_data_dir))
    (tmp_path / "dev.json").write_text(json.dumps(list(dev["sentence"])))
    loaded = _fresh_process(
        client.tracking_uri,
        "import json, mlflow, sys\n"
        "texts = json.load(open(sys.argv[1]))\n"
        "model = mlflow.pyfunc.load_model('models:/sinkd-cola-student@best')\n"
        "out = model.predict(texts)\n"
        "pipe = mlflow.transformers.load_model('models:/sinkd-cola-student@best')\n"
        "print(json.dumps({'labels': list(out['label']), 'pipeline': type(pipe).__name__}))\n",
        str(tmp_path / "dev.json"),
    )
    assert set(loaded["labels"]) <= {"acceptable", "unacceptable"} and loaded["pipeline"].endswith("Pipeline")
    # the registered model is the best student: its answers on dev give the best trial's reported metric
    from sklearn.metrics import matthews_corrcoef

    predicted = [["unacceptable", "acceptable"].index(label) for label in loaded["labels"]]
    mcc = matthews_corrcoef(list(dev["label"]), predicted)
    assert mcc == pytest.approx(parents[0].data.metrics["best_dev_metric"], abs=1e-6)
    answer = _served(client.tracking_uri, "models:/sinkd-cola-student@best", ["the man is good ."])
    assert answer["predictions"][0]["label"] in {"acceptable", "unacceptable"}


def _fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` up to ``leave`` bytes free, in 1 MiB writes: the study writes beside it, so the free space
    measured before one big write can be gone when it lands (ENOSPC: then the disk is full, as wanted)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while (room := shutil.disk_usage(disk).free - leave) > 0:
            os.write(fd, b"\0" * min(room, 1 << 20))
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    return filler


def _checkpoints(study_dir: Path) -> set[Path]:
    return {p.parent for p in study_dir.glob("trial_*/checkpoint_*/metrics.json")}


def _assert_whole_checkpoints(study_dir: Path) -> None:
    for checkpoint in study_dir.glob("trial_*/checkpoint_*/"):  # every copy left is whole
        assert (checkpoint / "metrics.json").is_file() and (checkpoint / "shards" / "rank0.safetensors").is_file()


@pytest.mark.ray
def test_an_interrupted_study_resumes_past_a_full_disk_without_rerunning_or_duplicating(
    tmp_path, small_disk, ray_runtime, tiny_bert_dir, tiny_teacher, tune_data_dir
):
    """One study, stopped twice as users' studies stop: SIGTERM in its second trial, then its resume meets a full
    disk (one `error:` line within a minute; it used to print tracebacks and never end); with space freed, a second
    resume ends it with no trial run again or duplicated and one model version, and a third registers nothing new.
    (One study for both: every trial is a Ray Train run of several processes.)"""
    storage = small_disk("96m") / "runs"
    # 10 epochs (the flag wins over the file's 3): a trial lasts long enough to be interrupted in its middle
    argv = _argv(
        tmp_path,
        tiny_bert_dir,
        tiny_teacher,
        tune_data_dir,
        "--num-trials",
        "3",
        "--name",
        "s2",
        "--grace-period",
        "10",
        "--epochs",
        "10",
        storage=storage,
    )  # no early stopping: every trial runs all epochs
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    log = tmp_path / "study.log"  # a file, not a pipe: an unread pipe fills up and blocks the study
    proc = subprocess.Popen(
        [sys.executable, "-m", "sinkd_ray.tune", *argv],
        cwd=REPO,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    # Interrupt in the middle of the second trial: the first has reported all its epochs, the second at least one. Poll
    # Tune's files, not the SQLite store: opening the store while the study is creating its tables races with it.
    last_change, seen = time.time(), None
    while True:  # as long as the trials advance (a slow host), not a fixed wall time
        time.sleep(1)
        lengths = sorted(len(p.read_text().splitlines()) for p in (storage / "s2").glob("*/progress.csv"))
        if len(lengths) == 2 and lengths[-1] >= 11 and lengths[0] >= 2:  # header + 10, header + ≥1 evaluations
            break
        assert proc.poll() is None, log.read_text()[-3000:]
        if lengths != seen:
            last_change, seen = time.time(), lengths
        assert time.time() - last_change < 300, (
            f"stalled: no evaluation for 300 s ({lengths})\n{log.read_text()[-3000:]}"
        )
    # SIGTERM (`kill`, a scheduler's stop, a closed terminal), which the CLI turns into Ctrl+C's SIGINT: one study
    # shows both. ray.init's own fatal-signal handler used to take SIGTERM over and abort the driver (exit -6, runs
    # left RUNNING).
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=180) == 130, log.read_text()[-3000:]  # "interrupted … --resume", not a summary
    said = log.read_text()
    assert "nothing registered" in said and "interrupted" in said and "--resume --name s2" in said, said[-3000:]
    client = _client(tmp_path, storage)
    parents, before = _study_runs(client)
    assert parents[0].info.status == "KILLED" and not client.search_registered_models()
    assert all(c.info.status in ("FINISHED", "KILLED") for c in before), [c.info.status for c in before]
    finished_before = {c.data.tags["sinkd.trial_id"]: c.info.run_id for c in before if c.info.status == "FINISHED"}
    assert len(finished_before) == 1 and len(before) == 2
    _assert_whole_checkpoints(storage / "s2-train")

    # The resume writes a checkpoint; then the disk fills (~256 KiB left: less than another checkpoint).
    written = _checkpoints(storage / "s2-train")
    resumed = subprocess.Popen(
        [sys.executable, "-m", "sinkd_ray.tune", *argv, "--resume"],
        cwd=REPO,
        env=env,
        stdout=(tmp_path / "resume-1.log").open("w"),
        stderr=(tmp_path / "resume-1.err").open("w"),  # files: an unread pipe fills up and blocks the study
    )
    deadline = time.monotonic() + 600
    while not _checkpoints(storage / "s2-train") - written:
        ended = resumed.poll() is not None
        assert not ended and time.monotonic() < deadline, (tmp_path / "resume-1.err").read_text()[-3000:]
        time.sleep(1)
    filler = _fill(storage.parent, leave=256 * 1024)
    filled_at = time.monotonic()
    resumed.wait(timeout=300)
    err = (tmp_path / "resume-1.err").read_text()
    line = one_error_line(subprocess.CompletedProcess(resumed.args, resumed.returncode, "", err))
    assert "is full" in line and "--resume --name s2" in line, line
    assert time.monotonic() - filled_at < 60
    parents, runs = _study_runs(client)
    assert parents[0].info.status == "FAILED", parents[0].info.status
    assert "RUNNING" not in {c.info.status for c in runs}, [c.info.status for c in runs]
    _assert_whole_checkpoints(storage / "s2-train")

    filler.unlink()
    _study([*argv, "--resume"])
    parents, after = _study_runs(client)
    trial_ids = [c.data.tags["sinkd.trial_id"] for c in after]
    assert len(parents) == 1 and len(after) == 3 and len(set(trial_ids)) == 3  # no duplicate MLflow run
    assert all(c.info.status == "FINISHED" for c in after), [c.info.status for c in after]
    for run_id in finished_before.values():  # the finished trial was not run again
        history = client.get_metric_history(run_id, "dev_metric")
        assert sorted(m.step for m in history) == list(range(1, 11))
    assert parents[0].info.status == "FINISHED"
    versions = client.search_model_versions("name = 'sinkd-cola-student'")
    assert len(versions) == 1  # one model version for the study, not one per finish

    # Finishing again (a second --resume of a completed study) registers no second version of the same trial.
    _study([*argv, "--resume"])
    assert len(client.search_model_versions("name = 'sinkd-cola-student'")) == 1


# Refused before Ray starts: checked in one process, one command line after another (a process each cost ~7 s of
# imports, three minutes in all); the two that need the session's Ray runtime run on their own below.
REFUSED_UP_FRONT = [
    (["--task", "stsb"], "STS-B, a regression task"),
    (["--task", "colaa"], "unknown task"),
    (["--alpha", "1.5"], "alpha=1.5 is outside [0, 1]"),
    (["--alpha", "0.1", "--lr", "1e-3"], "fix every setting"),  # nothing left to search
    (["--epochs", "0"], "epochs=0 is outside [1, inf)"),
    (["--workers", "3"], "not divisible by workers=3"),
    (["--search-space", "nope"], "search space 'nope' not found"),
    (["--student", "/no/such/model"], "model path '/no/such/model' not found"),
    (["--data-dir", "/no/such/dir"], "/no/such/dir"),
    (["--num-trials", "0"], "num_trials=0 is outside [1, inf)"),
    (["--lr", "-1e-5"], "lr=-1e-05 is outside (0, inf)"),
    (["--tracking-uri", "foo://bar"], "scheme 'foo' is not one MLflow can track to"),
    (["--tracking-uri", "http://127.0.0.1:9"], "no MLflow server answers"),
    (["--storage-path", "/dev/null"], "is a file — give a folder"),
    (["--student-layers", "12"], "has only 4 layers"),
    (["--max-train-examples", "1"], "1 training examples give no full step of 16"),
]
REFUSED_BY_THE_CLUSTER = [
    (["--gpus-per-worker", "1", "--resources-wait", "0"], "cannot place 1 worker(s)"),
    # 2 nodes of 2 CPUs: the workers take both, and the trial's actor must run on the head
    (["--cpus-per-worker", "2", "--workers", "2", "--resources-wait", "0"], "+ 0.01 CPU on the head for the trial"),
]
_ONE_AFTER_ANOTHER = """
import contextlib, io, json, sys
from sinkd_ray.cli import run_cli
from sinkd_ray.tune import main
results = []
for argv in json.load(open(sys.argv[1])):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            run_cli(main, argv)
            code = 0
        except SystemExit as exc:
            code = exc.code
    results.append([code, err.getvalue()])
json.dump(results, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def refused_up_front(tmp_path_factory, tiny_bert_dir, tiny_teacher, tune_data_dir):
    """(exit code, stderr, storage folder) of each REFUSED_UP_FRONT command line, and the process's whole stderr."""
    root = tmp_path_factory.mktemp("refused")
    folders = [root / str(i) for i in range(len(REFUSED_UP_FRONT))]
    for folder in folders:
        folder.mkdir()
    cases = [
        _argv(f, tiny_bert_dir, tiny_teacher, tune_data_dir, *extra) for f, (extra, _) in zip(folders, REFUSED_UP_FRONT)
    ]
    (root / "cases.json").write_text(json.dumps(cases))
    proc = subprocess.run(
        [sys.executable, "-c", _ONE_AFTER_ANOTHER, str(root / "cases.json"), str(root / "results.json")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((root / "results.json").read_text())
    return [(code, err, folder) for (code, err), folder in zip(results, folders)], proc.stderr


def _assert_one_line_refusal(code, stderr, storage: Path, message: str) -> None:
    assert code == 2, (code, stderr[-2000:])
    err = [line for line in stderr.strip().splitlines() if line.startswith("error: ")]
    assert "Traceback" not in stderr
    assert len(err) == 1 and message in err[0], stderr[-2000:]
    assert not (storage / "runs" / "mlflow.db").exists()  # nothing started


@pytest.mark.parametrize("case", range(len(REFUSED_UP_FRONT)), ids=[m for _, m in REFUSED_UP_FRONT])
def test_bad_cli_values_are_one_line_errors(refused_up_front, case):
    results, whole_stderr = refused_up_front
    code, stderr, storage = results[case]
    _assert_one_line_refusal(code, stderr, storage, REFUSED_UP_FRONT[case][1])
    assert "Traceback" not in whole_stderr  # nor anything a library logged past the captured stream


@pytest.mark.parametrize("extra, message", REFUSED_BY_THE_CLUSTER, ids=[m for _, m in REFUSED_BY_THE_CLUSTER])
def test_requests_the_cluster_cannot_place_are_one_line_errors(
    tmp_path, tiny_bert_dir, tiny_teacher, tune_data_dir, extra, message
):
    argv = _argv(tmp_path, tiny_bert_dir, tiny_teacher, tune_data_dir, *extra)
    proc = subprocess.run(
        [sys.executable, "-m", "sinkd_ray.tune", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    _assert_one_line_refusal(proc.returncode, proc.stderr, tmp_path, message)


def test_the_ce_baseline_keeps_the_studys_settings_and_drops_the_teacher():
    """--ce-baseline: the demo's space fixes b = 32 and two epochs; the baseline trains with those and the best
    trial's lr, CE only, and without a teacher (one left in the spec ran at every step: 2.7× slower, for nothing)."""
    from sinkd_ray.config import DistillConfig, RunSpec, TrainConfig
    from sinkd_ray.search_space import load_search_space
    from sinkd_ray.study import base_spec
    from sinkd_ray.tune import ce_baseline_spec

    space = load_search_space("demo", "cola")
    spec = base_spec(space, RunSpec(TrainConfig(teacher="teachers/cola"), DistillConfig()), typed=set())
    baseline = ce_baseline_spec(spec, {"lr": 1.1e-4, "beta": 0.6})
    assert baseline.train.teacher is None and baseline.train.lr == 1.1e-4
    assert (baseline.distill.alpha, baseline.distill.beta, baseline.distill.gamma) == (0.0, 0.0, 0.0)
    assert baseline.distill.batch_size == space.fixed["batch_size"] == 32
    assert baseline.train.epochs == space.fixed["epochs"] == 2
    assert spec.train.teacher == "teachers/cola"  # the study's own spec is untouched


def test_asha_max_t_follows_a_searched_epochs_range():
    """Epochs can be searched: ASHA's max_t is the largest value the space gives, not the CLI's --epochs."""
    from sinkd_ray.config import DistillConfig, RunSpec, TrainConfig
    from sinkd_ray.search_space import Param, SearchSpace
    from sinkd_ray.study import max_evaluations, stopped_early

    spec = RunSpec(TrainConfig(epochs=3), DistillConfig(batch_size=16))
    searched = SearchSpace("x", search={"epochs": Param("epochs", "int", (2, 7))})
    assert max_evaluations(searched, spec, 1000) == 7
    chosen = SearchSpace("x", search={"epochs": Param("epochs", "choice", (4, 10, 5))})
    assert max_evaluations(chosen, spec, 1000) == 10
    assert max_evaluations(SearchSpace("x"), spec, 1000) == 3
    step_wise = RunSpec(TrainConfig(epochs=2, eval_every_steps=10), DistillConfig(batch_size=16))
    assert max_evaluations(SearchSpace("x"), step_wise, 1000) == 2 * 62 // 10 + 1 + 2  # ceil(124/10) + 2 epoch ends

    class R:  # a finished trial that ran its own 5 searched epochs was not stopped early
        def __init__(self, epochs, iterations):
            self.error, self.config, self.metrics = None, {"epochs": epochs}, {"training_iteration": iterations}

    assert stopped_early([R(5, 5), R(7, 2), R(2, 2)], spec) == 1


@pytest.mark.ray
def test_a_tpe_study_on_its_own_runtime_beside_another_registers_a_finite_student_past_diverging_trials(
    tmp_path, ray_runtime, tiny_bert_dir, tiny_teacher, tune_data_dir
):
    """Two local Ray runtimes on one machine (this test session's and the study's own): Ray Train's placement-
    group cleaner used to fail with "multiple active Ray instances" and the second trial waited forever.
    The study is TPE's, end to end; the trial TPE gives lr 1e30 diverges: it fails alone (ERROR, with the
    reason), the study goes on, and the registered student is a finite one from the other trial. (One study shows
    both: each study is several Ray Train runs of several processes, seconds of CPU each.)"""
    import math

    from safetensors.torch import load_file

    # two trials: with seed 0 TPE gives the first lr 1e30 (it diverges), the second 1e-2, which must still run
    argv = _argv(
        tmp_path,
        tiny_bert_dir,
        tiny_teacher,
        tune_data_dir,
        "--num-trials",
        "2",
        "--name",
        "tpe",
        "--alpha",
        "0.25",  # the space searches α in [0, 0.3]: the flag fixes it for every trial
        space_text=TPE_SPACE,
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    # a hang (the old deadlock: the second trial waiting for ever) stops the progress lines; a slow host does not
    proc = run_watched([sys.executable, "-m", "sinkd_ray.tune", *argv], tmp_path / "own.log", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "study tpe: 1 trials in" in out and "1 failed (" in out and "registered model" in out
    assert "Token authentication is enabled" in proc.stderr  # the runtime it started refuses unauthenticated calls

    assert "--alpha fixes alpha for every trial" in out
    client = _client(tmp_path)
    _, children = _study_runs(client)
    assert {c.data.params["alpha"] for c in children} == {"0.25"}
    lrs = {c.data.tags["sinkd.trial_id"]: float(c.data.params["lr"]) for c in children}
    assert sorted(lrs.values()) == [1e-2, 1e30]  # seed 0: TPE tried both
    for child in children:
        diverged = float(child.data.params["lr"]) == 1e30
        assert child.info.status == ("FAILED" if diverged else "FINISHED"), child.data.params
    assert "failed (" in out and "diverged: lower the learning rate" in out
    version = client.get_model_version_by_alias("sinkd-cola-student", "best")
    assert lrs[client.get_run(version.run_id).data.tags["sinkd.trial_id"]] == 1e-2
    weights = load_file(str(tmp_path / "runs" / "tpe" / "best_student" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
    assert not math.isnan(float(out.split("dev mcc = ")[1].split()[0]))
