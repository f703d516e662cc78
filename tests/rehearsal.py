"""The cluster rehearsal: a study started the way the README starts it, on a Ray cluster of separate nodes.

    python tests/rehearsal.py --out DIR        # writes DIR/report.json and the nodes' logs (run as root)

What a real cluster does to a study and the fake multi-node provider does not, rehearsed on this machine:
- nodes that share no files: each worker node lives in its own network namespace (a veth on a bridge only this
  run uses) and its own mount namespace, with a private /tmp, /dev/shm, HOME and cache dirs; the head's files
  (the teacher it fine-tunes, the GLUE copy, the student) exist only on the head;
- storage reached as a bucket: an S3 server (moto) on the bridge, ``s3://…`` with the endpoint in AWS_ENDPOINT_URL,
  MLflow's server (`python -m sinkd_ray.cluster mlflow-server`) proxying its artifacts there;
- cluster.yaml's own start commands (its auth mode, check-gpus before `ray start`, its setup checks), with a stray
  ~/.ray/auth_token in the head's HOME, as a local `ray.init` there leaves one;
- a node that joins late: the second worker node starts ``LATE_JOIN_S`` after the first is killed mid-trial, longer
  than the 3 × 60 s a worker group used to wait before the trial failed; trials must wait for it;
- the teacher's logits computed on a worker node (the workers need a resource the head lacks).
The test (tests/test_rehearsal.py) reads the report; this script only observes and writes it down.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

NODE_RESOURCE = "sinkd_rehearsal_node"  # one per worker node: a trial's worker takes a whole node
LATE_JOIN_S = 200  # > 3 × 60 s, the wait after which a trial used to fail (controller_failure_limit=2)
BUCKET = "sinkd-rehearsal"
EPOCHS = 8
SPACE = f"""\
sampler: grid
search:
  lr: {{choice: [1.0e-2, 3.0e-3]}}
fixed:
  batch_size: 16
  epochs: {EPOCHS}
"""


# Run from the head on a worker node: which of the head's paths exist there, and whether the bucket does.
PROBE = """
import json, os, sys, ray
ray.init(address=sys.argv[1])
@ray.remote(num_cpus=0, resources={"NODE_RESOURCE": 0.001})
def look(paths):
    import pyarrow.fs
    fs, root = pyarrow.fs.FileSystem.from_uri(os.environ["SINKD_BUCKET"])
    visible = [p for p in paths if os.path.exists(p)]
    info = fs.get_file_info(root).type.name
    return {"ip": ray.util.get_node_ip_address(), "visible": visible, "bucket": info, "home": os.environ.get("HOME")}
print(json.dumps(ray.get(look.remote(sys.argv[2:]))))
"""


def log(message: str) -> None:
    print(f"[rehearsal {time.strftime('%H:%M:%S')}] {message}", flush=True)


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def why_not_possible() -> str | None:
    """None when namespaces can be made here (root, iproute2, unshare), else the reason in one line."""
    if os.geteuid() != 0:
        return "needs root (network and mount namespaces)"
    for tool in ("ip", "unshare", "nsenter"):
        if subprocess.run(["which", tool], capture_output=True).returncode:
            return f"needs {tool} (iproute2 / util-linux)"
    probe = f"sinkd-probe-{os.getpid()}"
    if sh("ip", "netns", "add", probe, check=False).returncode:
        return "cannot create a network namespace here (ip netns add failed)"
    sh("ip", "netns", "del", probe, check=False)
    return None


# ------------------------------------------------------------------------------------------------ network
class Network:
    """A bridge with an address of its own /24 and N namespaces on it, each with one veth: what only this run uses."""

    def __init__(self, tag: str, count: int):
        self.tag, self.count = tag, count
        used = sh("ip", "-4", "-o", "addr").stdout
        for _ in range(100):
            a, b = random.randint(128, 250), random.randint(1, 250)
            if f" 10.{a}.{b}." not in used:
                break
        self.prefix = f"10.{a}.{b}"
        self.bridge = f"sbr{tag}"[:15]
        self.namespaces = [f"sinkd-{tag}-w{i}" for i in range(count)]

    @property
    def head_ip(self) -> str:
        return f"{self.prefix}.1"

    def ip(self, i: int) -> str:
        return f"{self.prefix}.{i + 2}"

    def create(self) -> None:
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.head_ip}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for i, ns in enumerate(self.namespaces):
            veth = f"sv{self.tag}{i}"[:15]
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", veth, "master", self.bridge, "up")
            sh("ip", "-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")

    def kill(self, i: int) -> None:
        """The node dies: every process in its namespace, at once."""
        pids = sh("ip", "netns", "pids", self.namespaces[i], check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)

    def destroy(self) -> None:
        for i, ns in enumerate(self.namespaces):
            self.kill(i)
            sh("ip", "link", "del", f"sv{self.tag}{i}"[:15], check=False)
            sh("ip", "netns", "del", ns, check=False)
        sh("ip", "link", "del", self.bridge, check=False)


# ------------------------------------------------------------------------------------------- cluster.yaml
def ray_start(command: str) -> tuple[dict[str, str], list[str]]:
    """cluster.yaml's `ulimit …; VAR=value ray start --flags` → (its environment assignments, its flags)."""
    tail = command.split(";")[-1]
    tokens = shlex.split(tail)
    env = {}
    while tokens and re.fullmatch(r"[A-Z_]+=\S*", tokens[0]):
        name, value = tokens.pop(0).split("=", 1)
        env[name] = value
    assert tokens[:2] == ["ray", "start"], command
    return env, tokens[2:]


def with_flags(flags: list[str], replace: dict[str, str | None]) -> list[str]:
    """``flags`` with each ``--name[=value]`` in ``replace`` set to its value (None drops it), the rest added."""
    out, seen = [], set()
    for flag in flags:
        name = flag.split("=", 1)[0]
        if name in replace:
            seen.add(name)
            if replace[name] is not None:
                out.append(f"{name}={replace[name]}" if replace[name] != "" else name)
        else:
            out.append(flag)
    return out + [f"{k}={v}" if v != "" else k for k, v in replace.items() if k not in seen and v is not None]


# ----------------------------------------------------------------------------------------------- the run
class Rehearsal:
    def __init__(self, out: Path):
        self.out = out
        self.tag = f"{os.getpid() % 100000}"
        self.root = Path(f"/tmp/sinkd-rehearsal-{self.tag}")  # the head's disk; hidden from the worker nodes
        self.net = Network(self.tag, 2)
        self.cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
        self.report: dict = {"events": {}, "late_join_s": LATE_JOIN_S}
        self.processes: list[subprocess.Popen] = []
        self.t0 = time.monotonic()

    def event(self, name: str) -> None:
        self.report["events"][name] = round(time.monotonic() - self.t0, 1)
        log(name)

    # --- pieces
    def base_env(self) -> dict[str, str]:
        """What every node's container gets (cluster.yaml docker.run_options), with moto standing in for AWS."""
        from sinkd_ray.cluster import _docker_env

        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_", "SINKD_"))}
        env.update(_docker_env(self.cluster["docker"]))
        env.update(
            SINKD_BUCKET=f"s3://{BUCKET}",
            AWS_ENDPOINT_URL=f"http://{self.net.head_ip}:{self.s3_port}",
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            PYTHONPATH=str(REPO),
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            RAY_DEDUP_LOGS="0",
            RAY_USAGE_STATS_ENABLED="0",
        )
        return env

    def start_s3(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self.s3_port = free_port(self.net.head_ip)
        self.s3 = ThreadedMotoServer(ip_address=self.net.head_ip, port=self.s3_port, verbose=False)
        self.s3.start()
        import boto3

        os.environ.update({k: v for k, v in self.base_env().items() if k.startswith("AWS_")})
        self.boto = boto3.client("s3")
        region = self.cluster["provider"]["region"]
        self.boto.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": region})

    def fixtures(self) -> None:
        """The head's own files: a base model to fine-tune as the teacher (and to cut the student from), data."""
        import torch
        from conftest import build_tiny_bert, write_cola_fixture

        torch.set_num_threads(1)
        self.bert = build_tiny_bert(self.root / "models" / "bert")
        self.data = write_cola_fixture(self.root / "glue", n_train=384, n_dev=40)
        self.space = self.root / "space.yaml"
        self.space.write_text(SPACE)

    def start_head(self) -> None:
        self.head_home = self.root / "head-home"
        token = self.head_home / ".ray" / "auth_token"  # what a local ray.init on the head leaves behind
        token.parent.mkdir(parents=True)
        token.write_text(secrets.token_hex(32))
        env, flags = ray_start(self.cluster["head_start_ray_commands"][-1])
        self.report["head_start_env"] = env
        self.gcs_port, self.dash_port = free_port(), free_port()
        flags = with_flags(
            flags,
            {
                "--port": str(self.gcs_port),
                "--object-manager-port": str(free_port()),
                "--autoscaling-config": None,  # no cloud provider to scale here: the nodes are started by hand
                "--node-ip-address": self.net.head_ip,
                "--num-cpus": "1",
                "--object-store-memory": str(100 * 2**20),
                "--temp-dir": str(self.root / "ray-head"),
                "--dashboard-port": str(self.dash_port),
                "--dashboard-agent-listen-port": str(free_port()),
                "--ray-client-server-port": str(free_port()),
                "--min-worker-port": "21000",
                "--max-worker-port": "21999",
                "--disable-usage-stats": "",
                "--block": "",
            },
        )
        head_env = {
            **self.base_env(),
            **env,
            "HOME": str(self.head_home),
            "SINKD_CACHE_DIR": str(self.root / "head-cache"),
            # a killed node is declared dead in seconds, not ~15 s (acts on the GCS)
            "RAY_health_check_initial_delay_ms": "1000",
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_timeout_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
        }
        self.head_env = head_env
        self.spawn("head", [str(Path(sys.executable).parent / "ray"), "start", *flags], head_env)
        self.dashboard = f"http://127.0.0.1:{self.dash_port}"
        self.wait_nodes(1, 120)
        # cluster.yaml's head setup: its checks, then the MLflow server on the backend it names
        self.mlflow_port = free_port()
        for command in (
            ["python", "-m", "sinkd_ray.cluster", "preflight", "--head"],
            # 900 s, not 180: it starts beside the rest of the test session, on a loaded 2-core host
            ["python", "-m", "sinkd_ray.cluster", "mlflow-server", "--port", str(self.mlflow_port), "--wait-s", "900"],
        ):
            done = subprocess.run(command, env=head_env, capture_output=True, text=True, cwd="/", timeout=1000)
            (self.out / "head-setup.log").open("a").write(done.stdout + done.stderr)
            assert done.returncode == 0, f"{' '.join(command)}: {done.stderr[-1500:]}"
        self.mlflow = f"http://127.0.0.1:{self.mlflow_port}"

    def start_worker(self, i: int) -> None:
        """A worker node as cluster.yaml starts one: its setup (preflight), check-gpus where the autoscaler exports
        the declared resources, then its `ray start` — inside namespace i, with nothing of the head's disk."""
        commands = [c for c in self.cluster["worker_start_ray_commands"] if c.strip() != "ray stop"]
        env, flags = ray_start(commands[-1])
        flags = with_flags(
            [f.replace("$RAY_HEAD_IP:6379", f"{self.net.head_ip}:{self.gcs_port}") for f in flags],
            {
                "--object-manager-port": str(free_port()),
                "--node-ip-address": self.net.ip(i),
                "--num-cpus": "1",
                "--resources": json.dumps({NODE_RESOURCE: 1}),
                "--object-store-memory": str(100 * 2**20),
                "--temp-dir": "/tmp/ray",
                "--min-worker-port": "22000",
                "--max-worker-port": "22999",
                "--disable-usage-stats": "",
                "--block": "",
            },
        )
        before = [
            *self.cluster["worker_setup_commands"],
            *(c for c in commands[:-1]),
        ]
        hide = [str(REPO.parent / "shared"), "/root/.cache", "/root/.ray"]
        script = "\n".join(
            [
                "set -e",
                "mount --make-rprivate /",
                "mount -t tmpfs -o size=2g,mode=1777 tmpfs /tmp",
                "mount -t tmpfs -o size=1g tmpfs /dev/shm",
                *(f"[ -d {shlex.quote(h)} ] && mount -t tmpfs -o size=1m tmpfs {shlex.quote(h)} || true" for h in hide),
                "mkdir -p /tmp/home && export HOME=/tmp/home SINKD_CACHE_DIR=/tmp/home/.cache/sinkd_ray && cd /",
                *before,
                "ulimit -n 65536 || true",
                " ".join(
                    [*(f"{k}={shlex.quote(v)}" for k, v in env.items()), "exec ray start", *map(shlex.quote, flags)]
                ),
            ]
        )
        worker_env = {
            **self.base_env(),
            # what the autoscaler exports to a node's start commands: its type's declared resources
            "RAY_OVERRIDE_RESOURCES": json.dumps({"CPU": 1, NODE_RESOURCE: 1}),
        }
        self.spawn(
            f"worker-{i}",
            ["ip", "netns", "exec", self.net.namespaces[i], "unshare", "--mount", "--fork", "bash", "-c", script],
            worker_env,
        )

    def spawn(self, name: str, command: list[str], env: dict) -> None:
        out = (self.out / f"{name}.log").open("w")
        self.processes.append(
            subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd="/", start_new_session=True)
        )

    def nodes(self) -> list:
        from ray.util.state import list_nodes

        try:
            return list_nodes(address=self.dashboard, raise_on_missing_output=False)
        except Exception:
            return []

    def wait_nodes(self, count: int, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while sum(n.state == "ALIVE" for n in self.nodes()) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{count} alive node(s) expected after {seconds} s: {self.nodes()}")
            time.sleep(1)

    def node_id(self, ip: str) -> str | None:
        return next((n.node_id for n in self.nodes() if n.node_ip == ip and n.state == "ALIVE"), None)

    def probe_isolation(self) -> dict:
        """From worker node 0: the head's files are not there, the bucket is."""
        probe = self.root / "probe.py"
        probe.write_text(PROBE.replace("NODE_RESOURCE", NODE_RESOURCE))
        paths = [str(self.bert), str(self.data), str(self.head_home), str(REPO.parent / "shared" / "data")]
        done = subprocess.run(
            [sys.executable, str(probe), f"{self.net.head_ip}:{self.gcs_port}", *paths],
            env=self.head_env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    # --- the study
    def entrypoint(self) -> str:
        """The README's cluster job: `python -m sinkd_ray.tune …` with $SINKD_BUCKET expanded on the head; the tiny
        models and data in place of BERT and GLUE, a node resource in place of --gpus-per-worker."""
        args = [
            "--task cola",
            f"--teacher-base {self.bert} --teacher-epochs 1",
            f"--student {self.bert} --student-layers 2",
            f"--data-dir {self.data} --search-space {self.space}",
            "--max-length 32 --eval-batch-size 20 --seed 0 --no-bf16",
            f"--num-trials 2 --max-concurrent-trials 2 --cpus-per-worker 1 --worker-resources {NODE_RESOURCE}=1",
            f'--name rehearsal --storage-path "$SINKD_BUCKET/runs" --tracking-uri {self.mlflow}',
        ]
        return "bash -c " + shlex.quote("python -m sinkd_ray.tune " + " ".join(args))

    def placements(self) -> dict[str, list[tuple[str, list[str]]]]:
        """trial → [(checkpoint, node ids)] from the bucket (each checkpoint's placement.json)."""
        found: dict[str, list] = {}
        pages = self.boto.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="runs/rehearsal-train/")
        for page in pages:
            for item in page.get("Contents", []):
                match = re.search(r"(trial_[^/]+)/(checkpoint_[^/]+)/placement\.json$", item["Key"])
                if match:
                    body = self.boto.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
                    found.setdefault(match[1], []).append((match[2], json.loads(body)["node_ids"]))
        return {trial: sorted(checkpoints) for trial, checkpoints in found.items()}

    def registered_on(self, node: str) -> tuple[str, str] | None:
        """(trial, checkpoint) of a trial whose latest checkpoint Ray Train has registered (its run's
        checkpoint_manager_snapshot.json names it) and that was written on ``node``. A checkpoint whose files are
        uploaded but not yet registered is not restored after a crash: the run would start again from scratch."""
        for trial, checkpoints in self.placements().items():
            key = f"runs/rehearsal-train/{trial}/checkpoint_manager_snapshot.json"
            try:
                snapshot = self.boto.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()
            except self.boto.exceptions.NoSuchKey:
                continue
            names = set(re.findall(r'"checkpoint_dir_name":\s*"(checkpoint_[^"]+)"', snapshot))
            for name, nodes in checkpoints:
                if name in names and node in nodes:
                    return trial, name
        return None

    def run_study(self) -> None:
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(self.dashboard)
        job = client.submit_job(
            entrypoint=self.entrypoint(), runtime_env={"env_vars": {"SINKD_CACHE_DIR": str(self.root / "driver")}}
        )
        self.event("study submitted")
        node_a, killed_at, late_started = self.node_id(self.net.ip(0)), None, False
        self.report["node_a"] = node_a
        deadline = time.monotonic() + 1200
        while not client.get_job_status(job).is_terminal():
            if time.monotonic() > deadline:
                client.stop_job(job)
                raise RuntimeError("the study did not finish in 20 minutes")
            if killed_at is None:
                registered = self.registered_on(node_a)
                if registered:  # a trial on node A has a checkpoint Ray Train registered: A dies mid-trial
                    self.report["killed_trial"], self.report["registered_before_kill"] = registered
                    self.net.kill(0)
                    killed_at = time.monotonic()
                    self.event("worker node A killed mid-trial")
            elif not late_started and time.monotonic() - killed_at >= LATE_JOIN_S:
                self.start_worker(1)
                self.wait_nodes(2, 180)
                self.report["node_b"] = self.node_id(self.net.ip(1))
                late_started = True
                self.event("worker node B joined")
            time.sleep(1)
        self.event("study ended")
        self.report["job_status"] = str(client.get_job_status(job))
        (self.out / "job.log").write_text(client.get_job_logs(job))
        self.report["placements"] = self.placements()
        self.report["bucket_keys"] = self.bucket_keys()

    def bucket_keys(self) -> list[str]:
        """Every object key in the bucket, with checkpoint and trial names folded to ``*``: what the study put there."""
        keys = set()
        for page in self.boto.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
            for item in page.get("Contents", []):
                keys.add(re.sub(r"(trial|checkpoint)_[^/]+", r"\1_*", item["Key"]))
        return sorted(keys)

    def read_mlflow(self) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.mlflow)
        experiment = client.get_experiment_by_name("sinkd-cola")
        runs = client.search_runs([experiment.experiment_id], max_results=100)
        self.report["runs"] = [
            {
                "name": r.info.run_name,
                "status": r.info.status,
                "trial": r.data.tags.get("sinkd.trial_id"),
                "resumed_from_step": [m.value for m in client.get_metric_history(r.info.run_id, "resumed_from_step")],
            }
            for r in runs
        ]
        version = client.get_model_version_by_alias("sinkd-cola-student", "best")
        self.report["registered"] = {"version": version.version, "source": version.source}
        # the registered student through MLflow's own loader, its files fetched from the bucket via the server
        code = (
            "import json, mlflow; m = mlflow.pyfunc.load_model('models:/sinkd-cola-student@best'); "
            "print(json.dumps(list(m.predict(['the man is good .', 'the dog is bad .'])['label'])))"
        )
        env = {**self.head_env, "MLFLOW_TRACKING_URI": self.mlflow}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        self.report["loaded_labels"] = json.loads(done.stdout.strip().splitlines()[-1])

    def run(self) -> None:
        self.root.mkdir(parents=True)
        self.net.create()
        self.event("network up")
        self.start_s3()
        self.fixtures()
        self.start_head()
        self.event("head up (cluster.yaml's start command, a stray auth token in its HOME; MLflow server)")
        self.start_worker(0)
        self.wait_nodes(2, 180)
        self.event("worker node A joined")
        self.report["isolation"] = self.probe_isolation()
        self.run_study()
        if self.report["job_status"] != "SUCCEEDED":
            # the job's last error lines, so that a failure reads in CI's output without the log files
            lines = (self.out / "job.log").read_text().splitlines()
            last = [line.strip() for line in lines if re.search(r"(Error|Exception)\b\S*: ", line)][-3:]
            raise RuntimeError(f"the study's job {self.report['job_status']}: {' | '.join(last)} (see job.log)")
        self.read_mlflow()

    def cleanup(self) -> None:
        self.net.destroy()
        for proc in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        time.sleep(3)
        for proc in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        # what left its process group: Ray's daemons of this head, the MLflow server (found by their dirs)
        import psutil

        for proc in psutil.process_iter(["pid", "cmdline", "environ"]):
            with contextlib.suppress(psutil.Error):
                text = " ".join(proc.info["cmdline"] or [])
                env = proc.info["environ"] or {}
                if proc.pid != os.getpid() and (str(self.root) in text or env.get("HOME") == str(self.head_home)):
                    proc.kill()
        with contextlib.suppress(Exception):
            self.s3.stop()
        subprocess.run(["rm", "-rf", str(self.root)], check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.pop("RAY_ADDRESS", None)  # Ray's clients would prefer it to the addresses they are given
    report_path = args.out / "report.json"
    reason = why_not_possible()
    if reason:
        report_path.write_text(json.dumps({"skipped": reason}))
        return 0
    rehearsal = Rehearsal(args.out)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        rehearsal.run()
    except BaseException as exc:  # the report says what failed; the test shows it with the logs
        rehearsal.report["error"] = "".join(traceback.format_exception(exc))[-4000:]
    finally:
        rehearsal.report["wall_s"] = round(time.monotonic() - rehearsal.t0, 1)
        report_path.write_text(json.dumps(rehearsal.report, indent=1))
        rehearsal.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
