"""What cluster.yaml runs on its nodes at setup, before Ray starts there (`python -m sinkd_ray.cluster ...`).

``preflight [--head]`` turns the failures that would otherwise surface hours into a study into a failed
``ray up`` (head) or a failed node setup (workers, visible in ``ray status`` and the monitor log), one line each:
installed versions that differ from constraints.txt, GPUs torch cannot use (an NVIDIA driver too old for its
CUDA build), a bucket this node cannot write (no instance profile, a typo), an MLflow backend that cannot be read.
``mlflow-server`` starts the head's tracking server on the backend of ``SINKD_MLFLOW_BACKEND``, with no fallback.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from importlib import metadata
from pathlib import Path

from sinkd_ray.errors import SinkdError

CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:200]


def dependency_closure(root: str = "sinkd-ray") -> dict[str, str]:
    """{name: installed version} of ``root`` and everything it requires here (extras it asks for included,
    environment markers evaluated on this machine)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found: dict[str, tuple[str, set]] = {}
    todo = [(root, set())]
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        if key in found and extras <= found[key][1]:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        extras = extras | (found[key][1] if key in found else set())
        found[key] = (dist.version, extras)
        for raw in dist.requires or []:
            req = Requirement(raw)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
                todo.append((req.name, set(req.extras)))
    return {key: version for key, (version, _) in found.items()}


def check_versions(constraints: Path | None = None) -> int:
    """sinkd-ray and everything it depends on here have exactly the versions constraints.txt pins (a package
    with no pin is not checked); returns how many were checked."""
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    constraints = constraints or CONSTRAINTS
    if not constraints.is_file():
        raise SinkdError(f"{constraints}: no such file — the checkout on this node is incomplete")
    pins = {}
    for line in constraints.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, pinned = (part.strip() for part in line.split("==", 1))
            pins[canonicalize_name(name)] = pinned
    installed = dependency_closure()
    if "sinkd-ray" not in installed:
        raise SinkdError(
            f"sinkd-ray is not installed here — `python -m pip install -c {constraints} -e {constraints.parent}`"
        )
    # "==2.13.0" accepts 2.13.0+cpu and the CUDA build alike (PEP 440 ignores the local label).
    wrong = [
        f"{name} {version} (pinned {pins[name]})"
        for name, version in sorted(installed.items())
        if name in pins and not SpecifierSet(f"=={pins[name]}").contains(Version(version), prereleases=True)
    ]
    if wrong:
        raise SinkdError(
            f"{len(wrong)} installed package(s) differ from {constraints.name}: {', '.join(wrong[:4])}"
            f"{' …' if len(wrong) > 4 else ''} — install with `python -m pip install -c "
            f"{constraints} -e {constraints.parent}`"
        )
    return sum(name in pins for name in installed)


def _nvidia_devices() -> list[Path]:
    return sorted(Path("/dev").glob("nvidia[0-9]*"))


def check_gpus() -> None:
    """A node with NVIDIA devices must be usable by this torch (its CUDA build needs a recent enough driver)."""
    if not _nvidia_devices():
        return  # a CPU node (the head)
    import torch

    if not torch.cuda.is_available():
        raise SinkdError(
            f"this node has NVIDIA devices but torch {torch.__version__} (CUDA {torch.version.cuda}) "
            "cannot use them: the host's NVIDIA driver is older than this CUDA build needs (CUDA 13 "
            "needs driver >= 580) — use the AMI named in cluster.yaml"
        )


# The autoscaler exports a node type's declared resources to its `ray start` commands (not to setup commands).
DECLARED_RESOURCES_ENV = "RAY_OVERRIDE_RESOURCES"


def declared_gpus() -> int | None:
    """The GPUs this node's type declares (cluster.yaml ``resources``), read where the autoscaler exports them."""
    raw = os.environ.get(DECLARED_RESOURCES_ENV)
    if not raw:
        return None
    try:
        return int(json.loads(raw).get("GPU", 0))
    except (ValueError, TypeError, AttributeError):
        raise SinkdError(f"{DECLARED_RESOURCES_ENV}={raw!r} is not a JSON object of resources") from None


def check_declared_gpus(declared: int | None = None) -> str:
    """Before `ray start` on a worker: torch sees exactly the GPUs the node type declares, and a kernel runs on each.
    Otherwise Ray would advertise GPUs the container cannot use (Ray's launcher adds no ``--gpus all``; a node
    whose container lacks /dev/nvidia* once passed every check and advertised ``GPU: 1``)."""
    declared = declared_gpus() if declared is None else declared
    if declared is None:  # nothing declared (another provider): the devices present must at least work
        check_gpus()
        return "no declared GPU count; the NVIDIA devices present are usable"
    import torch

    seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if seen != declared:
        raise SinkdError(
            f"this node type declares {declared} GPU(s) but torch sees {seen} (/dev/nvidia*: "
            f"{len(_nvidia_devices())}) — start its container with the GPUs (cluster.yaml docker.worker_run_options: "
            "--gpus all) and keep the node type's resources.GPU equal to the instance's GPUs"
        )
    for index in range(seen):
        try:
            x = torch.arange(64, dtype=torch.float32, device=f"cuda:{index}").reshape(8, 8)
            value = float((x @ x).sum().item())
        except Exception as err:  # a driver / runtime problem shows as any CUDA error here
            raise SinkdError(f"a kernel failed on GPU {index} ({_first_line(err)}) — check the node's driver") from None
        if value != 529_536.0:  # Σ (x @ x) for x = 0..63 in 8 × 8, exact in float32
            raise SinkdError(f"GPU {index} computed a wrong result ({value}) — the device is faulty")
    return f"{seen} GPU(s) as declared, a kernel ran on each"


def bucket_uri() -> str:
    bucket = os.environ.get("SINKD_BUCKET", "").rstrip("/")
    if "://" not in bucket:
        raise SinkdError(
            f"SINKD_BUCKET={bucket!r} is not a storage URI — cluster.yaml sets it in "
            "docker.run_options (e.g. --env=SINKD_BUCKET=s3://your-bucket)"
        )
    return bucket


def check_storage(uri: str) -> None:
    """Write and delete a small object under ``uri`` through pyarrow, the filesystem layer Ray Train itself
    resolves ``storage_path`` with, so the same credentials and region lookup are exercised. Nothing is created
    on object stores but the probe: a mistyped bucket must fail here, not be created."""
    import pyarrow.fs

    try:
        fs, root = pyarrow.fs.FileSystem.from_uri(uri)
        root = root.rstrip("/")
        if isinstance(fs, pyarrow.fs.LocalFileSystem):
            fs.create_dir(root, recursive=True)
        elif fs.get_file_info(root.split("/", 1)[0]).type == pyarrow.fs.FileType.NotFound:
            raise FileNotFoundError(f"bucket {root.split('/', 1)[0]} does not exist")
        probe = f"{root}/.sinkd-preflight-{socket.gethostname()}-{os.getpid()}"
        with fs.open_output_stream(probe) as out:
            out.write(b"sinkd_ray preflight\n")
        fs.delete_file(probe)
    except Exception as exc:  # pyarrow raises OSError / ValueError / ArrowInvalid depending on the cause
        raise SinkdError(
            f"cannot write to {uri} from this node ({_first_line(exc)}) — check that the bucket "
            "exists and that this node type's IamInstanceProfile grants S3 access "
            "(deploy/aws_iam.sh)"
        ) from None


def aws_region() -> str:
    """The AWS region inside the container: cluster.yaml passes the provider's (boto3 finds none by itself there,
    and its NoRegionError read like a permissions problem)."""
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region:
        raise SinkdError(
            "no AWS region in this container — cluster.yaml's docker.run_options pass the provider's region "
            "(--env=AWS_DEFAULT_REGION=<provider.region>)"
        )
    return region


def mlflow_backend_uri(setting: str | None = None) -> str:
    """The backend-store URI for ``SINKD_MLFLOW_BACKEND``: ``sqlite`` (a file on this node) or
    ``ssm:<parameter>`` (a database URI kept in SSM Parameter Store). Anything unreadable is an error."""
    setting = (setting if setting is not None else os.environ.get("SINKD_MLFLOW_BACKEND", "")).strip()
    if setting == "sqlite":
        return f"sqlite:///{Path.home() / 'mlflow' / 'mlflow.db'}"
    if setting.startswith("ssm:") and len(setting) > 4:
        name = setting[4:]
        region = aws_region()
        try:
            import boto3  # in Ray's images (its AWS autoscaler needs it); credentials from the instance's role

            ssm = boto3.client("ssm", region_name=region)
            value = ssm.get_parameter(Name=name, WithDecryption=True)["Parameter"]["Value"]
        except Exception as exc:
            raise SinkdError(
                f"cannot read the MLflow backend URI from SSM parameter {name} ({_first_line(exc)}) — "
                "create it (aws ssm put-parameter --type SecureString) and let the head's role read "
                "it, or set SINKD_MLFLOW_BACKEND=sqlite in cluster.yaml"
            ) from None
        if "://" not in value:
            raise SinkdError(f"SSM parameter {name} does not hold a database URI (e.g. postgresql://user:pass@host/db)")
        return value
    raise SinkdError(f"SINKD_MLFLOW_BACKEND={setting!r}: set it in cluster.yaml to sqlite or ssm:<parameter name>")


def preflight(head: bool = False) -> list[str]:
    """All checks of this node; returns what was checked (printed by the CLI)."""
    done = [f"{check_versions()} installed packages match {CONSTRAINTS.name}"]
    check_gpus()
    uri = bucket_uri()
    check_storage(uri)
    done.append(f"{uri} writable")
    if head:
        backend = mlflow_backend_uri()
        if backend.startswith("sqlite"):
            check_sqlite_on_host(Path.home() / "mlflow")
        done.append(
            "MLflow backend: "
            + (
                "SQLite on this node's disk (kept when the container is recreated, deleted by `ray down`)"
                if backend.startswith("sqlite")
                else "read from " + os.environ["SINKD_MLFLOW_BACKEND"][4:]
            )
        )
    return done


CLUSTER_MLFLOW_HOME = Path("/home/ray/mlflow")  # ~/mlflow of the cluster image's user (cluster.yaml's volume)


def check_sqlite_on_host(folder: Path) -> None:
    """In the cluster's container, the SQLite store's folder must be a volume from the host: the container's own
    layer is deleted whenever the container is recreated (Ray's launcher runs it with --rm), and the runs with it."""
    if folder == CLUSTER_MLFLOW_HOME and not os.path.ismount(folder):
        raise SinkdError(
            f"{folder} is not a volume from the host, so the SQLite MLflow store would be deleted with the container "
            "— mount one there (cluster.yaml docker.head_run_options: --volume=/home/ubuntu/sinkd-mlflow:"
            f"{folder})"
        )


def _running(pidfile: Path) -> bool:
    try:
        return "mlflow" in Path(f"/proc/{int(pidfile.read_text())}/cmdline").read_text(errors="replace")
    except (OSError, ValueError):
        return False


def mlflow_workers() -> int:
    """Worker processes of the head's MLflow server: ``$SINKD_MLFLOW_WORKERS``, else half the head's CPUs, 1 to 4
    (MLflow's default of 4 costs a 2-CPU head ~50 % more CPU to start, which it shares with the study's driver)."""
    given = os.environ.get("SINKD_MLFLOW_WORKERS")
    if given is not None:
        if not given.isdigit() or int(given) < 1:
            raise SinkdError(f"SINKD_MLFLOW_WORKERS={given!r} is not a positive whole number — unset it or give one")
        return int(given)
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def start_mlflow_server(
    host: str = "127.0.0.1", port: int = 5000, home: Path | None = None, wait_s: float = 180.0
) -> str:
    """Start (once) ``mlflow server`` on the configured backend, artifacts proxied to ``$SINKD_BUCKET/mlflow``;
    return its URL once ``/health`` answers. A server that exits or never answers is an error, not a warning.

    Loopback only: the study's driver runs on the head (a Ray job) and the user comes in through
    ``ray attach cluster.yaml -p 5000``, both via 127.0.0.1 (the container shares the host's network)."""
    home = home or Path.home() / "mlflow"
    home.mkdir(parents=True, exist_ok=True)
    url, pidfile, log_path = f"http://{host}:{port}", home / "server.pid", home / "server.log"
    if _running(pidfile):
        return url
    backend, artifacts = mlflow_backend_uri(), f"{bucket_uri()}/mlflow"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                backend,
                "--artifacts-destination",
                artifacts,
                "--host",
                host,
                "--port",
                str(port),
                "--workers",
                str(mlflow_workers()),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    pidfile.write_text(str(proc.pid))
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            lines = log_path.read_text(errors="replace").strip().splitlines()
            raise SinkdError(
                f"the MLflow server exited with code {proc.returncode}: "
                f"{(lines[-1] if lines else '')[:200]} (full log: {log_path})"
            )
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return url
        except OSError:
            pass
        time.sleep(2)
    raise SinkdError(f"the MLflow server did not answer {url}/health within {wait_s:.0f} s (log: {log_path})")
