"""`python -m sinkd_ray.cluster check cluster.yaml`: check a Ray cluster launcher file offline, before `ray up`.

Ray's own schema validation (``prepare_config`` + ``validate_config``, no cloud credentials needed) catches
unknown keys and wrong types; it does not catch node types whose ``min_workers`` exceeds ``max_workers`` (the
autoscaler then silently never reaches the minimum) or credentials pasted into the file, so we check those too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from sinkd_ray.cli import run_cli
from sinkd_ray.errors import SinkdError

# Keys that carry secrets: they belong in the environment / instance roles, never in a committed file.
CREDENTIAL_KEYS = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token", "password",
                   "secret", "private_key")


def _walk_keys(node, path=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*path, str(key))
            yield from _walk_keys(value, (*path, str(key)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk_keys(value, (*path, str(i)))


def validate_cluster_config(config: dict, source: str = "cluster config") -> dict:
    """Ray's schema plus our checks; returns Ray's prepared config. Problems raise a one-line SinkdError."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    if not isinstance(config, dict):
        raise SinkdError(f"{source}: not a YAML mapping")
    for keys in _walk_keys(config):
        if keys[-1].lower() in CREDENTIAL_KEYS or keys[-1].lower().endswith("_secret"):
            raise SinkdError(f"{source}: '{'.'.join(keys)}' looks like a credential — remove it and use the "
                             "environment or an instance role")
    try:
        prepared = prepare_config(config)
        validate_config(prepared)
    except jsonschema.ValidationError as exc:
        where = ".".join(str(p) for p in exc.absolute_path) or "top level"
        raise SinkdError(f"{source}: {exc.message} (at {where})") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise SinkdError(f"{source}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    head = prepared.get("head_node_type")
    workers = {name: t for name, t in prepared.get("available_node_types", {}).items() if name != head}
    for name, node_type in workers.items():
        low, high = node_type.get("min_workers", 0), node_type.get("max_workers", 0)
        if low > high:
            raise SinkdError(f"{source}: node type '{name}' has min_workers={low} > max_workers={high}")
    total_min = sum(t.get("min_workers", 0) for t in workers.values())
    if total_min > prepared.get("max_workers", 0):
        raise SinkdError(f"{source}: the node types' min_workers add up to {total_min}, more than the cluster's "
                         f"max_workers={prepared.get('max_workers')}")
    return prepared


def load_cluster_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SinkdError(f"{path}: no such file")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SinkdError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return validate_cluster_config(config, str(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sinkd_ray.cluster",
                                     description="Check a Ray cluster launcher file offline (schema and sanity).")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a cluster file")
    check.add_argument("path", nargs="?", default="cluster.yaml")
    args = parser.parse_args(argv)
    prepared = load_cluster_file(args.path)
    types = ", ".join(f"{name} ({t.get('min_workers', 0)}-{t.get('max_workers', 0)})"
                      for name, t in prepared["available_node_types"].items())
    print(f"{args.path}: valid ({prepared['provider']['type']}; node types: {types})")
    return 0


if __name__ == "__main__":
    run_cli(main)
