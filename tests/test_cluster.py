"""Scale-out: cluster.yaml against Ray's schema and our checks, and the node-side setup commands. A study on
separate nodes and bucket storage is the cluster rehearsal (tests/rehearsal.py, read by test_rehearsal.py)."""

import copy
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import free_port

from sinkd_ray.cluster import load_cluster_file, main, validate_cluster_config
from sinkd_ray.errors import SinkdError

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "constraints.txt"
BUCKET, AMI = "s3://acme-sinkd-runs", "ami-0123456789abcdef0"
# Ray 2.60's DEFAULT_AMI for us-west-2: "AWS Deep Learning AMI (Ubuntu 18.04) V71.0".
RAY_DEFAULT_AMI_US_WEST_2 = "ami-0a2b85e15b7c0ac34"


@pytest.fixture(scope="module")
def template() -> dict:
    """cluster.yaml as shipped: its CHANGE lines still hold placeholders."""
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def fill_in(config: dict) -> dict:
    """What a user does to the CHANGE lines before `ray up`: a real bucket and the AMI id for their region."""
    config = copy.deepcopy(config)
    docker = config["docker"]
    docker["run_options"] = [o.replace("s3://my-sinkd-bucket", BUCKET) for o in docker["run_options"]]
    for node_type in config["available_node_types"].values():
        node_type["node_config"]["ImageId"] = AMI
    return config


@pytest.fixture
def filled(template) -> dict:
    return fill_in(template)


def _set_env(config: dict, name: str, value: str | None) -> None:
    options = [o for o in config["docker"]["run_options"] if not o.startswith(f"--env={name}=")]
    config["docker"]["run_options"] = options + ([f"--env={name}={value}"] if value is not None else [])


def _check(config: dict) -> dict:
    return validate_cluster_config(config, "broken.yaml", constraints=CONSTRAINTS)


def test_cluster_yaml_passes_rays_schema_as_shipped_and_our_checks_once_filled_in(template, filled):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(template)))  # Ray's own check, no credentials needed
    prepared = validate_cluster_config(filled, "cluster.yaml", constraints=CONSTRAINTS)
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head" and {"gpu-1x", "gpu-8x"} <= set(types)
    assert all(types[t]["min_workers"] == 0 and types[t]["max_workers"] >= 1 for t in ("gpu-1x", "gpu-8x"))
    # Every node type runs the pinned image on an explicit AMI; every worker type has an instance profile.
    ray_pin = next(line.split("==")[1] for line in CONSTRAINTS.read_text().splitlines() if line.startswith("ray=="))
    assert prepared["docker"]["image"].startswith(f"rayproject/ray:{ray_pin}-py311-cu13")
    assert all(types[t]["node_config"]["IamInstanceProfile"]["Name"] for t in ("gpu-1x", "gpu-8x"))
    # The head starts MLflow through our command (no fallback backend) after its preflight; workers check too.
    assert "python -m sinkd_ray.cluster preflight --head" in prepared["head_setup_commands"]
    assert "python -m sinkd_ray.cluster mlflow-server" in prepared["head_setup_commands"]
    assert "python -m sinkd_ray.cluster preflight" in prepared["worker_setup_commands"]
    assert any("-c /home/ray/sinkd_ray/constraints.txt -e /home/ray/sinkd_ray" in c for c in prepared["setup_commands"])


def test_the_shipped_file_names_every_change_line_still_to_fill_in_on_one_line(template):
    with pytest.raises(SinkdError, match="fill in the lines marked CHANGE") as info:
        _check(copy.deepcopy(template))
    message = str(info.value)
    assert "\n" not in message and "SINKD_BUCKET" in message and "head, gpu-1x, gpu-8x" in message


def _drop_profile(name):
    return lambda c: c["available_node_types"][name]["node_config"].pop("IamInstanceProfile")


@pytest.mark.parametrize(
    "breakage, match",
    [
        # Ray's schema and the sanity checks that were there before
        (lambda c: c.update(bogus_key=1), "bogus_key"),
        (lambda c: c["available_node_types"]["gpu-1x"].update(min_workers=5, max_workers=2), "min_workers=5 > max"),
        (lambda c: c["available_node_types"]["gpu-8x"].update(min_workers=2) or c.update(max_workers=1), "max_workers"),
        (lambda c: c["provider"].update(aws_secret_access_key="abc"), "credential"),
        (lambda c: c["available_node_types"]["gpu-1x"].update(max_workers="many"), "many"),
        # 1. an implicit or outdated AMI (Ray 2.60 resolves both to DLAMI Ubuntu 18.04 V71.0)
        (
            lambda c: c["available_node_types"]["gpu-1x"]["node_config"].update(ImageId="latest_dlami"),
            "'gpu-1x' has ImageId 'latest_dlami'.*Ubuntu 18.04",
        ),
        (
            lambda c: c["available_node_types"]["gpu-8x"]["node_config"].pop("ImageId"),
            "'gpu-8x' has ImageId '\\(none\\)'",
        ),
        (
            lambda c: c["available_node_types"]["head"]["node_config"].update(ImageId=RAY_DEFAULT_AMI_US_WEST_2),
            "'head' has ImageId 'ami-0a2b85e15b7c0ac34'.*Ubuntu 18.04",
        ),
        # 1. the software is not pinned to the project's Ray (a later node would run another version)
        (lambda c: c["docker"].update(image="rayproject/ray:latest-gpu"), "not Ray's image of the pinned ray=="),
        (lambda c: c["docker"].update(image="rayproject/ray:2.60.0-py311-cpu"), "not a GPU image"),
        (lambda c: c.pop("docker"), "no docker.image"),
        # 2. a worker type without an instance profile
        (_drop_profile("gpu-1x"), "worker node type 'gpu-1x' has no IamInstanceProfile"),
        (_drop_profile("gpu-8x"), "worker node type 'gpu-8x' has no IamInstanceProfile"),
        # 3. the bucket: the placeholder, missing, or a second copy; the MLflow backend left implicit
        (
            lambda c: _set_env(c, "SINKD_BUCKET", "s3://my-sinkd-bucket"),
            "CHANGE: SINKD_BUCKET \\(still s3://my-sinkd-bucket",
        ),
        (lambda c: _set_env(c, "SINKD_BUCKET", None), "set the bucket once"),
        (
            lambda c: c["head_setup_commands"].append(
                "mlflow server --artifacts-destination s3://acme-sinkd-runs/mlflow"
            ),
            "head_setup_commands.3' names a bucket \\(s3://acme-sinkd-runs\\)",
        ),
        (lambda c: _set_env(c, "SINKD_MLFLOW_BACKEND", None), "SINKD_MLFLOW_BACKEND"),
        (lambda c: _set_env(c, "SINKD_MLFLOW_BACKEND", "postgres"), "SINKD_MLFLOW_BACKEND.*'postgres'"),
        # 4. another interpreter than the job's `python`, or installs without the constraints file
        (
            lambda c: c["setup_commands"].__setitem__(
                0, c["setup_commands"][0].replace("python -m pip", "python3 -m pip")
            ),
            "setup_commands\\[0\\] installs with 'python3 -m pip'",
        ),
        (
            lambda c: c["head_setup_commands"].insert(0, "pip3 install boto3"),
            "head_setup_commands\\[0\\] installs with 'pip3'",
        ),
        (
            lambda c: c["setup_commands"].__setitem__(0, "python -m pip install -e /home/ray/sinkd_ray"),
            "setup_commands\\[0\\] installs without -c",
        ),
        (lambda c: c.update(setup_commands=[]), "never install this checkout"),
        # 5. the provider's region reaches the containers (boto3 finds none inside: NoRegionError)
        (lambda c: _set_env(c, "AWS_DEFAULT_REGION", None), "must pass the provider's region.*us-west-2"),
        (lambda c: _set_env(c, "AWS_DEFAULT_REGION", "eu-west-1"), "AWS_DEFAULT_REGION=us-west-2 \\(found 'eu-west-1'"),
        # 6. the SQLite store on the host's disk, its folder created first
        (lambda c: c["docker"].pop("head_run_options"), "/home/ray/mlflow must be a host volume"),
        (lambda c: c.pop("initialization_commands"), "must create the volume's host folder first"),
        # 7. GPUs given to the workers' containers, and checked before Ray starts there
        (lambda c: c["docker"].pop("worker_run_options"), "'gpu-1x' declares GPUs but its container gets none"),
        (
            lambda c: c.update(
                worker_start_ray_commands=[x for x in c["worker_start_ray_commands"] if "check" not in x]
            ),
            "check-gpus` before `ray start`",
        ),
        # 8. Ray's auth mode explicit on every start (a stray ~/.ray/auth_token must not decide it)
        (
            lambda c: c["head_start_ray_commands"].__setitem__(
                1, c["head_start_ray_commands"][1].replace("RAY_AUTH_MODE=disabled ", "")
            ),
            "head_start_ray_commands\\[1\\] starts Ray without RAY_AUTH_MODE",
        ),
    ],
)
def test_broken_copies_of_cluster_yaml_fail_with_one_line(filled, breakage, match):
    breakage(filled)
    with pytest.raises(SinkdError, match=match) as info:
        _check(filled)
    assert "\n" not in str(info.value) and str(info.value).startswith("broken.yaml")


def test_unknown_key_also_fails_rays_own_validation(template):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(template)
    broken["available_node_types"]["gpu-1x"]["gpus_please"] = 4
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_check_command_reports_a_filled_in_file_valid_and_the_template_as_one_line_error(tmp_path, filled, capsys):
    (tmp_path / "constraints.txt").write_text(CONSTRAINTS.read_text())
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(filled))
    assert main(["check", str(tmp_path / "cluster.yaml")]) == 0
    assert "valid (aws" in capsys.readouterr().out
    with pytest.raises(SinkdError, match="CHANGE"):
        load_cluster_file(REPO / "cluster.yaml")
    # The image must match the lock file beside the cluster file.
    (tmp_path / "constraints.txt").write_text(CONSTRAINTS.read_text().replace("\nray==", "\nray==9.9.9\n# was ray=="))
    with pytest.raises(SinkdError, match="ray==9.9.9"):
        load_cluster_file(tmp_path / "cluster.yaml")


# ------------------------------------------------------------------------------------------- node setup


def _pin_current_environment(path: Path, **override: str) -> Path:
    from sinkd_ray.node_setup import dependency_closure

    pins = {**dependency_closure(), **override}
    path.write_text(
        "".join(f"{name}=={version.split('+')[0]}\n" for name, version in pins.items() if name != "sinkd-ray")
    )
    return path


def test_preflight_passes_on_a_node_that_matches_its_lock_and_can_write_the_bucket(tmp_path, monkeypatch, capsys):
    from sinkd_ray import node_setup

    monkeypatch.setattr(node_setup, "CONSTRAINTS", _pin_current_environment(tmp_path / "constraints.txt"))
    monkeypatch.setenv("SINKD_BUCKET", (tmp_path / "bucket").as_uri())
    monkeypatch.setenv("SINKD_MLFLOW_BACKEND", "sqlite")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert main(["preflight", "--head"]) == 0
    out = capsys.readouterr().out
    assert "writable" in out and "deleted by `ray down`" in out
    assert not list((tmp_path / "bucket").iterdir())  # the probe object is gone again


@pytest.mark.parametrize(
    "problem, match",
    [
        ("version", "1 installed package\\(s\\) differ from constraints.txt: torch"),
        ("bucket", "cannot write to file:///proc/sinkd-nowhere from this node.*IamInstanceProfile"),
        ("no bucket", "SINKD_BUCKET=''"),
        ("gpu", "NVIDIA devices but torch .* cannot use them.*driver"),
        ("backend", "SINKD_MLFLOW_BACKEND='postgres'"),
        ("ssm", "cannot read the MLflow backend URI from SSM parameter /sinkd/mlflow-backend-uri.*sqlite"),
        ("no region", "no AWS region in this container.*AWS_DEFAULT_REGION"),
    ],
)
def test_preflight_stops_setup_with_one_line(problem, match, tmp_path, monkeypatch):
    import types

    from sinkd_ray import node_setup

    monkeypatch.setattr(
        node_setup,
        "CONSTRAINTS",
        _pin_current_environment(tmp_path / "constraints.txt", **({"torch": "9.9.9"} if problem == "version" else {})),
    )
    monkeypatch.setenv(
        "SINKD_BUCKET",
        {"bucket": "file:///proc/sinkd-nowhere", "no bucket": ""}.get(problem, (tmp_path / "bucket").as_uri()),
    )
    monkeypatch.setenv(
        "SINKD_MLFLOW_BACKEND",
        {"backend": "postgres", "ssm": "ssm:/sinkd/mlflow-backend-uri", "no region": "ssm:/x"}.get(problem, "sqlite"),
    )
    if problem == "gpu":
        monkeypatch.setattr(node_setup, "_nvidia_devices", lambda: [Path("/dev/nvidia0")])
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")
    monkeypatch.delenv("AWS_REGION", raising=False)
    if problem == "no region":
        monkeypatch.delenv("AWS_DEFAULT_REGION")
    if problem == "ssm":  # what boto3 raises on a node whose role may not read the parameter

        def client(service, region_name=None):
            raise PermissionError("AccessDeniedException: not authorized to perform ssm:GetParameter")

        monkeypatch.setitem(sys.modules, "boto3", types.SimpleNamespace(client=client))
    with pytest.raises(SinkdError, match=match) as info:
        node_setup.preflight(head=True)
    assert "\n" not in str(info.value)


def _register_through(url: str) -> None:
    """A student version registered through the server: its REST store checks what a SQLite store does not (a
    logged model's version must name its model id; the rehearsal found it)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from sinkd_ray.tracking import register_student

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input: list[str]) -> list[str]:
            return model_input

    previous = mlflow.get_tracking_uri()
    client = MlflowClient(url)
    run = client.create_run(client.create_experiment("registry"))
    try:
        version = register_student(
            client,
            "echo",
            run.info.run_id,
            lambda: mlflow.pyfunc.log_model(name="student", python_model=Echo()).model_uri,
        )
    finally:
        mlflow.set_tracking_uri(previous)
    assert client.get_model_version_by_alias("echo", "best").version == version == "1"


def test_the_head_starts_mlflow_once_on_the_configured_backend_and_fails_loudly_when_it_cannot(tmp_path, monkeypatch):
    import os
    import signal
    import urllib.request

    from sinkd_ray import node_setup

    monkeypatch.setenv("SINKD_BUCKET", (tmp_path / "bucket").as_uri())
    monkeypatch.setenv("SINKD_MLFLOW_BACKEND", "sqlite")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    port = free_port()
    pidfile = tmp_path / "home" / "mlflow" / "server.pid"
    try:
        url = node_setup.start_mlflow_server(port=port)
        with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
            assert response.status == 200
        pid = pidfile.read_text()
        command = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
        assert command[command.index("--workers") + 1] == str(node_setup.mlflow_workers())
        assert node_setup.start_mlflow_server(port=port) == url and pidfile.read_text() == pid  # not started twice
        assert (tmp_path / "home" / "mlflow" / "mlflow.db").exists()
        _register_through(url)
    finally:
        if pidfile.exists():
            os.killpg(int(pidfile.read_text()), signal.SIGTERM)  # the server runs in its own session
    # A backend the server cannot open: `ray up` stops here instead of the study failing at its end.
    pidfile.unlink()
    monkeypatch.setattr(node_setup, "mlflow_backend_uri", lambda: "postgresql://sinkd@127.0.0.1:1/none")
    with pytest.raises(SinkdError, match="the MLflow server exited with code") as info:
        node_setup.start_mlflow_server(port=free_port(), wait_s=300)
    assert "\n" not in str(info.value)


def test_the_mlflow_server_takes_half_the_heads_cpus_up_to_four_unless_told(monkeypatch):
    from sinkd_ray import node_setup

    monkeypatch.delenv("SINKD_MLFLOW_WORKERS", raising=False)
    for cpus, workers in ((1, 1), (2, 1), (6, 3), (64, 4)):
        monkeypatch.setattr(node_setup.os, "cpu_count", lambda cpus=cpus: cpus)
        assert node_setup.mlflow_workers() == workers, cpus
    monkeypatch.setenv("SINKD_MLFLOW_WORKERS", "8")
    assert node_setup.mlflow_workers() == 8
    monkeypatch.setenv("SINKD_MLFLOW_WORKERS", "0")
    with pytest.raises(SinkdError, match="SINKD_MLFLOW_WORKERS='0' is not a positive whole number"):
        node_setup.mlflow_workers()


# ------------------------------------------------------------------------------ what the containers get
def test_the_containers_get_the_providers_region_and_read_the_ssm_backend_with_it(tmp_path, template, monkeypatch):
    """boto3.client("ssm") inside the containers had no region (NoRegionError, reported as an IAM problem). The
    containers get cluster.yaml's docker env; with exactly that env (plus a moto server standing in for AWS) the
    head reads its backend URI from SSM."""
    import boto3
    from moto.server import ThreadedMotoServer

    from sinkd_ray import node_setup
    from sinkd_ray.cluster import _docker_env

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
            monkeypatch.delenv(name, raising=False)
        container_env = _docker_env(template["docker"])
        assert container_env["AWS_DEFAULT_REGION"] == template["provider"]["region"]
        for name, value in container_env.items():
            monkeypatch.setenv(name, value)
        # the instance role's credentials and AWS's endpoint, as moto's
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        boto3.client("ssm").put_parameter(
            Name="/sinkd/mlflow-backend-uri", Value="postgresql://mlflow:pw@db:5432/mlflow", Type="SecureString"
        )
        assert node_setup.mlflow_backend_uri("ssm:/sinkd/mlflow-backend-uri") == "postgresql://mlflow:pw@db:5432/mlflow"
    finally:
        server.stop()


def test_the_sqlite_store_lives_on_a_host_volume_the_host_creates_first(template):
    """The head's SQLite store was in the container's own layer, deleted whenever the container is recreated."""
    from sinkd_ray.cluster import SQLITE_HOME, _volumes
    from sinkd_ray.node_setup import CLUSTER_MLFLOW_HOME

    host = _volumes(template["docker"]["head_run_options"])[SQLITE_HOME]
    assert str(CLUSTER_MLFLOW_HOME) == SQLITE_HOME and host.startswith("/home/ubuntu/")
    assert f"mkdir -p {host}" in template["initialization_commands"]


def test_every_ray_start_in_cluster_yaml_sets_the_auth_mode_and_workers_check_their_gpus_first(template):
    head, workers = template["head_start_ray_commands"], template["worker_start_ray_commands"]
    starts = [c for c in head + workers if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=disabled ray start" in c for c in starts)
    check = next(i for i, c in enumerate(workers) if "sinkd_ray.cluster check-gpus" in c)
    assert check < next(i for i, c in enumerate(workers) if "ray start" in c)
    assert template["docker"]["worker_run_options"] == ["--gpus all"]


@pytest.mark.parametrize(
    "declared, seen, kernel_ok, match",
    [
        ('{"CPU": 8, "GPU": 1}', 0, True, "declares 1 GPU\\(s\\) but torch sees 0.*--gpus all"),
        ('{"CPU": 96, "GPU": 8}', 4, True, "declares 8 GPU\\(s\\) but torch sees 4"),
        ('{"CPU": 8, "GPU": 1}', 1, False, "a kernel failed on GPU 0"),
        ('{"CPU": 8, "GPU": 1}', 1, True, None),
        ('{"CPU": 2}', 0, True, None),  # a CPU node type
    ],
)
def test_check_gpus_wants_exactly_the_declared_gpus_and_a_kernel_on_each(declared, seen, kernel_ok, match, monkeypatch):
    """Before `ray start` a worker compares the GPUs its node type declares (RAY_OVERRIDE_RESOURCES, exported by
    the autoscaler to the start commands) with what torch sees, and runs a kernel on each; a container started
    without the GPUs used to pass and advertise GPU: 1."""
    from sinkd_ray import node_setup

    monkeypatch.setenv("RAY_OVERRIDE_RESOURCES", declared)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: seen > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: seen)
    real_arange = torch.arange

    def arange(*args, device=None, **kwargs):  # "cuda:i" tensors computed on the CPU, or a failing kernel
        if not kernel_ok:
            raise RuntimeError("CUDA error: no kernel image is available for execution on the device")
        return real_arange(*args, **kwargs)

    monkeypatch.setattr(torch, "arange", arange)
    if match is None:
        assert "GPU" in node_setup.check_declared_gpus()
    else:
        with pytest.raises(SinkdError, match=match) as info:
            node_setup.check_declared_gpus()
        assert "\n" not in str(info.value)


def test_a_prebuilt_image_of_the_pinned_ray_is_accepted_and_another_ray_is_not(filled):
    """deploy/Dockerfile builds Ray's image of the pin with the project installed (docs/scaling.md, section 9)."""
    ray_pin = next(line.split("==")[1] for line in CONSTRAINTS.read_text().splitlines() if line.startswith("ray=="))
    filled["docker"]["image"] = f"123456789.dkr.ecr.us-west-2.amazonaws.com/sinkd-ray:{ray_pin}-py311-cu130"
    _check(filled)
    assert f"FROM rayproject/ray:{ray_pin}-py311-cu130" in (REPO / "deploy" / "Dockerfile").read_text()
    filled["docker"]["image"] = "123456789.dkr.ecr.us-west-2.amazonaws.com/sinkd-ray:2.59.0-py311-cu130"
    with pytest.raises(SinkdError, match="not Ray's image of the pinned"):
        _check(filled)
