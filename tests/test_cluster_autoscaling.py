"""cluster.yaml's node types, rehearsed on this machine with Ray's fake multi-node provider.

The provider (``ray.autoscaler._private.fake_multi_node``, ``RAY_FAKE_CLUSTER=1``) makes the real autoscaler
launch local "nodes" of the declared types. The study is submitted the way the README does it (a Ray job), and
the test checks what a user relies on: the autoscaler starts worker nodes of the requested type, the trials run
on them, the best student is registered, and the nodes go away once idle.

What differs from AWS, on purpose: the head type is called ``ray.head.default`` (the provider's fixed name);
each node's GPUs become the custom resource ``sinkd_fake_gpu`` (torch here is a CPU build, and Ray Train turns
a "GPU" request into CUDA) and its CPUs are capped at 2 (this machine has 2 cores); the ``accelerator_type:<X>``
resource Ray adds to GPU nodes on AWS is declared explicitly; nodes are idle after 12 s instead of 10 minutes.

The fake cluster lives beside the test session's own Ray runtime (and other runtimes on this machine): its own
ports and temp dir, ``RAY_ADDRESS`` set explicitly for everything that runs in it (Train V2's placement-group
cleaner resolves the address itself and fails when two local clusters are found), and a cleanup that ends only
its own processes — never ``ray stop``, which would end every Ray runtime on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import free_port, tiny_study_argv

REPO = Path(__file__).resolve().parents[1]
STAND_IN_GPU = "sinkd_fake_gpu"
# The accelerator Ray reports (as resource accelerator_type:<X>) for the instance families cluster.yaml uses.
ACCELERATORS = {"g5": "A10G", "g6": "L4", "g6e": "L40S", "p4d": "A100", "p4de": "A100", "p5": "H100"}
IDLE_TIMEOUT_MINUTES = 0.2
OBJECT_STORE = 100 * 2**20


def fake_config(cluster: dict, gcs_address: str) -> dict:
    """A fake_multinode autoscaler config with cluster.yaml's worker node types (names, min/max, resources)."""
    head = cluster["head_node_type"]
    types = {"ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0}}
    for name, node_type in cluster["available_node_types"].items():
        if name == head:
            continue
        resources, family = node_type["resources"], node_type["node_config"]["InstanceType"].split(".")[0]
        types[name] = {
            "min_workers": node_type.get("min_workers", 0),
            "max_workers": min(node_type["max_workers"], 2),
            "resources": {
                "CPU": min(resources["CPU"], 2),
                STAND_IN_GPU: resources["GPU"],
                f"accelerator_type:{ACCELERATORS[family]}": 1,
                "object_store_memory": OBJECT_STORE,
            },
            "node_config": {},
        }
    return {
        "cluster_name": "sinkd-fake",
        "max_workers": 2,
        "upscaling_speed": cluster.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": IDLE_TIMEOUT_MINUTES,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "available_node_types": types,
        "head_node_type": "ray.head.default",
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@dataclass
class FakeCluster:
    gcs: str
    dashboard: str
    temp_dir: str
    config: dict
    process: subprocess.Popen

    @contextlib.contextmanager
    def addressed(self):
        """Ray's job and state clients let RAY_ADDRESS override the address they are given: point it here for
        one call only (the rest of the session keeps its own runtime's address)."""
        saved = os.environ.get("RAY_ADDRESS")
        os.environ["RAY_ADDRESS"] = self.dashboard
        try:
            yield
        finally:
            if saved is None:
                os.environ.pop("RAY_ADDRESS", None)
            else:
                os.environ["RAY_ADDRESS"] = saved

    def client(self):
        from ray.job_submission import JobSubmissionClient

        with self.addressed():
            return JobSubmissionClient(self.dashboard)

    def submit(self, **job) -> str:
        """Submit a job; the dashboard answers before its agent is ready ("No available agent to submit job,
        please try again later"), so that answer is retried."""
        deadline = time.monotonic() + 120
        while True:
            try:
                return self.client().submit_job(**job)
            except RuntimeError as exc:
                if "try again later" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(2)

    def autoscaler_report(self) -> dict:
        """The autoscaler's own summary (what `ray status` prints), from the fake cluster's GCS."""
        from ray._raylet import GcsClient

        raw = GcsClient(address=self.gcs).internal_kv_get(b"__autoscaling_status", None)
        # The monitor writes the report only once its autoscaler has a summary; earlier records hold load metrics only.
        return (json.loads(raw).get("autoscaler_report") or {}) if raw else {}

    def occupants(self) -> str:
        """What is still alive on the cluster (actors, placement groups, the GCS's resource view): shown when a
        node is not released, so the failure says what holds it."""
        from ray.util.state import list_actors, list_placement_groups

        with self.addressed():
            actors = list_actors(address=self.dashboard, filters=[("state", "!=", "DEAD")], limit=100)
            groups = list_placement_groups(address=self.dashboard, filters=[("state", "!=", "REMOVED")], limit=100)
        return (
            f"actors: {[(a.class_name, a.state, a.node_id, a.name) for a in actors]}; "
            f"placement groups: {[(g.name, g.state, g.bundles) for g in groups]}; "
            f"autoscaler: {self.autoscaler_report()}"
        )

    def actor_placement(self) -> tuple[str, dict[str, set[str]]]:
        """The head's node id, and each actor class → the nodes its actors ran on (dead ones included)."""
        from ray.util.state import list_actors, list_nodes

        with self.addressed():
            head = next(n.node_id for n in list_nodes(address=self.dashboard) if n.is_head_node)
            actors = list_actors(address=self.dashboard, limit=1000)
        placement: dict[str, set[str]] = {}
        for actor in actors:
            placement.setdefault(actor.class_name, set()).add(actor.node_id)
        return head, placement

    def alive_workers(self) -> list[str]:
        from ray.util.state import list_nodes

        with self.addressed():
            nodes = list_nodes(address=self.dashboard)
        return [n.node_id for n in nodes if n.state == "ALIVE" and not n.is_head_node]


def _our_processes(temp_dir: str, gcs: str):
    """Processes of the fake cluster that left its process group: matched by its temp dir or its GCS address."""
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid == os.getpid():
                continue
            if temp_dir in " ".join(proc.info["cmdline"] or []) or proc.environ().get("RAY_ADDRESS") == gcs:
                yield proc
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue


@pytest.fixture(scope="session")
def fake_cluster():
    """A fake multi-node cluster with cluster.yaml's node types, for the whole session (its idle nodes are released
    while the other tests run); always torn down, even when a test fails."""
    from ray._private.services import get_node_ip_address
    from ray.autoscaler._private.util import validate_config

    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    gcs_port, dashboard_port, client_port, agent_port = (free_port() for _ in range(4))
    gcs = f"{get_node_ip_address()}:{gcs_port}"
    config = fake_config(cluster, gcs)
    validate_config(config)  # Ray's own schema: the fake config is a valid autoscaler config
    temp_dir = tempfile.mkdtemp(prefix="sinkd-fake-", dir="/tmp")  # short: Ray's socket paths live under it
    config_path = Path(temp_dir, "autoscaling.json")
    config_path.write_text(json.dumps(config))
    env = {
        **os.environ,
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        # Every process of this cluster (jobs, Train controllers, fake nodes) inherits these.
        "RAY_ADDRESS": gcs,
        # ~/.ray/auth_token may exist (another runtime made it); `ray start` would then require a token
        # that this test's client does not send. This cluster is local and short-lived.
        "RAY_AUTH_MODE": "disabled",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "RAY_DEDUP_LOGS": "0",
    }
    command = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--block",
        f"--autoscaling-config={config_path}",
        f"--port={gcs_port}",
        f"--dashboard-port={dashboard_port}",
        "--dashboard-host=127.0.0.1",
        f"--ray-client-server-port={client_port}",
        f"--dashboard-agent-listen-port={agent_port}",
        "--num-cpus=2",
        f"--object-store-memory={OBJECT_STORE}",
        f"--temp-dir={temp_dir}",
        "--include-dashboard=true",
        "--disable-usage-stats",
    ]
    log = open(Path(temp_dir, "head.log"), "w")
    # Its own session and process group: the cleanup below ends this group, nothing else.
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    fake = FakeCluster(gcs, f"http://127.0.0.1:{dashboard_port}", temp_dir, config, process)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                fake.client()
                break
            except Exception:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        f"the fake cluster's head did not come up: {Path(temp_dir, 'head.log').read_text()[-2000:]}"
                    )
                time.sleep(2)
        yield fake
    finally:
        try:
            client = fake.client()
            for job in client.list_jobs():
                if not job.status.is_terminal():
                    client.stop_job(job.submission_id)
        except Exception:
            pass
        process.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for proc in _our_processes(temp_dir, gcs):  # e.g. the job's driver, which Ray starts in its own session
            try:
                proc.kill()
            except Exception:
                pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


SPACE = """\
sampler: grid
search:
  lr: {choice: [1.0e-2, 3.0e-3]}
fixed:
  batch_size: 16
  epochs: 1
"""


def _wait(condition, seconds: float, what: str, diagnostics=lambda: ""):
    """Poll ``condition`` until it returns a truthy value; fail with ``what`` after ``seconds`` (a bound on the
    test's run time, not a performance assertion)."""
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} (waited {seconds:.0f} s) {diagnostics()}")
        time.sleep(2)


@dataclass
class AutoscaledStudy:
    job: str
    logs: str
    node_types: dict[str, str]  # node id -> node type, as the autoscaler reported them while they lived
    root: Path
    tracking: str
    t0: float


@pytest.fixture(scope="session")
def autoscaled_study(fake_cluster, ray_cluster, tmp_path_factory, tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir):
    """The README's study, submitted as a Ray job to the fake cluster and run to its end (once per session)."""
    root = tmp_path_factory.mktemp("autoscaled")
    assert {"gpu-1x", "gpu-8x"} <= set(fake_cluster.config["available_node_types"])
    space = root / "space.yaml"
    space.write_text(SPACE)
    bucket, tracking = root / "bucket", f"sqlite:///{root / 'mlflow.db'}"
    # The README's job with its --gpus-per-worker replaced by the stand-in resource, pinned to the gpu-1x type the
    # way the README pins a type (accelerator_type), one node per trial: two concurrent trials need two nodes.
    entrypoint = shlex.join(
        ["python", "-m", "sinkd_ray.tune"]
        + tiny_study_argv(tiny_teacher_dir, tiny_bert_dir, cola_fixture_dir, space, f"{bucket.as_uri()}/runs")
        + (
            f"--tracking-uri {tracking} --num-trials 2 --max-concurrent-trials 2 --cpus-per-worker 1 "
            f"--worker-resources {STAND_IN_GPU}=1,accelerator_type:A10G=0.001 --name autoscaled".split()
        )
    )
    client = fake_cluster.client()
    t0 = time.monotonic()
    job = fake_cluster.submit(
        entrypoint=entrypoint, runtime_env={"env_vars": {"SINKD_CACHE_DIR": str(root / "driver-cache")}}
    )
    node_types: dict[str, str] = {}

    def finished():
        node_types.update(fake_cluster.autoscaler_report().get("node_type_mapping") or {})
        return client.get_job_status(job).is_terminal()

    _wait(finished, 900, "the study did not finish", lambda: client.get_job_logs(job)[-3000:])
    logs = client.get_job_logs(job)
    print(f"study job finished in {time.monotonic() - t0:.0f} s; nodes seen: {node_types}")  # shown on failure
    assert client.get_job_status(job) == "SUCCEEDED", logs[-3000:]
    return AutoscaledStudy(job, logs, node_types, root, tracking, t0)


@pytest.mark.ray
def test_the_readme_study_autoscales_gpu_nodes_of_cluster_yaml(autoscaled_study, fake_cluster, ray_cluster):
    import ray
    from mlflow.tracking import MlflowClient

    study = autoscaled_study
    assert "registered model: sinkd-cola-student" in study.logs

    # The autoscaler started gpu-1x nodes (none of the other type), and each trial ran on a different one of them.
    placements = [
        json.loads(p.read_text())["node_ids"]
        for p in (study.root / "bucket" / "runs" / "autoscaled-train").glob("trial_*/checkpoint_*/placement.json")
    ]
    trial_nodes = {nodes[0] for nodes in placements}
    assert len(placements) == 2 and len(trial_nodes) == 2, placements
    assert {study.node_types.get(node) for node in trial_nodes} == {"gpu-1x"}, (trial_nodes, study.node_types)
    assert "gpu-8x" not in study.node_types.values()

    # Only the Train workers ran on GPU nodes. Trial actors stay on the head, and with them the Train controllers
    # and Train's detached AutoscalingCoordinator (created on the first controller's node, alive for good): on a
    # GPU node it kept that node busy, so the autoscaler never released it.
    head, placement = fake_cluster.actor_placement()
    for name in ("ImplicitFunc", "TrainController", "_AutoscalingCoordinatorActor"):
        assert placement.get(name) == {head}, (name, head, placement)
    assert placement["RayTrainWorker"] <= set(trial_nodes), placement

    version = MlflowClient(study.tracking).get_model_version_by_alias("sinkd-cola-student", "best")
    assert version.run_id

    # The test session's own cluster was left alone.
    assert len([n for n in ray.nodes() if n["Alive"]]) >= 2


@pytest.mark.ray
@pytest.mark.last  # run after every other test: the release takes minutes, the rest of the suite overlaps it
def test_idle_gpu_nodes_of_the_autoscaled_study_are_released(autoscaled_study, fake_cluster):
    # Idle nodes go away: the autoscaler terminates them after idle_timeout_minutes. A node counts as idle only
    # once Ray Train V2's resource request for the finished run is gone, and in these runs it was not cancelled
    # when the run ended but expired (AUTOSCALING_REQUESTS_EXPIRE_TIME_S = 180 s in ray/train/v2/.../
    # autoscaling_coordinator_client.py): release comes ~3 min + the idle timeout after the last trial.
    _wait(
        lambda: (
            not fake_cluster.alive_workers()
            and not (fake_cluster.autoscaler_report().get("active_nodes") or {}).get("gpu-1x")
        ),
        360,
        "idle gpu-1x nodes were not released",
        fake_cluster.occupants,
    )
    print(f"idle nodes released {time.monotonic() - autoscaled_study.t0:.0f} s after the submission")
