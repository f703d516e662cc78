"""Bad input and hostile conditions through the real command lines: each ends in one `error:` line, in seconds,
with nothing half-done (no Ray runtime waited on for ever, no MLflow run left RUNNING)."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, one_error_line, tiny_study_argv

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], timeout: float = 120, **env) -> tuple[subprocess.CompletedProcess, float]:
    clean = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**clean, "HF_HUB_OFFLINE": "1", **env},
    )
    return proc, time.monotonic() - t0


def _train_args(student, teacher, data, storage, *extra) -> list[str]:
    return [
        "-m",
        "sinkd_ray.train",
        "--task",
        "cola",
        "--student",
        str(student),
        "--student-layers",
        "2",
        "--teacher",
        str(teacher),
        "--data-dir",
        str(data),
        "--max-length",
        "32",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--no-bf16",
        "--storage-path",
        str(storage),
        *extra,
    ]


def test_a_ray_address_that_does_not_answer_is_refused_in_seconds(
    tmp_path, tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir
):
    """RAY_ADDRESS at a closed port: ray.init used to retry it for ever (and Ctrl+C did not stop it)."""
    closed = free_port()
    args = _train_args(tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir, tmp_path / "runs")
    proc, elapsed = _run(args, RAY_ADDRESS=f"127.0.0.1:{closed}")
    line = one_error_line(proc)
    assert f"cannot reach the Ray cluster at 127.0.0.1:{closed}" in line and "unset RAY_ADDRESS" in line
    assert elapsed < 60


def test_a_corrupt_teacher_weights_file_is_refused_before_anything_starts(
    tmp_path, tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir
):
    """A truncated model.safetensors: the preflight reads its header (it read only config.json), so the run stops
    in one line before Ray starts, instead of a SafetensorError traceback from a worker a minute later."""
    broken = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    proc, elapsed = _run(_train_args(tiny_bert_dir, broken, cola_fixture_dir, tmp_path / "runs"))
    line = one_error_line(proc)
    assert "model.safetensors is corrupt or truncated" in line and "save the model again" in line
    assert elapsed < 60 and "Started a local Ray instance" not in proc.stderr + proc.stdout
    garbage = tmp_path / "garbage"
    shutil.copytree(tiny_teacher_dir, garbage)
    (garbage / "model.safetensors").write_bytes(b"\xff" * 64)
    line = one_error_line(_run(_train_args(tiny_bert_dir, garbage, cola_fixture_dir, tmp_path / "runs"))[0])
    assert "corrupt or truncated" in line


def test_a_negative_seed_is_refused_up_front(tmp_path, tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir):
    """--seed -1 used to fail in every worker, be retried three times, and end with "rerun … to resume"."""
    proc, elapsed = _run(_train_args(tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir, tmp_path / "runs", "--seed=-1"))
    line = one_error_line(proc)
    assert "seed=-1 is outside [0, 4.29497e+09]" in line and "resume" not in line
    assert elapsed < 60


def test_a_corrupt_mlflow_store_is_refused_before_ray_and_the_teacher(
    tmp_path, tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir
):
    storage = tmp_path / "runs"
    storage.mkdir()
    (storage / "mlflow.db").write_bytes(b"this is not a database" * 100)
    space = tmp_path / "space.yaml"
    space.write_text("sampler: grid\nsearch:\n  lr: {choice: [1.0e-3]}\nfixed:\n  batch_size: 16\n  epochs: 1\n")
    argv = tiny_study_argv(tiny_teacher_dir, tiny_bert_dir, cola_fixture_dir, space, storage)
    proc, elapsed = _run(["-m", "sinkd_ray.tune", *argv])
    line = one_error_line(proc)
    assert "the MLflow store cannot be opened" in line and "move the file aside" in line
    assert elapsed < 60 and "Started a local Ray instance" not in proc.stderr + proc.stdout


def test_a_float_without_a_dot_in_a_search_space_says_how_to_write_it(tmp_path):
    from sinkd_ray.errors import SinkdError
    from sinkd_ray.search_space import load_search_space

    space = tmp_path / "space.yaml"
    space.write_text("search:\n  lr: {loguniform: [1.0e-5, 1.0e-4]}\nfixed:\n  weight_decay: 1e-2\n")
    with pytest.raises(SinkdError, match=r"weight_decay='1e-2' is text, not a number: .* write 1\.0e-2$"):
        load_search_space(str(space))


def test_a_failed_ray_start_says_what_happened_and_what_to_do(monkeypatch):
    """Ray's own start failing (seen: "node timed out during startup … GCS overloaded", when three commands started
    at once beside a running study) is one line with what to do, not Ray's traceback."""
    import ray

    from sinkd_ray import runtime
    from sinkd_ray.errors import SinkdError

    def overloaded(**kwargs):
        raise Exception("The current node timed out during startup. This could happen because the GCS is overloaded")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", overloaded)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(SinkdError, match=r"did not start \(The current node timed out .*overloaded.* --address"):
        runtime.connect()


def test_a_command_ends_even_when_its_shutdown_hangs(tmp_path):
    """After its last line a command exits within SINKD_EXIT_TIMEOUT_S, however long a shutdown handler or a
    leftover thread would keep it (a finished `train --stage teacher` once stayed for minutes)."""
    script = tmp_path / "hangs.py"
    script.write_text(
        "import atexit, threading, time\n"
        "from sinkd_ray.cli import run_cli\n"
        "def main(argv):\n"
        "    threading.Thread(target=time.sleep, args=(600,)).start()\n"
        "    atexit.register(time.sleep, 600)\n"
        "    print('teacher: dev mcc=0.5 in 1s', flush=True)\n"
        "    return 0\n"
        "run_cli(main)\n"
    )
    proc, elapsed = _run([str(script)], timeout=60, SINKD_EXIT_TIMEOUT_S="3")
    assert proc.returncode == 0 and "teacher: dev mcc=0.5" in proc.stdout
    assert elapsed < 30 and "exiting without waiting further" in proc.stderr


# ------------------------------------------------------------------------------------------- a full disk
SPACE = "sampler: grid\nsearch:\n  lr: {choice: [1.0e-2, 3.0e-3]}\nfixed:\n  batch_size: 16\n  epochs: 3\n"


def test_a_storage_too_small_for_the_study_is_refused_up_front(
    tmp_path, small_disk, tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir
):
    disk = small_disk("2m")
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    argv = tiny_study_argv(tiny_teacher_dir, tiny_bert_dir, cola_fixture_dir, space, disk / "runs")
    proc, elapsed = _run(["-m", "sinkd_ray.tune", *argv])
    line = one_error_line(proc)
    assert "MiB free, and this study writes up to about" in line and "free space or choose another" in line
    assert elapsed < 60 and not (disk / "runs" / "mlflow.db").exists()


def test_two_commands_on_one_study_name_the_second_is_refused_until_the_first_ends(tmp_path):
    """The study's lock is an flock the kernel drops when its process ends, however it ends (no stale lock)."""
    from sinkd_ray.errors import SinkdError
    from sinkd_ray.storage import StorageLayout

    layout = StorageLayout.at(str(tmp_path / "runs"))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from sinkd_ray.storage import StorageLayout; "
            f"lock = StorageLayout.at({str(tmp_path / 'runs')!r}).lock_study('s'); "
            "print('held', flush=True); time.sleep(60)",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(SinkdError, match=rf"study 's' is running in another command right now \(pid {holder.pid}\)"):
        layout.lock_study("s")
    holder.kill()
    holder.wait()
    layout.lock_study("s").close()  # free again once the holder is gone (killed, not cleaned up)


def test_a_resumed_study_refuses_a_search_space_that_changed():
    from sinkd_ray.search_space import Param, SearchSpace

    a = SearchSpace("a.yaml", search={"lr": Param("lr", "choice", (1e-3, 1e-2))}, fixed={"epochs": 2})
    b = SearchSpace("b.yaml", search={"lr": Param("lr", "choice", (1e-3, 1e-2))}, fixed={"epochs": 2})
    c = SearchSpace("a.yaml", search={"lr": Param("lr", "choice", (1e-3, 3e-3))}, fixed={"epochs": 2})
    assert a.digest() == b.digest() != c.digest()  # what it searches counts, not where the file lives


def test_a_worker_whose_checkpoint_meets_a_full_storage_waits_to_be_stopped_then_fails_in_one_line(monkeypatch, capsys):
    """The driver's disk watch stops the study in one line; a worker that raised at once would print pyarrow's
    traceback first (seen on CI) and be retried into the same full disk."""
    import errno
    import types

    from sinkd_ray.errors import SinkdError
    from sinkd_ray.worker import DistillRecipe

    monkeypatch.setenv("SINKD_FULL_STORAGE_WAIT_S", "0.3")

    def full(metrics, path):
        raise OSError(errno.ENOSPC, "Error writing bytes to file")

    recipe = types.SimpleNamespace(_save=lambda path, metrics: None, ctx=types.SimpleNamespace(rank=1))
    started = time.monotonic()
    with pytest.raises(SinkdError, match="the storage is full: the checkpoint of step 7 was not written"):
        DistillRecipe._report(recipe, full, {"step": 7}, True)
    assert time.monotonic() - started >= 0.3
    assert "[rank 1] the storage is full" in capsys.readouterr().out

    def broken(metrics, path):  # another I/O error is not a full disk: raised as it is
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OSError, match="Input/output error"):
        DistillRecipe._report(recipe, broken, {"step": 7}, True)


def test_a_tracking_store_on_a_full_disk_costs_one_line_not_a_traceback(small_disk, capsys):
    """MLflow's SQL store logs a full disk's traceback itself before raising; the study's callback says it once."""
    import logging

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from sinkd_ray.tracking import TrialRunsCallback

    disk = small_disk("4m")
    client = MlflowClient(f"sqlite:///{disk / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("full")).info.run_id
    with (disk / "filler").open("wb") as out:
        out.write(b"\0" * shutil.disk_usage(disk).free)
    records = []
    seen = logging.Handler()
    seen.emit = records.append  # on MLflow's own logger: it does not propagate to pytest's capture
    logging.getLogger("mlflow.store.db.utils").addHandler(seen)
    try:
        with TrialRunsCallback._tolerated(None, "a result"):
            for step in range(10_000):  # until SQLite's free pages are used up too
                client.log_batch(run_id, metrics=[Metric(f"m{i}", 1.0, 0, step) for i in range(200)])
    finally:
        logging.getLogger("mlflow.store.db.utils").removeHandler(seen)
    assert "MLflow: could not log a result (" in capsys.readouterr().out
    assert not records, [r.getMessage()[:200] for r in records]


def test_a_refused_resume_leaves_the_study_run_as_it_found_it(tmp_path):
    """Opening the study for --resume sets its parent run RUNNING; refused for a changed space, it must not stay so
    (benchmarks/bad_inputs.py found it left RUNNING)."""
    import types

    from mlflow.tracking import MlflowClient

    from sinkd_ray.errors import SinkdError
    from sinkd_ray.search_space import Param, SearchSpace
    from sinkd_ray.tune import _check_same_space

    started = SearchSpace("s.yaml", search={"lr": Param("lr", "choice", (1e-3, 1e-2))}, fixed={"epochs": 2})
    changed = SearchSpace("s.yaml", search={"lr": Param("lr", "choice", (1e-3, 3e-3))}, fixed={"epochs": 2})
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.create_run(client.create_experiment("s")).info.run_id
    client.log_param(parent, "search_space_digest", started.digest())
    runs = types.SimpleNamespace(
        client=client, parent_id=parent, finish=lambda status: client.set_terminated(parent, status=status)
    )
    _check_same_space(runs, started, "s")
    assert client.get_run(parent).info.status == "RUNNING"  # the same space: the resume goes on
    with pytest.raises(SinkdError, match="the search space is not the one study s started with"):
        _check_same_space(runs, changed, "s")
    assert client.get_run(parent).info.status == "KILLED"
