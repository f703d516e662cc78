"""`python -m sinkd_ray.tune --task cola`: a SinKD hyper-parameter study, from teacher to registered student.

1. Validate everything the user gave (task, search-space file, ranges) before starting anything.
2. Teacher: use ``--teacher`` as is, or fine-tune ``--teacher-base`` once (cached under the storage path).
3. Teacher logits: computed once per study and shared by every trial (teacher_cache).
4. Ray Tune: Optuna (TPE, seeded; or a grid) proposes {lr, α, β, b, τ_KL, τ_SD, λ, …}; ASHA stops weak
   trials early; each trial fits a Ray Train ``TorchTrainer`` (the Train V2 pattern: a Tune function per
   trial, metrics forwarded by ``TuneReportCallback``).
5. MLflow: a parent run for the study, a nested child run per trial; at the end the best student is logged
   and registered as ``sinkd-<task>-student`` (alias ``best``), with a leaderboard and Optuna plots.
``--resume`` continues an interrupted study: finished trials stay, unfinished ones continue from their
last checkpoint, and no MLflow run is duplicated.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from sinkd_ray.cli import add_config_args, config_from_args, explicit_dests, run_cli
from sinkd_ray.config import DistillConfig, TrainConfig, is_remote
from sinkd_ray.errors import SinkdError
from sinkd_ray.search_space import SearchSpace, load_search_space
from sinkd_ray.tasks import get_task

METRIC, MODE = "dev_metric", "max"


@dataclass
class StudyConfig:
    """The study around the runs: search, scheduling, storage and tracking."""

    search_space: str = field(default="default", metadata={"help": "search-space YAML: a path or a name in search_spaces/ (default, paper_grid)"})
    num_trials: int | None = field(default=None, metadata={"help": "trials to run (default: 8 for TPE, the whole grid for a grid)", "metavar": "N"})
    max_concurrent_trials: int = field(default=1, metadata={"help": "trials running at the same time"})
    grace_period: int = field(default=1, metadata={"help": "ASHA: evaluations every trial gets before it may be stopped"})
    reduction_factor: int = field(default=2, metadata={"help": "ASHA: keep the best 1/factor of trials at each rung"})
    teacher_base: str = field(default="google-bert/bert-base-uncased", metadata={"help": "with no --teacher: the pretrained model fine-tuned (once, cached) as the teacher", "metavar": "PATH"})
    teacher_epochs: int = field(default=3, metadata={"help": "epochs of the teacher's CE fine-tuning"})
    teacher_lr: float = field(default=3e-5, metadata={"help": "learning rate of the teacher's CE fine-tuning"})
    storage_path: str = field(default="./sinkd_runs", metadata={"help": "studies, checkpoints, teachers and caches (local dir or s3:// / gs://)", "metavar": "DIR"})
    tracking_uri: str | None = field(default=None, metadata={"help": "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<storage>/mlflow.db)", "metavar": "URI"})
    experiment_name: str | None = field(default=None, metadata={"help": "MLflow experiment (default: sinkd-<task>)"})
    name: str | None = field(default=None, metadata={"help": "study name (default: <task>-<time>; with --resume: the latest study of the task)"})
    resume: bool = field(default=False, metadata={"help": "continue an interrupted study instead of starting one"})
    register: bool = field(default=True, metadata={"help": "register the best student in the MLflow Model Registry"})

    def __post_init__(self) -> None:
        for name, low in (("max_concurrent_trials", 1), ("grace_period", 1), ("reduction_factor", 2),
                          ("teacher_epochs", 1)):
            if getattr(self, name) < low:
                raise SinkdError(f"{name}={getattr(self, name)} must be ≥ {low}")
        if self.num_trials is not None and self.num_trials < 1:
            raise SinkdError(f"num_trials={self.num_trials} must be ≥ 1")
        if self.teacher_lr <= 0:
            raise SinkdError(f"teacher_lr={self.teacher_lr} must be > 0")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sinkd_ray.tune",
        description="Search SinKD hyper-parameters with Ray Tune (Optuna + ASHA) and register the best student "
                    "in MLflow. Every flag has a working default: `--task cola` alone runs on a local Ray "
                    "runtime with MLflow in a SQLite file under --storage-path.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_args(parser, StudyConfig, group="study")
    add_config_args(parser, TrainConfig, group="runs (every trial)")
    # The paper's setting: BERT-base teacher, a 6-layer BERT student (its first 6 layers).
    parser.set_defaults(student="google-bert/bert-base-uncased", student_layers=6)
    return parser


def _storage(path: str) -> str:
    return path if is_remote(path) else str(Path(path).expanduser().resolve())


def _latest_study(storage: str, task: str) -> str | None:
    if is_remote(storage):
        return None  # not listed on remote storage: --resume needs --name there
    studies = sorted(Path(storage).glob(f"{task}-*/tuner.pkl"), key=lambda p: p.stat().st_mtime)
    return studies[-1].parent.name if studies else None


def run_trial(params: dict, *, setup: dict) -> None:
    """One Tune trial: build the configs from the sampled ``params`` and fit a Ray Train run."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from sinkd_ray.train import build_trainer

    distill_keys = {f.name for f in dataclasses.fields(DistillConfig)}
    dcfg = DistillConfig.from_dict({**setup["distill"], **{k: v for k, v in params.items() if k in distill_keys}})
    tcfg = TrainConfig(**{**setup["train"], **{k: v for k, v in params.items() if k not in distill_keys}})
    trial_id = ray.tune.get_context().get_trial_id()
    # A fixed name per trial: when a resumed study restarts this trial, Ray Train resumes its last checkpoint.
    build_trainer(tcfg, dcfg, storage_path=setup["train_storage"], name=f"trial_{trial_id}",
                  teacher_cache=setup["teacher_cache"], callbacks=[TuneReportCallback()]).fit()


def _searcher(space: SearchSpace, seed: int):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    if space.sampler == "grid":
        sampler = optuna.samplers.GridSampler(space.grid(), seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed)
    return OptunaSearch(space=space.optuna_space(), metric=METRIC, mode=MODE, sampler=sampler, seed=None)


def main(argv: list[str] | None = None) -> int:
    # mlflow.set_tracking_uri (called by Tune's MLflow callback) exports MLFLOW_TRACKING_URI into os.environ;
    # put it back so a later study in the same process (or its subprocesses) is not sent to this one's store.
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def _main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    study_cfg = config_from_args(StudyConfig, args)
    tcfg = config_from_args(TrainConfig, args)
    task = get_task(tcfg.task)
    space = load_search_space(study_cfg.search_space, task.name)
    distill_fixed, train_fixed = space.split({})
    # A flag typed on the command line wins over the file's fixed value for the same key.
    train_fixed = {k: v for k, v in train_fixed.items() if k not in explicit_dests(parser, argv)}
    dcfg = DistillConfig.from_dict(distill_fixed)
    tcfg = replace(tcfg, **train_fixed, task=task.name)
    batch_sizes = space.search["batch_size"].values if "batch_size" in space.search else (dcfg.batch_size,)
    if space.search.get("batch_size") and space.search["batch_size"].kind != "choice":
        raise SinkdError(f"{space.path}: batch_size must be a 'choice' list (multiples of the worker count)")
    bad = [b for b in batch_sizes if b % tcfg.workers]
    if bad:
        raise SinkdError(f"batch_size {bad} not divisible by workers={tcfg.workers} — the Sinkhorn batch b is "
                         f"split evenly across workers")
    from sinkd_ray.train import preflight

    tcfg = preflight(tcfg)  # models and data exist, local paths made absolute: before anything starts
    if tcfg.teacher is None:
        from sinkd_ray.models import load_config

        load_config(study_cfg.teacher_base)
    num_trials = study_cfg.num_trials or (space.grid_size() if space.sampler == "grid" else 8)

    storage = _storage(study_cfg.storage_path)
    if is_remote(storage) and not (study_cfg.tracking_uri or _env("MLFLOW_TRACKING_URI")):
        raise SinkdError("a remote --storage-path needs --tracking-uri (e.g. the cluster's MLflow server)")
    if not is_remote(storage):
        Path(storage).mkdir(parents=True, exist_ok=True)

    import ray
    import ray.train
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    study = study_cfg.name
    if study_cfg.resume:
        study = study or _latest_study(storage, task.name)
        if study is None or not tune.Tuner.can_restore(f"{storage}/{study}"):
            raise SinkdError(f"no study {'named ' + study if study else 'of ' + task.name} to resume under "
                             f"{storage} — run without --resume to start one"
                             + (" (on remote storage, name it: --resume --name <study>)" if not study else ""))
    else:
        study = study or f"{task.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if not is_remote(storage) and Path(storage, study, "tuner.pkl").exists():
            raise SinkdError(f"study '{study}' already exists under {storage} — add --resume to continue it, "
                             f"or choose another --name")

    # Teacher and its logits: once per study, before any trial starts.
    from sinkd_ray.train import (export_best_student, finetune_teacher, local_work_dir, prepare_teacher_cache,
                                 ship_teacher_cache)

    work = local_work_dir(storage)  # teachers, logit caches, exported students: the driver's disk

    if tcfg.teacher is None:
        teacher_cfg = replace(tcfg, epochs=study_cfg.teacher_epochs, lr=study_cfg.teacher_lr, workers=1)
        tcfg = replace(tcfg, teacher=str(finetune_teacher(study_cfg.teacher_base, teacher_cfg, storage=storage)))
    teacher_cache = prepare_teacher_cache(tcfg, work / "teacher_cache")

    # MLflow: the study's parent run (reused on resume).
    from mlflow.tracking import MlflowClient

    from sinkd_ray import tracking

    tracking_uri = study_cfg.tracking_uri or _env("MLFLOW_TRACKING_URI") or \
        tracking.default_tracking_uri(Path(storage))
    experiment = study_cfg.experiment_name or f"sinkd-{task.name}"
    client = MlflowClient(tracking_uri)
    artifacts = None if is_remote(storage) else Path(storage, "mlartifacts").as_uri()
    experiment_id = tracking.ensure_experiment(client, experiment, artifacts)
    tags = {"task": task.name, "teacher": tcfg.teacher, "student": f"{tcfg.student}" + (
        f" (first {tcfg.student_layers} layers)" if tcfg.student_layers else ""),
        "search_space": space.path, "code_version": tracking.code_version()}
    parent_id = tracking.parent_run(client, experiment_id, study, tags)
    for k, v in {**distill_fixed, **train_fixed, "num_trials": num_trials, "sampler": space.sampler}.items():
        client.log_param(parent_id, k, v)
    callback = tracking.TrialRunsCallback(tracking_uri, experiment, parent_id, tags)

    ray.init(ignore_reinit_error=True)
    setup = {"train": dataclasses.asdict(tcfg), "distill": dcfg.to_dict(),
             "teacher_cache": ship_teacher_cache(teacher_cache, storage), "train_storage": f"{storage}/{study}-train"}
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"cpu": 0.01})
    t0 = time.time()
    if study_cfg.resume:
        print(f"resuming study {study}")
        tuner = tune.Tuner.restore(f"{storage}/{study}", trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        max_t = tcfg.epochs if tcfg.eval_every_steps == 0 else 10_000
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=_searcher(space, tcfg.seed),
                scheduler=ASHAScheduler(metric=METRIC, mode=MODE, time_attr="training_iteration", max_t=max_t,
                                        grace_period=study_cfg.grace_period,
                                        reduction_factor=study_cfg.reduction_factor),
                num_samples=num_trials, max_concurrent_trials=study_cfg.max_concurrent_trials),
            run_config=tune.RunConfig(name=study, storage_path=storage, callbacks=[callback]),
        )
    try:
        results = tuner.fit()
    except KeyboardInterrupt:
        client.set_terminated(parent_id, status="KILLED")
        raise
    elapsed = time.time() - t0
    # Tune returns normally after Ctrl+C (state saved): an unfinished study must not be summarised/registered.
    if results.num_terminated + results.num_errors < max(len(results), num_trials):
        client.set_terminated(parent_id, status="KILLED")
        print(f"\nstudy {study} interrupted: {results.num_terminated} of {num_trials} trials finished; "
              f"continue it with the same command plus --resume --name {study}", file=sys.stderr)
        return 130
    finished = [r for r in results if r.error is None and r.metrics and METRIC in r.metrics]
    if not finished:
        client.set_terminated(parent_id, status="FAILED")
        errors = "; ".join(str(r.error).splitlines()[0] for r in results if r.error)[:500]
        raise SinkdError(f"no trial finished an evaluation ({errors or 'see the log above'})")

    # Leaderboard: each trial's best evaluation.
    board = results.get_dataframe(filter_metric=METRIC, filter_mode=MODE).sort_values(METRIC, ascending=False)
    keep = ["trial_id", METRIC, "training_iteration", "epoch"] + [c for c in board.columns if c.startswith("config/")]
    board = board[[c for c in keep if c in board.columns]]
    best_id = board.iloc[0]["trial_id"]
    best_row = board.iloc[0]
    # The best trial's best kept checkpoint (Tune's own checkpoint is empty under Train V2), downloaded if remote.
    student_dir = work / study / "best_student"
    if student_dir.exists():
        shutil.rmtree(student_dir)  # this study's own export from an earlier (interrupted) finish
    export_best_student(ray.train.Result.from_path(f"{setup['train_storage']}/trial_{best_id}"), student_dir)

    runs = tracking.trial_run_ids(client, experiment_id, parent_id)
    tracking.log_study_summary(client, parent_id, board, space.optuna_space(), METRIC, work / study / "summary")
    model_name = f"sinkd-{task.name}-student"
    version = tracking.register_student(client, model_name, runs[best_id], student_dir) if study_cfg.register \
        else None
    client.log_metric(parent_id, f"best_{METRIC}", float(best_row[METRIC]))
    client.set_tag(parent_id, "best_trial_id", best_id)
    client.set_terminated(parent_id, status="FINISHED")

    last_iteration = [r.metrics.get("training_iteration", 0) for r in results if r.metrics]
    stopped = sum(i < tcfg.epochs for i in last_iteration) if tcfg.eval_every_steps == 0 else None
    params = {c[len("config/"):]: best_row[c] for c in board.columns if c.startswith("config/")}
    print(f"\nstudy {study}: {len(board)} trials in {elapsed / 60:.1f} min"
          + (f", {stopped} stopped early by ASHA" if stopped is not None else ""))
    print(f"best trial {best_id}: dev {task.metric} = {best_row[METRIC]:.4f}")
    print("best hyper-parameters: " + json.dumps({k: _plain(v) for k, v in params.items()}))
    print(f"best student: {student_dir}")
    if version:
        print(f"registered model: {model_name} version {version} (alias 'best')")
    if tracking_uri.startswith("sqlite:///"):
        print(f"browse it: mlflow ui --backend-store-uri {tracking_uri}")
    else:
        print(f"browse it: open {tracking_uri} (experiment {experiment})")
    return 0


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


if __name__ == "__main__":
    run_cli(main)
