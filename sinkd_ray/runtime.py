"""The Ray runtime a command runs on: the one it starts (local, token-authenticated, dashboard on loopback) or
the one it is pointed at (``--address`` / ``$RAY_ADDRESS``), never one Ray has to guess.

Why: with two local runtimes on a machine (two studies, a study beside the tests), anything in Ray that looks
for "the" local cluster fails with "Found multiple active Ray instances" — Ray Train's placement-group cleaner
does, and the finished trial's placement group is then never released, so the next trial waits forever. So
the runtime's address is pinned in ``RAY_ADDRESS`` for this process and for every worker process of the job
(a ``worker_process_setup_hook``).
"""

from __future__ import annotations

import os
import signal

from sinkd_ray.errors import SinkdError

ADDRESS_ENV = "RAY_ADDRESS"
# The resource Ray gives the head node only (ray._private.ray_constants.HEAD_NODE_RESOURCE_NAME): asking for a
# sliver of it places an actor on the head.
HEAD_NODE_RESOURCE = "node:__internal_head__"


def pin_ray_address() -> None:
    """``worker_process_setup_hook``: every Ray worker process of the job knows its own cluster's address."""
    import ray

    os.environ[ADDRESS_ENV] = ray.get_runtime_context().gcs_address


def connect(address: str | None = None) -> tuple[str, bool]:
    """Attach to ``address`` (else $RAY_ADDRESS), or start a local runtime.

    Returns (GCS address, whether this process started the runtime — a fixed-size local one). Idempotent.
    """
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address, False
    address = address or os.environ.get(ADDRESS_ENV) or None
    sigterm = signal.getsignal(signal.SIGTERM)
    runtime_env = {"worker_process_setup_hook": "sinkd_ray.runtime.pin_ray_address"}
    if address:
        check_reachable(address)
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise SinkdError(
                f"cannot reach the Ray cluster at {address} ({str(err).splitlines()[0][:120]}) — start "
                f"it (ray start --head / ray up) or drop --address and unset {ADDRESS_ENV} to run "
                "locally"
            ) from None
        started = False
    else:
        # Ray 2.60 cannot bind a local runtime to loopback: ray.init resolves 127.0.0.1 to the node's address and
        # its gRPC servers listen on every interface (measured: gcs_server and raylet on "::"). What it does offer
        # is kept: token authentication, on by default for a new local runtime (unless RAY_AUTH_MODE says
        # otherwise), so those ports refuse callers without the token; and the dashboard on 127.0.0.1.
        # The dashboard is required (Ray Train's placement-group cleaner queries its state API), on a free port.
        # address="local": always a new runtime of our own. Without an address ray.init would join whichever
        # cluster `ray start` last wrote to /tmp/ray/ray_current_cluster — e.g. another study's.
        try:
            ray.init(
                address="local",
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                runtime_env=runtime_env,
                log_to_driver=True,
            )
        except Exception as err:  # Ray raises plain Exception / RuntimeError / TimeoutError when its start fails
            raise SinkdError(
                f"Ray's local runtime did not start ({str(err).strip().splitlines()[0][:160]}) — this machine is "
                "probably overloaded (several commands starting Ray at once): wait and rerun, start fewer at a "
                "time, or start one runtime (`ray start --head`) and attach every command to it with --address"
            ) from None
        started = True
    _restore_sigterm(sigterm)
    gcs = ray.get_runtime_context().gcs_address
    os.environ[ADDRESS_ENV] = gcs  # this process and its subprocesses
    return gcs, started


def _restore_sigterm(handler) -> None:
    """ray.init installs its core worker's fatal-signal handler for SIGTERM, which aborts the driver (exit -6,
    every MLflow run left RUNNING) instead of the graceful stop `cli.run_cli` set up: put that one back."""
    import threading

    if callable(handler) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A TCP connection to the cluster's address within ``timeout_s``: without one, ray.init retries a closed or
    unanswered port for ever (and Ctrl+C does not stop it). "auto" and other forms without a port are left to Ray."""
    import socket
    from urllib.parse import urlsplit

    target = urlsplit(address if "://" in address else f"ray://{address}")
    try:
        host, port = target.hostname, target.port
    except ValueError:
        host = port = None
    if not host or not port:
        return
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except OSError as err:
        raise SinkdError(
            f"cannot reach the Ray cluster at {address} ({err.strerror or err}) within {timeout_s:.0f} s — start "
            f"it (ray start --head / ray up), or drop --address and unset {ADDRESS_ENV} to run on a local runtime"
        ) from None


def worker_bundle(cpus: float, gpus: float, resources: dict[str, float]) -> dict[str, float]:
    bundle = {"CPU": cpus, **resources}
    if gpus:
        bundle["GPU"] = gpus
    return bundle


def fits_now(bundle: dict[str, float], count: int, extra_cpu: float = 0.0) -> bool:
    """Whether ``count`` bundles, and ``extra_cpu`` on the head beside them (where trial actors run: see
    `sinkd_ray.study.TRIAL_RESOURCES`), fit into the nodes the cluster has (their total resources, busy or not).
    Workers go to other nodes first; the head holds only those that fit nowhere else."""
    import ray

    capacity, head_capacity, head_cpu = 0, 0, 0.0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        total = node.get("Resources", {})
        per_node = min(
            (int(total.get(k, 0.0) / v + 1e-9) if v > 0 else count for k, v in bundle.items()), default=count
        )
        capacity += per_node
        if _is_alive_head(node):
            head_capacity, head_cpu = per_node, total.get("CPU", 0.0)
    on_head = min(max(0, count - (capacity - head_capacity)), head_capacity)
    return capacity >= count and head_cpu - on_head * bundle.get("CPU", 0.0) + 1e-9 >= extra_cpu


def _is_alive_head(node: dict) -> bool:
    return bool(node.get("Alive")) and HEAD_NODE_RESOURCE in node.get("Resources", {})


def check_resources(bundle: dict[str, float], count: int, *, wait_s: float, extra_cpu: float = 0.0) -> None:
    """Refuse, in one line, a run whose ``count`` workers × ``bundle`` the cluster cannot place; where nodes
    may still come (an autoscaling cluster: ``wait_s`` > 0), wait for them up to ``wait_s`` seconds, said first.
    Without this, Ray Train retries starting the worker group every 60 s forever."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    if fits_now(bundle, count, extra_cpu):
        return
    head_cpu = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if _is_alive_head(n)), default=0.0)
    if head_cpu + 1e-9 < extra_cpu:  # no node the autoscaler adds is a head: waiting cannot help
        raise SinkdError(
            f"the head node has {head_cpu:g} CPUs, and each trial's actor runs there ({extra_cpu} CPU) — "
            "start the head with CPUs (e.g. `ray start --head --num-cpus 2`; cluster.yaml's head has them)"
        )
    have = {k: v for k, v in ray.cluster_resources().items() if k in bundle or k in ("CPU", "GPU")}
    need = f"{count} worker(s) × {bundle}"
    if extra_cpu:
        need += f" + {extra_cpu} CPU on the head for the trial itself"
    if wait_s <= 0:
        raise SinkdError(
            f"this Ray cluster cannot place {need} (it has {have}) — lower --workers / "
            "--cpus-per-worker / --gpus-per-worker (e.g. 1.99 CPUs on 2 cores: still 2 threads), or "
            "run on a cluster with those resources"
        )
    print(
        f"waiting up to {wait_s:.0f} s for the cluster to provide {need} (it has {have} now; "
        f"--resources-wait to change)",
        flush=True,
    )
    trial = [{"CPU": extra_cpu, HEAD_NODE_RESOURCE: 0.001}] if extra_cpu else []
    bundles = [dict(bundle) for _ in range(count)] + trial
    group = placement_group(bundles, strategy="PACK")
    try:
        ready = group.wait(timeout_seconds=wait_s)
    finally:
        remove_placement_group(group)
    if not ready:
        raise SinkdError(
            f"after {wait_s:.0f} s the cluster still cannot place {need} — check the node types and "
            "max_workers of the cluster, or lower the request"
        )
