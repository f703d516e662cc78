"""Scale-out: cluster.yaml against Ray's schema, and a study whose trials run on two Ray nodes."""

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

from sinkd_ray.cluster import load_cluster_file, validate_cluster_config
from sinkd_ray.errors import SinkdError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_schema_and_has_the_node_types_the_docs_promise(cluster_config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cluster_config)))  # Ray's own check, no credentials needed
    prepared = load_cluster_file(REPO / "cluster.yaml")
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head" and {"gpu-1x", "gpu-8x"} <= set(types)
    assert all(types[t]["min_workers"] == 0 and types[t]["max_workers"] >= 1 for t in ("gpu-1x", "gpu-8x"))
    head_setup = " ".join(prepared["head_setup_commands"])
    assert "mlflow server" in head_setup and "--artifacts-destination s3://" in head_setup
    assert "hostname -I" in head_setup  # bound to the private interface, not 0.0.0.0
    assert any("pip install" in c and "sinkd_ray" in c for c in prepared["setup_commands"])


@pytest.mark.parametrize("breakage, match", [
    (lambda c: c.update(bogus_key=1), "bogus_key"),
    (lambda c: c["available_node_types"]["gpu-1x"].update(min_workers=5, max_workers=2), "min_workers=5 > max"),
    (lambda c: c["available_node_types"]["gpu-8x"].update(min_workers=2) or c.update(max_workers=1),
     "max_workers"),
    (lambda c: c["provider"].update(aws_secret_access_key="abc"), "credential"),
    (lambda c: c["available_node_types"]["gpu-1x"].update(max_workers="many"), "many"),
])
def test_broken_copies_of_cluster_yaml_fail_with_one_line(cluster_config, breakage, match):
    broken = copy.deepcopy(cluster_config)
    breakage(broken)
    with pytest.raises(SinkdError, match=match) as info:
        validate_cluster_config(broken, "broken.yaml")
    assert "\n" not in str(info.value) and str(info.value).startswith("broken.yaml")


def test_unknown_key_also_fails_rays_own_validation(cluster_config):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(cluster_config)
    broken["available_node_types"]["gpu-1x"]["gpus_please"] = 4
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_check_command_reports_a_valid_file(capsys):
    from sinkd_ray.cluster import main

    assert main(["check", str(REPO / "cluster.yaml")]) == 0
    assert "valid (aws" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------- multi-node


SPACE = """\
sampler: grid
search:
  lr: {choice: [1.0e-2, 3.0e-3]}
fixed:
  batch_size: 16
  epochs: 1
"""


@pytest.mark.ray
def test_a_study_on_two_nodes_and_uri_storage_completes(tmp_path, ray_cluster, tiny_bert_dir, tiny_teacher_dir,
                                                        cola_fixture_dir, monkeypatch, capsys):
    """Two concurrent trials, each worker needing the one unit of NODE_SLOT every node has: they must run on
    different nodes (the head and the worker node of the session's local cluster).

    The storage is a file:// URI, which Ray reaches through pyarrow exactly like s3:// or gs://: the teacher's
    logits travel through the object store, the driver's own files go to $SINKD_CACHE_DIR, and the best
    checkpoint is fetched from the storage URI before it is registered."""
    import mlflow
    from conftest import NODE_SLOT
    from mlflow.tracking import MlflowClient

    import ray
    from sinkd_ray.models import load_student
    from sinkd_ray.tasks import get_task
    from sinkd_ray.tune import main as tune_main

    assert len([n for n in ray.nodes() if n["Alive"]]) >= 2
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    monkeypatch.setenv("SINKD_CACHE_DIR", str(tmp_path / "driver-cache"))
    bucket, tracking = tmp_path / "bucket", f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["--task", "cola", "--teacher", str(tiny_teacher_dir), "--student", str(tiny_bert_dir),
            "--student-layers", "2", "--data-dir", str(cola_fixture_dir), "--search-space", str(space),
            "--storage-path", bucket.as_uri(), "--tracking-uri", tracking, "--max-length", "32",
            "--eval-batch-size", "20", "--seed", "0", "--num-trials", "2", "--max-concurrent-trials", "2",
            "--cpus-per-worker", "1", "--worker-resources", f"{NODE_SLOT}=1", "--name", "multinode"]
    assert tune_main(argv) == 0
    assert "registered model: sinkd-cola-student" in capsys.readouterr().out

    # Trials ran on two different nodes (placement.json: the node of every rank, written by the workers).
    placements = [json.loads(p.read_text())["node_ids"] for p in (bucket / "multinode-train").glob(
        "trial_*/checkpoint_*/placement.json")]
    trial_nodes = {nodes[0] for nodes in placements}
    assert len(placements) == 2 and len(trial_nodes) == 2, placements
    assert trial_nodes <= {n["NodeID"] for n in ray.nodes()}

    # Checkpoints live on the storage URI; the driver's cache and exported student on the driver.
    assert len(list((bucket / "multinode-train").glob("trial_*/checkpoint_*/student/config.json"))) == 2
    assert list((tmp_path / "driver-cache" / "teacher_cache").glob("*.safetensors"))
    assert (tmp_path / "driver-cache" / "multinode" / "best_student" / "config.json").exists()
    assert not (bucket / "teacher_cache").exists()
    # Inputs only the driver's disk had (the student folder, the task's data files) were shipped to the storage
    # for the workers (`storage.ship` / `localize`).
    shipped = {p.name for p in (bucket / "_inputs").glob("*/*")}
    assert Path(tiny_bert_dir).name in shipped and "cola-data" in shipped

    # Results and the registered model are complete.
    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("sinkd-cola")
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2 and all(client.get_metric_history(c.info.run_id, "dev_metric") for c in children)
    version = client.get_model_version_by_alias("sinkd-cola-student", "best")
    local = mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(tmp_path / "dl"),
                                                tracking_uri=client.tracking_uri)
    student = load_student(local, get_task("cola"))
    assert student(torch.tensor([[2, 5, 3]]), torch.ones(1, 3, dtype=torch.long)).shape == (1, 2)
