"""`python -m sinkd_ray.tune --task cola`: a SinKD hyper-parameter study, from teacher to registered student.

1. Validate everything the user gave (task, search-space file, ranges, storage, tracking URI) before anything
   starts; every error is one line.
2. The shared run preparation (`driver.prepare_run`): preflight, Ray runtime and resources, the teacher
   (``--teacher`` as is, or ``--teacher-base`` fine-tuned once), its logits computed once for every trial.
3. The study (`study.fit_study`): Optuna (TPE, seeded; or a grid) proposes {lr, α, β, b, τ_KL, τ_SD, λ, …};
   ASHA stops weak trials early; each trial is a Ray Train run.
4. MLflow: a parent run for the study, a nested run per trial; at the end the best student is exported and
   registered as ``sinkd-<task>-student`` (alias ``best``), with a leaderboard and Optuna plots.

``--resume`` continues an interrupted study: finished trials stay, unfinished ones continue from their last
checkpoint, and no MLflow run or model version is duplicated. An interrupted study exits 130 and registers
nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

from sinkd_ray import study, tracking
from sinkd_ray.cli import add_config_args, config_from_args, explicit_dests, parse_args, run_cli
from sinkd_ray.config import DistillConfig, RunSpec, RuntimeConfig, StudyConfig, TrainConfig
from sinkd_ray.driver import export_best, prepare_run
from sinkd_ray.errors import SinkdError
from sinkd_ray.search_space import load_search_space
from sinkd_ray.storage import StorageLayout
from sinkd_ray.tasks import get_task


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sinkd_ray.tune",
        description="Search SinKD hyper-parameters with Ray Tune (Optuna + ASHA) and register the best student "
        "in MLflow. Every flag has a working default: `--task cola` alone runs on a local Ray "
        "runtime with MLflow in a SQLite file under --storage-path.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_args(parser, StudyConfig, group="study")
    add_config_args(parser, RuntimeConfig, group="runtime")
    add_config_args(parser, TrainConfig, group="runs (every trial)")
    # The paper's setting: BERT-base teacher, a 6-layer BERT student (its first 6 layers).
    parser.set_defaults(student="google-bert/bert-base-uncased", student_layers=6)
    return parser


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
    args = parse_args(parser, argv)
    cfg, runtime = config_from_args(StudyConfig, args), config_from_args(RuntimeConfig, args)
    task = get_task(args.task)
    space = load_search_space(cfg.search_space, task.name)
    spec = study.base_spec(
        space, RunSpec(config_from_args(TrainConfig, args), DistillConfig()), explicit_dests(parser, argv)
    )
    study.check_space(space, spec)
    layout = StorageLayout.at(runtime.storage_path)
    name = _study_name(cfg, layout, task.name)
    tracking_uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or layout.default_tracking_uri()
    if tracking_uri is None:
        raise SinkdError("a remote --storage-path needs --tracking-uri (e.g. the cluster's MLflow server)")
    tracking.check_tracking_uri(tracking_uri)
    num_trials = cfg.num_trials or (space.grid_size() if space.sampler == "grid" else 8)

    teacher_train = replace(spec.train, epochs=cfg.teacher_epochs, lr=cfg.teacher_lr, workers=1)
    prepared = prepare_run(
        spec,
        layout,
        runtime,
        teacher_base=cfg.teacher_base,
        teacher_train=teacher_train,
        max_batch_size=int(study.largest(space, spec, "batch_size")),
        trial_cpu=study.TRIAL_CPU,
    )
    runs = tracking.StudyRuns.open(
        tracking_uri,
        cfg.experiment_name or f"sinkd-{task.name}",
        name,
        layout.artifact_location(),
        _tags(prepared.spec, space),
    )
    if not cfg.resume:
        runs.log_params({**space.fixed, "num_trials": num_trials, "sampler": space.sampler})
    max_t = study.max_evaluations(space, prepared.spec, _train_examples(prepared.spec))
    t0 = time.time()
    outcome = study.fit_study(cfg, space, prepared, name, num_trials, [runs.callback()], max_t)
    if outcome.interrupted:
        return _interrupted(runs, layout, name)
    return _summarise(outcome.results, runs, prepared, cfg, space, name, time.time() - t0)


def _study_name(cfg: StudyConfig, layout: StorageLayout, task: str) -> str:
    if cfg.resume:
        name = cfg.name or layout.latest_study(task)
        if name is None or not layout.study_exists(name):
            raise SinkdError(
                f"no study {'named ' + name if name else 'of ' + task} to resume under {layout.root} — "
                "run without --resume to start one"
                + (" (on remote storage, name it: --resume --name <study>)" if not name else "")
            )
        return name
    name = cfg.name or f"{task}-{time.strftime('%Y%m%d-%H%M%S')}"
    if layout.study_exists(name):
        raise SinkdError(
            f"study '{name}' already exists under {layout.root} — add --resume to continue it, or choose another --name"
        )
    return name


def _tags(spec: RunSpec, space) -> dict:
    tcfg = spec.train
    return {
        "task": tcfg.task,
        "teacher": tcfg.teacher,
        "search_space": space.path,
        "student": f"{tcfg.student}" + (f" (first {tcfg.student_layers} layers)" if tcfg.student_layers else ""),
        "code_version": tracking.code_version(),
    }


def _train_examples(spec: RunSpec) -> int:
    from sinkd_ray.data import load_split
    from sinkd_ray.storage import localize

    n = len(load_split(spec.train.task, "train", localize(spec.train.data_dir)))
    return min(n, spec.train.max_train_examples or n)


def _interrupted(runs, layout: StorageLayout, name: str) -> int:
    """Tune saved the study; close what is open so nothing reads RUNNING, and say how to continue."""
    statuses = study.finished_trials(layout.study_dir(name))
    runs.end_unfinished({t for t, status in statuses.items() if status in ("TERMINATED", "ERROR")})
    removed = study.sweep_partial_checkpoints(layout, name)
    print(
        f"\nstudy {name} interrupted: {sum(s == 'TERMINATED' for s in statuses.values())} trial(s) finished, "
        f"nothing registered{f', {removed} unfinished checkpoint copies removed' if removed else ''}; continue it "
        f"with the same command plus --resume --name {name}",
        file=sys.stderr,
    )
    return 130


def _summarise(results, runs, prepared, cfg: StudyConfig, space, name: str, elapsed: float) -> int:
    """The best trial's student exported and registered; the leaderboard and plots logged; a short report."""
    import ray.train

    layout, spec = prepared.layout, prepared.spec
    board = study.leaderboard(results)
    errors = [study.trial_error(r.error) for r in results if r.error is not None]
    if board.empty:
        runs.finish("FAILED")
        raise SinkdError(f"no trial finished an evaluation ({'; '.join(errors)[:500] or 'see the log above'})")
    best = board.iloc[0]
    best_id = best["trial_id"]
    student_dir = layout.study_export_dir(name)
    metrics = export_best(ray.train.Result.from_path(layout.trial_run_dir(name, best_id)), student_dir)
    runs.log_summary(board, study.METRIC, layout.study_summary_dir(name), space.optuna_space())
    version = runs.register(f"sinkd-{spec.train.task}-student", best_id, student_dir) if cfg.register else None
    runs.finish("FINISHED", best_id=best_id, best_metric=float(metrics["dev_metric"]))

    stopped = study.stopped_early(results, spec)
    params = {c[len("config/") :]: _plain(best[c]) for c in board.columns if c.startswith("config/")}
    print(
        f"\nstudy {name}: {len(board)} trials in {elapsed / 60:.1f} min"
        + (f", {stopped} stopped early by ASHA" if stopped is not None else "")
        + (f", {len(errors)} failed ({errors[0]})" if errors else "")
    )
    print(f"best trial {best_id}: dev {get_task(spec.train.task).metric} = {best[study.METRIC]:.4f}")
    print("best hyper-parameters: " + json.dumps(params))
    print(f"best student: {student_dir}")
    if version:
        print(f"registered model: sinkd-{spec.train.task}-student version {version} (alias 'best')")
    baseline = _ce_baseline(prepared, params, name) if cfg.ce_baseline else None
    if baseline is not None:
        runs.log_params({"ce_baseline": True})
        runs.client.log_metric(runs.parent_id, "ce_baseline_dev_metric", baseline)
    _outcome_table(prepared, float(best[study.METRIC]), baseline)
    print(runs.browse_hint())
    return 0


def ce_baseline_spec(spec: RunSpec, params: dict) -> RunSpec:
    """The study's spec (its fixed values included) with the best trial's ``params``, CE only and no teacher: a
    teacher left in the spec would still run at every step (no cached logits are handed over) for nothing."""
    spec = spec.with_values({**params, "alpha": 0.0, "beta": 0.0, "gamma": 0.0, "online_teacher": False})
    return RunSpec(replace(spec.train, teacher=None), spec.distill)


def _ce_baseline(prepared, params: dict, name: str) -> float:
    """One CE-only student (α = β = γ = 0) with the best trial's other settings: what the student reaches without
    the teacher, at the same budget."""
    from sinkd_ray.checkpoints import METRICS_FILE, load_json
    from sinkd_ray.driver import PrintProgress, best_checkpoint_dir, fit_run

    spec = ce_baseline_spec(prepared.spec, params)
    print("\nCE-only baseline: the best trial's settings without the teacher (α = β = γ = 0)")
    baseline = replace(prepared, spec=spec, teacher_logits=None, driver_spec=None)
    result = fit_run(baseline, f"{name}-ce-baseline", callbacks=[PrintProgress()])
    return float(load_json(best_checkpoint_dir(result) / METRICS_FILE)["dev_metric"])


def _outcome_table(prepared, best: float, baseline: float | None) -> None:
    """Teacher, best student, CE-only student and the share of the gap closed, in a few lines."""
    from sinkd_ray.driver import teacher_dev_score

    metric = get_task(prepared.spec.train.task).metric
    teacher = teacher_dev_score(prepared)
    rows = [("teacher", teacher), ("best student", best)] + (
        [("CE-only student", baseline)] if baseline is not None else []
    )
    print(f"\n{'':18}dev {metric}")
    for label, value in rows:
        print(f"{label:18}{value:.4f}")
    if baseline is not None and teacher > baseline:
        print(
            f"{'gap closed':18}{100 * (best - baseline) / (teacher - baseline):.0f} %  "
            "((best − CE-only) / (teacher − CE-only))"
        )


def _plain(value):
    return value.item() if hasattr(value, "item") else value


if __name__ == "__main__":
    run_cli(main)
