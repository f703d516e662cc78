"""A study: Ray Tune (Optuna TPE or a grid, ASHA early stopping) over Ray Train runs, tracked in MLflow.

One trial = one `driver` run whose settings are the study's base `RunSpec` plus the trial's sampled values
(`trial_run`); every trial shares the teacher's cached logits. `fit_study` runs or resumes the Tuner and says
whether it was interrupted; `summarise` picks the best trial (ties broken as `best_trial` says), exports and
registers its student.
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass
from pathlib import Path

from sinkd_ray.config import RunSpec, StudyConfig
from sinkd_ray.driver import PreparedRun, build_trainer, fit
from sinkd_ray.errors import SinkdError
from sinkd_ray.runtime import HEAD_NODE_RESOURCE
from sinkd_ray.search_space import SearchSpace
from sinkd_ray.storage import StorageLayout

METRIC, MODE = "dev_metric", "max"
# What each trial's own actor reserves (the Train V2 pattern: a Tune function that fits a trainer; 0 is refused).
TRIAL_CPU = 0.01
# ... and where: on the head. Train V2 starts each run's controller on its trial's node, and the first controller
# creates Train's detached AutoscalingCoordinator actor on its own node for good. A live actor keeps a node busy,
# so on an autoscaling cluster a GPU node that once hosted a trial actor was never released (seen with the fake
# multi-node provider: the node hosting the coordinator reported "Busy workers on node." long after the study).
TRIAL_RESOURCES = {"cpu": TRIAL_CPU, HEAD_NODE_RESOURCE: 0.001}


# ------------------------------------------------------------------------------------------- the space
def base_spec(space: SearchSpace, spec: RunSpec, typed: set[str]) -> RunSpec:
    """The CLI's spec with the file's fixed values; a flag typed on the command line (``typed``) wins."""
    return spec.with_values({k: v for k, v in space.fixed.items() if k not in typed})


def without_typed(space: SearchSpace, typed: set[str]) -> SearchSpace:
    """The space with the settings typed on the command line neither searched nor fixed by the file: a flag fixes
    its setting for every trial (`base_spec` then keeps the flag's value). Said once per key the file searched."""
    from dataclasses import replace

    dropped = sorted(set(space.search) & typed)
    if dropped and not set(space.search) - typed:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in dropped)
        raise SinkdError(
            f"{flags} fix every setting {space.path} searches — nothing is left to search: drop one of them, or "
            "train one run with `python -m sinkd_ray.train`"
        )
    for key in dropped:
        print(f"--{key.replace('_', '-')} fixes {key} for every trial ({space.path} searched it)")
    return replace(
        space,
        search={k: v for k, v in space.search.items() if k not in typed},
        fixed={k: v for k, v in space.fixed.items() if k not in typed},
    )


def trial_settings(spec: RunSpec):
    """config → every setting of that trial's run (its searched values on the study's spec), flat, for MLflow."""

    def settings(config: dict) -> dict:
        run = spec.with_values(
            {k: v for k, v in config.items() if k in spec.train.to_dict() or k in spec.distill.to_dict()}
        )
        return {**run.train.to_dict(), **run.distill.to_dict()}

    return settings


def check_space(space: SearchSpace, spec: RunSpec) -> None:
    """Every value the space can give, combined with the base spec, passes `RunSpec`'s own checks (e.g. each
    batch size divisible by the workers): the rule lives in one place, the space is checked against it here."""
    for name, param in space.search.items():
        values = param.values if param.kind == "choice" else (param.values[0], param.values[-1])
        for value in values:
            try:
                spec.with_values({name: value})
            except SinkdError as err:
                raise SinkdError(f"{space.path}: {name}={value}: {err}") from None
    if "batch_size" in space.search and space.search["batch_size"].kind != "choice":
        raise SinkdError(f"{space.path}: batch_size must be a 'choice' list (multiples of the worker count)")


def largest(space: SearchSpace, spec: RunSpec, name: str) -> float:
    """The largest value ``name`` takes in the study (its search range or choices, else the spec's value)."""
    if name in space.search:
        return max(space.search[name].values)
    return getattr(spec.train, name, None) if hasattr(spec.train, name) else getattr(spec.distill, name)


def max_evaluations(space: SearchSpace, spec: RunSpec, train_examples: int) -> int:
    """ASHA's ``max_t``: the most evaluations (reports) any trial makes — derived from the space, since
    ``epochs`` (and with step-wise evaluation the batch size) can be searched."""
    epochs = int(largest(space, spec, "epochs"))
    if not spec.train.eval_every_steps:
        return epochs
    smallest_batch = min(space.search["batch_size"].values) if "batch_size" in space.search else spec.distill.batch_size
    steps = epochs * (train_examples // (smallest_batch * spec.train.grad_accum_steps))
    return math.ceil(steps / spec.train.eval_every_steps) + epochs  # step-wise reports plus each epoch's end


def searcher(space: SearchSpace, seed: int):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    sampler = (
        optuna.samplers.GridSampler(space.grid(), seed=seed)
        if space.sampler == "grid"
        else optuna.samplers.TPESampler(seed=seed)
    )
    return OptunaSearch(space=space.optuna_space(), metric=METRIC, mode=MODE, sampler=sampler, seed=None)


# ------------------------------------------------------------------------------------------- one trial
def trial_run(params: dict, *, setup: dict) -> None:
    """One Tune trial: the base spec plus the sampled ``params``, fitted as a Ray Train run whose name is fixed
    per trial (a resumed study resumes the trial's run from its last checkpoint). A run that failed for good
    (diverged) raises, so Tune marks this trial ERROR and the study goes on."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    layout = StorageLayout(setup["root"])
    spec = RunSpec.from_dict(setup["spec"]).with_values(params)
    prepared = PreparedRun(spec, layout, setup["teacher_logits"], start_timeout_s=setup["start_timeout_s"])
    trial_id = ray.tune.get_context().get_trial_id()
    trainer = build_trainer(
        prepared,
        storage_path=layout.trials_root(setup["study"]),
        name=layout.trial_run_name(trial_id),
        callbacks=[TuneReportCallback()],
    )
    fit(trainer, layout.trial_run_dir(setup["study"], trial_id), prepared.start_timeout_s)


# ------------------------------------------------------------------------------------------- the study
@dataclass
class Outcome:
    results: object  # ray.tune.ResultGrid
    interrupted: bool


def fit_study(
    cfg: StudyConfig,
    space: SearchSpace,
    prepared: PreparedRun,
    study: str,
    num_trials: int,
    callbacks: list,
    max_t: int,
) -> Outcome:
    """Run (or, with ``cfg.resume``, continue) the Tuner. Interrupted (Ctrl+C): Tune saves the study and returns
    normally, so the interruption is read from its signal handling (see `_interrupted`)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    layout = prepared.layout
    setup = {
        "spec": prepared.spec.to_dict(),
        "teacher_logits": prepared.teacher_logits,
        "root": layout.root,
        "study": study,
        "start_timeout_s": prepared.start_timeout_s,
    }
    trainable = tune.with_resources(tune.with_parameters(trial_run, setup=setup), TRIAL_RESOURCES)
    if cfg.resume:
        print(f"resuming study {study}")
        tuner = tune.Tuner.restore(
            layout.study_dir(study), trainable=trainable, resume_unfinished=True, resume_errored=False
        )  # an errored trial diverged: it would diverge again
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher(space, prepared.spec.train.seed),
                scheduler=ASHAScheduler(
                    metric=METRIC,
                    mode=MODE,
                    time_attr="training_iteration",
                    max_t=max_t,
                    grace_period=cfg.grace_period,
                    reduction_factor=cfg.reduction_factor,
                ),
                num_samples=num_trials,
                max_concurrent_trials=cfg.max_concurrent_trials,
            ),
            run_config=tune.RunConfig(name=study, storage_path=layout.root, callbacks=callbacks),
        )
    guard = InterruptGuard()
    with guard:
        results = tuner.fit()
    return Outcome(results, guard.fired)


def checkpoint_bytes(spec: RunSpec) -> int:
    """About one checkpoint of the student: its weights and two AdamW moments (a student cut to its first layers
    is smaller: this is the bound), plus 1 MiB of tokenizer, config and state files."""
    from sinkd_ray.models import model_bytes

    return 3 * model_bytes(spec.train.student) + 2**20


def space_needed(spec: RunSpec, concurrent: int, keep: int, teacher_base: str | None) -> int:
    """What a study writes on its storage at most at once: each running trial's kept checkpoints plus the one being
    written, a teacher fine-tuned here (its checkpoint and its export), and 16 MiB of Tune state, MLflow's store and
    the summary's artefacts."""
    from sinkd_ray.models import model_bytes

    teacher = 4 * model_bytes(teacher_base) if spec.train.teacher is None and teacher_base else 0
    return concurrent * (keep + 1) * checkpoint_bytes(spec) + teacher + 16 * 2**20


RESERVE_BYTES = 8 * 2**20  # held back on the storage while a study runs: what ending it cleanly needs


class DiskWatch:
    """While a study runs on local storage: when the free space there falls below ``low_bytes`` (about one more
    checkpoint), stop the study the way Ctrl+C does — instead of letting every checkpoint fail, be retried and fill
    the log with tracebacks. A reserve file of ``RESERVE_BYTES`` is held on the storage meanwhile and given back
    first, so that Tune's state and MLflow's store (a SQLite file there too) can still be written when it stops.
    ``tripped`` says it happened."""

    def __init__(self, layout: StorageLayout, low_bytes: int, every_s: float = 2.0):
        self.layout, self.low_bytes, self.every_s = layout, int(low_bytes), every_s
        self.tripped, self.free = False, None
        self._stop = None
        self.reserve = None if layout.remote else Path(layout.root) / ".sinkd-reserve"

    def _release(self) -> None:
        if self.reserve is not None:
            self.reserve.unlink(missing_ok=True)

    def __enter__(self):
        import os
        import threading

        from sinkd_ray.storage import free_bytes

        if self.reserve is None:
            return self
        with self.reserve.open("wb") as out:
            os.posix_fallocate(out.fileno(), 0, RESERVE_BYTES)
        self._stop = threading.Event()

        def watch() -> None:
            while not self._stop.wait(self.every_s):
                self.free = free_bytes(self.layout.root)
                if self.free < self.low_bytes:
                    self.tripped = True
                    self._release()
                    os.kill(os.getpid(), signal.SIGINT)  # Tune's own graceful stop
                    return

        threading.Thread(target=watch, name="sinkd-disk-watch", daemon=True).start()
        return self

    def __exit__(self, *exc):
        if self._stop is not None:
            self._stop.set()
        self._release()
        return False


class InterruptGuard:
    """Whether Tune's SIGINT handler fired during ``fit``. Tune installs its own handler at the start of a run
    and, when it fires, puts back the one it found and returns normally — so a sentinel handler installed here
    is back in place exactly when the run was interrupted. (Tune's ResultGrid reports an interrupted trial as
    TERMINATED, like a finished one, so the results cannot tell.)"""

    def __enter__(self):
        def sentinel(signum, frame):  # a second Ctrl+C after Tune's handler fired
            raise KeyboardInterrupt

        self.sentinel, self.previous, self.fired = sentinel, signal.getsignal(signal.SIGINT), False
        signal.signal(signal.SIGINT, sentinel)
        return self

    def __exit__(self, *exc):
        self.fired = signal.getsignal(signal.SIGINT) is self.sentinel
        signal.signal(signal.SIGINT, self.previous)
        return False


def finished_trials(study_dir: str) -> dict[str, str]:
    """trial id → status as the study's saved state has it (what a resume will see)."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(study_dir)
    return {t.trial_id: t.status for t in analysis.trials}


def best_trial(board):
    """The leaderboard sorted best first: highest dev metric; ties (e.g. every trial at MCC 0) go to the lower
    training loss at that evaluation, then to the earlier trial id — a stated, repeatable choice."""
    keys = [METRIC] + (["train_total"] if "train_total" in board.columns else []) + ["trial_id"]
    ascending = [False] + ([True] if "train_total" in board.columns else []) + [True]
    return board.sort_values(keys, ascending=ascending, na_position="last")


def leaderboard(results):
    """Each finished trial's best evaluation (errored trials, e.g. diverged ones, are left out)."""
    board = results.get_dataframe(filter_metric=METRIC, filter_mode=MODE)
    errored = {r.metrics.get("trial_id") for r in results if r.error is not None and r.metrics}
    board = board[~board["trial_id"].isin(errored) & board[METRIC].notna()]
    keep = ["trial_id", METRIC, "train_total", "training_iteration", "epoch"] + [
        c for c in board.columns if c.startswith("config/")
    ]
    return best_trial(board[[c for c in keep if c in board.columns]])


def trial_error(error: BaseException) -> str:
    """The reason a trial failed, in one line: a SinkdError's own message (e.g. "… diverged: lower the learning
    rate"), else the most specific line of the worker error."""
    from sinkd_ray.driver import first_error_line

    lines = [line for line in str(error).splitlines() if "SinkdError: " in line]
    return lines[-1].split("SinkdError: ", 1)[1][:300] if lines else first_error_line(error)


def stopped_early(results, spec: RunSpec) -> int | None:
    """Trials ASHA stopped: fewer evaluations than their own epochs (each trial's epochs may be searched)."""
    if spec.train.eval_every_steps:
        return None
    count = 0
    for r in results:
        if r.error is None and r.metrics:
            epochs = (r.config or {}).get("epochs", spec.train.epochs)
            count += r.metrics.get("training_iteration", 0) < epochs
    return count


def sweep_partial_checkpoints(layout: StorageLayout, study: str) -> int:
    """Remove checkpoint folders that Ray Train never registered (a copy cut short by an interrupt): they cannot
    be read, and nothing refers to them. Local storage only. Returns how many were removed."""
    import shutil

    if layout.remote:
        return 0
    removed = 0
    for run_dir in Path(layout.trials_root(study)).glob("trial_*"):
        try:
            from ray.train import Result

            known = {Path(c.path).name for c, _ in Result.from_path(str(run_dir)).best_checkpoints}
        except Exception:  # a run that never registered any checkpoint: nothing it wrote is usable
            known = set()
        for folder in run_dir.glob("checkpoint_*"):
            if folder.is_dir() and folder.name not in known:
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
    return removed
