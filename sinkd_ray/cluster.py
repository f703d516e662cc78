"""`python -m sinkd_ray.cluster check cluster.yaml`: check a Ray cluster launcher file offline, before `ray up`.

Ray's own schema validation (``prepare_config`` + ``validate_config``, no cloud credentials needed) catches
unknown keys and wrong types. It does not catch what makes ``ray up`` fail later, or a study fail hours in;
each of those is a check here with a one-line error:

- node types whose ``min_workers`` exceeds ``max_workers`` (the autoscaler silently never reaches the minimum),
  and credentials pasted into the file;
- lines marked CHANGE still holding their placeholders (the bucket, the AMI);
- an implicit or outdated AMI: no ``ImageId`` or ``latest_dlami`` is Ray 2.60's ``DEFAULT_AMI``, "AWS Deep
  Learning AMI (Ubuntu 18.04) V71.0" (glibc 2.27: no torch 2.13 wheel, which is manylinux_2_28);
- a worker node type without ``IamInstanceProfile``: Ray attaches its default role to the head only, so the
  worker's first checkpoint upload to the bucket fails;
- the bucket in more than one place: ``SINKD_BUCKET`` in ``docker.run_options`` is the only one allowed;
- the MLflow backend: ``SINKD_MLFLOW_BACKEND`` must say ``sqlite`` or ``ssm:<parameter>`` (no silent default);
- unpinned or mismatched software: the image must be Ray's image of the Ray version constraints.txt pins, and
  setup must install with ``python -m pip … -c …constraints.txt`` (``python``: the interpreter of the README's
  ``ray job submit -- python -m sinkd_ray.tune``, not ``python3`` or a bare ``pip``).

``preflight`` and ``mlflow-server`` run on the cluster's nodes (cluster.yaml; code in node_setup.py).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import logging
import re
import shlex
from pathlib import Path

import yaml

from sinkd_ray.cli import run_cli
from sinkd_ray.errors import SinkdError

# Keys that carry secrets: they belong in the environment / instance roles, never in a committed file.
CREDENTIAL_KEYS = (
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "password",
    "secret",
    "private_key",
)
PLACEHOLDER_BUCKET = "s3://my-sinkd-bucket"
AMI_ID = re.compile(r"^ami-[0-9a-f]{8}(?:[0-9a-f]{9})?$")
SETUP_KEYS = ("setup_commands", "head_setup_commands", "worker_setup_commands")
# A pip install and the interpreter in front of it ("python -m pip install", "python3 -m pip install", "pip3 install").
PIP_INSTALL = re.compile(r"(?:(\S+)\s+-m\s+)?(\S*\bpip[\d.]*)\s+install\b")


def _walk(node, path=()):
    """(path, key or value) for every key and every string value of a nested config."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*path, str(key)), str(key), True
            yield from _walk(value, (*path, str(key)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, (*path, str(i)))
    elif isinstance(node, str):
        yield path, node, False


def _ray_default_amis() -> set[str]:
    """The AMI ids Ray 2.60 falls back to (``DEFAULT_AMI`` in ray/autoscaler/_private/aws/config.py), read from
    Ray's source: importing that module needs boto3, which an offline check should not."""
    spec = importlib.util.find_spec("ray.autoscaler._private.aws")
    path = Path(next(iter(spec.submodule_search_locations or [])), "config.py") if spec else None
    if not path or not path.is_file():
        return set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "DEFAULT_AMI" for t in node.targets):
            return set(ast.literal_eval(node.value).values())
    return set()


def _option_values(options: list, flags: tuple[str, ...]) -> list[str]:
    """The values of ``flags`` (e.g. ``("--env", "-e")``) in docker options, as ``--flag=v`` or ``--flag v``."""
    tokens = [t for option in options or [] for t in shlex.split(str(option))]
    values = []
    for i, token in enumerate(tokens):
        if token.startswith(tuple(f"{flag}=" for flag in flags)):
            values.append(token.split("=", 1)[1])
        elif token in flags and i + 1 < len(tokens):
            values.append(tokens[i + 1])
    return values


def _docker_env(docker: dict) -> dict[str, str]:
    """NAME -> value of the ``--env``/``-e`` options in ``docker.run_options`` (and the head/worker variants)."""
    options = [o for key in ("run_options", "head_run_options", "worker_run_options") for o in docker.get(key) or []]
    return dict(v.split("=", 1) for v in _option_values(options, ("--env", "-e")) if "=" in v)


def _ray_pin(constraints: Path) -> str | None:
    if constraints.is_file():
        match = re.search(r"^ray==(\S+)", constraints.read_text(), re.MULTILINE)
        return match.group(1) if match else None
    return None


def _check_software(config: dict, source: str, constraints: Path | None) -> None:
    image = str((config.get("docker") or {}).get("image") or "")
    pin = _ray_pin(constraints) if constraints else None
    if not image:
        raise SinkdError(
            f"{source}: no docker.image — pin Ray's GPU image of this project's Ray version "
            f"(rayproject/ray:{pin or '<version>'}-py311-cu130), so every node runs the same software"
        )
    if constraints and pin is None:
        raise SinkdError(f"{source}: {constraints} does not pin ray — the lock file every node installs is missing")
    prebuilt = re.search(rf"(^|/)sinkd-ray:{re.escape(pin or '')}-", image) if pin else None  # deploy/Dockerfile
    if pin and not (image.startswith(f"rayproject/ray:{pin}-") or prebuilt):
        raise SinkdError(
            f"{source}: docker.image {image} is not Ray's image of the pinned ray=={pin} — use "
            f"rayproject/ray:{pin}-py311-cu130, or an image built from deploy/Dockerfile tagged "
            f"sinkd-ray:{pin}-… (a node on another Ray version never joins)"
        )
    if not re.search(r"-(cu\d+|gpu)\b", image):
        raise SinkdError(
            f"{source}: docker.image {image} is not a GPU image — use a -cuXXX tag (torch 2.13 from "
            "PyPI is a CUDA 13.0 build: -cu130)"
        )
    installs = []
    for key in SETUP_KEYS:
        for i, command in enumerate(config.get(key) or []):
            where = f"{key}[{i}]"
            for match in PIP_INSTALL.finditer(command):
                interpreter, pip = match.groups()
                if interpreter != "python" or pip != "pip":
                    used = f"{interpreter} -m {pip}" if interpreter else pip
                    raise SinkdError(
                        f"{source}: {where} installs with '{used}', but the README's job runs 'python -m "
                        "sinkd_ray.tune' — install with 'python -m pip' (the same interpreter)"
                    )
                installs.append((where, command))
    project = [(w, c) for w, c in installs if re.search(r"\s-e\s", c)]
    if not project:
        raise SinkdError(
            f"{source}: setup_commands never install this checkout (python -m pip install -c "
            ".../constraints.txt -e <file_mounts path>)"
        )
    for where, command in installs:
        if not re.search(r"(?:\s-c\s*|--constraint[=\s])\S*constraints\.txt\b", command):
            raise SinkdError(
                f"{source}: {where} installs without -c …/constraints.txt — unpinned dependencies drift "
                "(a node autoscaled a day later gets other versions)"
            )


def validate_cluster_config(config: dict, source: str = "cluster config", constraints: Path | None = None) -> dict:
    """Ray's schema plus our checks; returns Ray's prepared config. Problems raise a one-line SinkdError.

    ``constraints``: the lock file beside the cluster file; the docker image must match its ``ray==`` pin.
    """
    if not isinstance(config, dict):
        raise SinkdError(f"{source}: not a YAML mapping")
    for keys, text, is_key in _walk(config):
        if is_key and (text.lower() in CREDENTIAL_KEYS or text.lower().endswith("_secret")):
            raise SinkdError(
                f"{source}: '{'.'.join(keys)}' looks like a credential — remove it and use the "
                "environment or an instance role"
            )
    prepared = _ray_prepared(config, source)
    _check_node_counts(prepared, source)
    env = _docker_env(prepared.get("docker") or {})
    _check_images_and_profiles(prepared, env, source)
    # The file's own lists (prepare_config merges setup_commands into the head/worker lists): indices as written.
    _check_software(config, source, constraints)
    _check_bucket_and_backend(config, env, source)
    _check_region(prepared, env, source)
    _check_sqlite_volume(config, env, source)
    _check_gpu_access(prepared, source)
    _check_ray_start(config, source)
    return prepared


SQLITE_HOME = "/home/ray/mlflow"  # node_setup.mlflow_backend_uri: ~/mlflow/mlflow.db for the image's user ray


def _check_region(prepared: dict, env: dict, source: str) -> None:
    """The provider's region reaches the containers (boto3 inside finds none by itself): the same value."""
    provider = prepared.get("provider", {})
    if provider.get("type") != "aws":
        return
    if env.get("AWS_DEFAULT_REGION") != provider.get("region"):
        raise SinkdError(
            f"{source}: docker.run_options must pass the provider's region to the containers, "
            f"--env=AWS_DEFAULT_REGION={provider.get('region')} (found {env.get('AWS_DEFAULT_REGION')!r}): "
            "reading the MLflow backend from SSM fails without it"
        )


def _volumes(options: list) -> dict[str, str]:
    """container path -> host path of the ``-v`` / ``--volume`` options."""
    pairs = [v.split(":")[:2] for v in _option_values(options, ("--volume", "-v")) if ":" in v]
    return {container.rstrip("/"): host for host, container in pairs}


def _check_sqlite_volume(config: dict, env: dict, source: str) -> None:
    """With the SQLite backend the store's folder is a host volume (the container's layer goes with --rm), and
    the host folder is created before the container starts (else Docker creates it for root)."""
    if env.get("SINKD_MLFLOW_BACKEND") != "sqlite":
        return
    docker = config.get("docker") or {}
    host = _volumes(list(docker.get("run_options") or []) + list(docker.get("head_run_options") or [])).get(SQLITE_HOME)
    if host is None:
        raise SinkdError(
            f"{source}: with SINKD_MLFLOW_BACKEND=sqlite the head's {SQLITE_HOME} must be a host volume "
            f"(docker.head_run_options: --volume=/home/ubuntu/sinkd-mlflow:{SQLITE_HOME}), or the runs are deleted "
            "whenever the head's container is recreated"
        )
    if not any(re.search(rf"mkdir -p \S*{re.escape(host)}\b", c) for c in config.get("initialization_commands") or []):
        raise SinkdError(
            f"{source}: initialization_commands must create the volume's host folder first (mkdir -p {host}); "
            "Docker would create it for root, and the container's user could not write the store"
        )


def _check_gpu_access(prepared: dict, source: str) -> None:
    """Worker types that declare GPUs start their containers with them (Ray's launcher adds no --gpus)."""
    docker = prepared.get("docker") or {}
    for name, node_type in _worker_types(prepared).items():
        if not (node_type.get("resources") or {}).get("GPU"):
            continue
        own = node_type.get("docker") or {}
        options = list(docker.get("run_options") or []) + list(
            own.get("worker_run_options", docker.get("worker_run_options")) or []
        )
        if not any(re.search(r"--gpus[= ]|--runtime[= ]nvidia", str(o)) for o in options):
            raise SinkdError(
                f"{source}: worker node type '{name}' declares GPUs but its container gets none — add "
                "--gpus all to docker.worker_run_options (Ray's launcher does not)"
            )


def _check_ray_start(config: dict, source: str) -> None:
    """Every `ray start` sets RAY_AUTH_MODE (a stray ~/.ray/auth_token must not decide it), and each worker checks
    its GPUs before it starts Ray."""
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        commands = [str(c) for c in config.get(key) or []]
        starts = [i for i, c in enumerate(commands) if re.search(r"\bray start\b", c)]
        for i in starts:
            if "RAY_AUTH_MODE=" not in commands[i]:
                raise SinkdError(
                    f"{source}: {key}[{i}] starts Ray without RAY_AUTH_MODE — a ~/.ray/auth_token left on the node "
                    "would turn token authentication on and workers could not join; prefix RAY_AUTH_MODE=disabled"
                )
        if key == "worker_start_ray_commands" and starts:
            if not any("sinkd_ray.cluster check-gpus" in c for c in commands[: starts[0]]):
                raise SinkdError(
                    f"{source}: {key} must run `python -m sinkd_ray.cluster check-gpus` before `ray start` (where "
                    "the node type's declared GPUs are known), or a node without usable GPUs joins and advertises them"
                )


def _ray_prepared(config: dict, source: str) -> dict:
    """Ray's own preparation and schema check, its first complaint as one line."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    quiet = logging.getLogger("ray.autoscaler")  # prepare_config logs an INFO line; the check prints one line
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        prepared = prepare_config(config)
        validate_config(prepared)
    except jsonschema.ValidationError as exc:
        where = ".".join(str(p) for p in exc.absolute_path) or "top level"
        raise SinkdError(f"{source}: {exc.message} (at {where})") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise SinkdError(f"{source}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    finally:
        quiet.setLevel(level)
    return prepared


def _worker_types(prepared: dict) -> dict:
    head = prepared.get("head_node_type")
    return {name: t for name, t in prepared.get("available_node_types", {}).items() if name != head}


def _check_node_counts(prepared: dict, source: str) -> None:
    workers = _worker_types(prepared)
    for name, node_type in workers.items():
        low, high = node_type.get("min_workers", 0), node_type.get("max_workers", 0)
        if low > high:
            raise SinkdError(f"{source}: node type '{name}' has min_workers={low} > max_workers={high}")
    total_min = sum(t.get("min_workers", 0) for t in workers.values())
    if total_min > prepared.get("max_workers", 0):
        raise SinkdError(
            f"{source}: the node types' min_workers add up to {total_min}, more than the cluster's "
            f"max_workers={prepared.get('max_workers')}"
        )


def _check_images_and_profiles(prepared: dict, env: dict, source: str) -> None:
    """The CHANGE lines filled in, explicit current AMIs, an instance profile on every worker type (AWS)."""
    types = prepared.get("available_node_types", {})
    aws = prepared["provider"].get("type") == "aws"
    amis = {name: str(t.get("node_config", {}).get("ImageId", "")) for name, t in types.items()}
    # The CHANGE lines first, in one line: a fresh copy of the template names everything to fill in at once.
    unset_ami = [name for name, ami in amis.items() if aws and re.fullmatch(r"ami-x+", ami)]
    todo = ([f"SINKD_BUCKET (still {PLACEHOLDER_BUCKET})"] if env.get("SINKD_BUCKET") == PLACEHOLDER_BUCKET else []) + (
        [f"ImageId of {', '.join(unset_ami)} (still {amis[unset_ami[0]]})"] if unset_ami else []
    )
    if todo:
        raise SinkdError(f"{source}: fill in the lines marked CHANGE: {'; '.join(todo)}")
    if not aws:
        return
    old = _ray_default_amis()
    for name, ami in amis.items():
        if ami.lower() in ("", "latest_dlami") or ami in old:
            raise SinkdError(
                f"{source}: node type '{name}' has ImageId {ami or '(none)'!r}, which Ray 2.60 "
                "resolves to its default 'AWS Deep Learning AMI (Ubuntu 18.04) V71.0' (glibc 2.27, no "
                "torch 2.13 wheel) — set an explicit current AMI (the CHANGE line)"
            )
        if not (AMI_ID.match(ami) or ami.startswith("resolve:ssm:")):
            raise SinkdError(f"{source}: node type '{name}' has ImageId {ami!r}, not an AMI id (ami-…)")
    for name, node_type in _worker_types(prepared).items():
        profile = node_type.get("node_config", {}).get("IamInstanceProfile") or {}
        if not (profile.get("Arn") or profile.get("Name")):
            raise SinkdError(
                f"{source}: worker node type '{name}' has no IamInstanceProfile — Ray gives its "
                "default role to the head only, so this node cannot write checkpoints to the bucket; "
                "add IamInstanceProfile: {Name: sinkd-ray-worker} (deploy/aws_iam.sh)"
            )


def _check_bucket_and_backend(config: dict, env: dict, source: str) -> None:
    """The bucket set once (SINKD_BUCKET) and never written out elsewhere; MLflow's backend chosen explicitly."""
    bucket = env.get("SINKD_BUCKET")
    if not bucket or not re.fullmatch(r"(s3|gs)://[a-z0-9][a-z0-9.\-_]{1,254}(/\S*)?", bucket):
        raise SinkdError(
            f"{source}: docker.run_options must set the bucket once, e.g. "
            f"--env=SINKD_BUCKET=s3://your-bucket (found {bucket!r})"
        )
    for keys, text, _ in _walk(config):
        if "SINKD_BUCKET=" in text:  # the one place itself
            continue
        copy = re.search(r"\b(?:s3|gs)://[^\s\"'$/]+", text)
        if copy:
            raise SinkdError(
                f"{source}: '{'.'.join(keys)}' names a bucket ({copy.group(0)}) — use $SINKD_BUCKET, so "
                "that the bucket lives in one place (a second copy fails only at the end of a study)"
            )
    backend = env.get("SINKD_MLFLOW_BACKEND", "")
    if backend != "sqlite" and not re.fullmatch(r"ssm:/?[\w./\-]+", backend):
        raise SinkdError(
            f"{source}: docker.run_options must set --env=SINKD_MLFLOW_BACKEND=sqlite (lost at `ray "
            f"down`) or ssm:<parameter> (a database URI that survives it); found {backend!r}"
        )


def load_cluster_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SinkdError(f"{path}: no such file")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SinkdError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return validate_cluster_config(config, str(path), constraints=path.resolve().parent / "constraints.txt")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sinkd_ray.cluster", description="Check a Ray cluster launcher file offline; set up its nodes."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a cluster file (before `ray up`)")
    check.add_argument("path", nargs="?", default="cluster.yaml")
    pre = sub.add_parser("preflight", help="on a node: versions, GPUs, bucket (and with --head the MLflow backend)")
    pre.add_argument("--head", action="store_true")
    sub.add_parser(
        "check-gpus",
        help="on a worker, before `ray start`: torch sees the GPUs its node type declares ($RAY_OVERRIDE_RESOURCES) "
        "and runs a kernel on each",
    )
    server = sub.add_parser("mlflow-server", help="on the head: start the MLflow tracking server (127.0.0.1:5000)")
    server.add_argument("--port", type=int, default=5000, help="its port on the loopback")
    server.add_argument(
        "--wait-s", type=float, default=180.0, help="how long to wait for its /health answer (a busy head is slower)"
    )
    args = parser.parse_args(argv)
    if args.command == "check":
        prepared = load_cluster_file(args.path)
        types = ", ".join(
            f"{name} ({t.get('min_workers', 0)}-{t.get('max_workers', 0)})"
            for name, t in prepared["available_node_types"].items()
        )
        print(f"{args.path}: valid ({prepared['provider']['type']}; node types: {types})")
        return 0
    from sinkd_ray import node_setup

    if args.command == "preflight":
        print("preflight: " + "; ".join(node_setup.preflight(head=args.head)))
    elif args.command == "check-gpus":
        print(f"check-gpus: {node_setup.check_declared_gpus()}")
    else:
        print(f"MLflow server: {node_setup.start_mlflow_server(port=args.port, wait_s=args.wait_s)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
