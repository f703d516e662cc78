"""Search spaces as YAML files, checked completely before a study starts.

File format (see ``search_spaces/*.yaml``)::

    sampler: tpe            # tpe (Optuna TPE, seeded) or grid (every combination of `choice` params)
    search:                 # parameters the study varies, one distribution each
      lr: {loguniform: [1.0e-5, 1.0e-4]}
      alpha: {uniform: [0.5, 1.0]}
      batch_size: {choice: [16, 32, 64]}
      sinkhorn_iters: {int: [5, 40]}
    fixed:                  # values every trial uses
      sinkhorn_lambda: 0.1
    tasks:                  # per-task overrides of `fixed` (and of `search` entries)
      rte: {fixed: {epochs: 5}}

Every key is a field of :class:`DistillConfig` or :class:`TrainConfig`; every value (each end of a range,
each choice) must pass that config's own validation. A problem is one line naming the file, the key and
what is wrong.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sinkd_ray.config import DistillConfig, TrainConfig
from sinkd_ray.errors import SinkdError

SEARCH_SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
KINDS = ("uniform", "loguniform", "int", "choice")
# Training fields a study file may set; the rest (models, paths, workers) come from the command line.
# logit_space is never searched in practice, but the paper preset fixes it ("paper": vocabulary for generative models).
TUNABLE_TRAIN_FIELDS = (
    "lr",
    "epochs",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "grad_accum_steps",
    "max_length",
    "logit_space",
)
_DISTILL_FIELDS = {f.name: f for f in dataclasses.fields(DistillConfig)}
_TRAIN_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name in TUNABLE_TRAIN_FIELDS}
KNOWN_KEYS = tuple(sorted(set(_DISTILL_FIELDS) | set(_TRAIN_FIELDS)))


@dataclass(frozen=True)
class Param:
    """One searched parameter: ``kind`` in KINDS and its ``values`` ([low, high] or the choices)."""

    name: str
    kind: str
    values: tuple

    def optuna_distribution(self):
        import optuna.distributions as od

        if self.kind == "choice":
            return od.CategoricalDistribution(list(self.values))
        if self.kind == "int":
            return od.IntDistribution(int(self.values[0]), int(self.values[1]))
        return od.FloatDistribution(float(self.values[0]), float(self.values[1]), log=self.kind == "loguniform")


@dataclass(frozen=True)
class SearchSpace:
    path: str
    sampler: str = "tpe"
    search: dict[str, Param] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)

    def digest(self) -> str:
        """What the study searches and fixes (not where the file lives): changes when any of it does."""
        import hashlib
        import json

        content = {
            "sampler": self.sampler,
            "search": {k: [p.kind, list(p.values)] for k, p in sorted(self.search.items())},
            "fixed": {k: self.fixed[k] for k in sorted(self.fixed)},
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def optuna_space(self) -> dict:
        return {name: p.optuna_distribution() for name, p in self.search.items()}

    def grid(self) -> dict[str, list]:
        """For ``sampler: grid``: every parameter's list of values."""
        return {name: list(p.values) for name, p in self.search.items()}

    def grid_size(self) -> int:
        return math.prod(len(p.values) for p in self.search.values())

    def split(self, params: dict[str, Any]) -> tuple[dict, dict]:
        """Divide ``fixed`` + sampled ``params`` into (DistillConfig overrides, TrainConfig overrides)."""
        merged = {**self.fixed, **params}
        return (
            {k: v for k, v in merged.items() if k in _DISTILL_FIELDS},
            {k: v for k, v in merged.items() if k in _TRAIN_FIELDS},
        )


def resolve_path(name_or_path: str) -> Path:
    """A file path, or the name of a file in ``search_spaces/`` (``default`` -> search_spaces/default.yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (SEARCH_SPACES_DIR / name_or_path, SEARCH_SPACES_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.stem for p in SEARCH_SPACES_DIR.glob("*.yaml")))
    raise SinkdError(f"search space '{name_or_path}' not found — pass a YAML file path or one of: {known}")


def _check_value(where: str, key: str, value: Any) -> None:
    """Run the owning config's own validation (type and range) on one value."""
    try:
        (DistillConfig if key in _DISTILL_FIELDS else TrainConfig)(**{key: value})
    except SinkdError as exc:
        raise SinkdError(f"{where}: key '{key}': {exc}") from None


def _parse_param(where: str, key: str, spec: Any) -> Param:
    if key not in KNOWN_KEYS:
        raise SinkdError(f"{where}: unknown key '{key}' — known keys: {', '.join(KNOWN_KEYS)}")
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise SinkdError(f"{where}: key '{key}': expected one of {{{', '.join(KINDS)}: [...]}}, got {spec!r}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise SinkdError(f"{where}: key '{key}': {kind} needs a non-empty list, got {values!r}")
    if kind != "choice":
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise SinkdError(f"{where}: key '{key}': {kind} needs [low, high] numbers, got {values!r}")
        if not values[0] < values[1]:
            raise SinkdError(f"{where}: key '{key}': empty range [{values[0]}, {values[1]}] (low must be < high)")
        if kind == "loguniform" and values[0] <= 0:
            raise SinkdError(f"{where}: key '{key}': loguniform needs low > 0, got {values[0]}")
        if kind == "int" and not all(isinstance(v, int) for v in values):
            raise SinkdError(f"{where}: key '{key}': int needs integer bounds, got {values!r}")
    for v in values:
        _check_value(where, key, v)
    return Param(key, kind, tuple(values))


def _parse_block(where: str, raw: dict) -> tuple[dict[str, Param], dict[str, Any]]:
    search = {k: _parse_param(f"{where} search", k, v) for k, v in (raw.get("search") or {}).items()}
    fixed = {}
    for k, v in (raw.get("fixed") or {}).items():
        if k not in KNOWN_KEYS:
            raise SinkdError(f"{where} fixed: unknown key '{k}' — known keys: {', '.join(KNOWN_KEYS)}")
        _check_value(f"{where} fixed", k, v)
        fixed[k] = v
    return search, fixed


def load_search_space(name_or_path: str, task: str | None = None) -> SearchSpace:
    """Parse and validate a search-space file; apply the overrides for ``task`` if the file has any."""
    path = resolve_path(name_or_path)
    where = str(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SinkdError(f"{where}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise SinkdError(f"{where}: expected a mapping with 'search' and 'fixed', got {type(raw).__name__}")
    unknown = set(raw) - {"sampler", "search", "fixed", "tasks", "description"}
    if unknown:
        raise SinkdError(
            f"{where}: unknown top-level key(s) {sorted(unknown)} — allowed: sampler, search, fixed, tasks, description"
        )
    sampler = raw.get("sampler", "tpe")
    if sampler not in ("tpe", "grid"):
        raise SinkdError(f"{where}: sampler '{sampler}' — use 'tpe' or 'grid'")
    search, fixed = _parse_block(where, raw)
    overrides = raw.get("tasks") or {}
    if not isinstance(overrides, dict):
        raise SinkdError(f"{where}: 'tasks' must map task names to {{search:, fixed:}} overrides")
    for task_name, block in overrides.items():  # validate every task's block, not only the one used
        if not isinstance(block, dict) or set(block) - {"search", "fixed"}:
            raise SinkdError(f"{where} tasks.{task_name}: expected {{search: ..., fixed: ...}}, got {block!r}")
        t_search, t_fixed = _parse_block(f"{where} tasks.{task_name}", block)
        if task is not None and task_name == task:
            search = {**{k: v for k, v in search.items() if k not in t_fixed}, **t_search}
            fixed = {**{k: v for k, v in fixed.items() if k not in t_search}, **t_fixed}
    both = set(search) & set(fixed)
    if both:
        raise SinkdError(f"{where}: key(s) {sorted(both)} are both searched and fixed — keep one")
    if sampler == "grid":
        bad = [k for k, p in search.items() if p.kind != "choice"]
        if bad:
            raise SinkdError(f"{where}: sampler 'grid' needs 'choice' lists, but {bad} are ranges")
    return SearchSpace(path=where, sampler=sampler, search=search, fixed=fixed)
