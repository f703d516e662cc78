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
from pathlib import Path

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
    add_config_args(
        parser,
        DistillConfig,
        group="objective (a flag typed here fixes that setting for every trial, also where the search space "
        "searches or fixes it)",
    )
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


def _read_command_line(argv: list[str]):
    """The study's settings, runtime, task, search space (less what a flag fixes) and base run, all checked."""
    parser = build_parser()
    args = parse_args(parser, argv)
    cfg, runtime = config_from_args(StudyConfig, args), config_from_args(RuntimeConfig, args)
    task = get_task(args.task)
    typed = explicit_dests(parser, argv)
    space = study.without_typed(load_search_space(cfg.search_space, task.name), typed)
    spec = study.base_spec(
        space, RunSpec(config_from_args(TrainConfig, args), config_from_args(DistillConfig, args)), typed
    )
    study.check_space(space, spec)
    return cfg, runtime, task, space, spec


def _teacher_train(spec: RunSpec, cfg: StudyConfig) -> TrainConfig:
    """How a --teacher-base is fine-tuned: the study's run settings with the teacher's epochs, lr and examples."""
    return replace(
        spec.train,
        epochs=cfg.teacher_epochs,
        lr=cfg.teacher_lr,
        workers=1,
        max_train_examples=cfg.teacher_max_train_examples or spec.train.max_train_examples,
    )


def _main(argv: list[str]) -> int:
    cfg, runtime, task, space, spec = _read_command_line(argv)
    layout = StorageLayout.at(runtime.storage_path)
    name = _study_name(cfg, layout, task.name)
    lock = layout.lock_study(name)  # noqa: F841 - held until this process ends
    tracking_uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or layout.default_tracking_uri()
    if tracking_uri is None:
        raise SinkdError("a remote --storage-path needs --tracking-uri (e.g. the cluster's MLflow server)")
    tracking.check_tracking_uri(tracking_uri)
    num_trials = cfg.num_trials or (space.grid_size() if space.sampler == "grid" else 8)
    _check_free_space(layout, spec, cfg)

    prepared = prepare_run(
        spec,
        layout,
        runtime,
        teacher_base=cfg.teacher_base,
        teacher_train=_teacher_train(spec, cfg),
        teacher_batch_size=cfg.teacher_batch_size,
        max_batch_size=int(study.largest(space, spec, "batch_size")),
        trial_cpu=study.TRIAL_CPU,
    )
    runs = tracking.StudyRuns.open(
        tracking_uri,
        cfg.experiment_name or f"sinkd-{task.name}",
        name,
        layout.artifact_location(tracking_uri),
        _tags(prepared.spec, space),
    )
    if cfg.resume:
        _check_same_space(runs, space, name)
    else:
        runs.log_params(
            {**space.fixed, "num_trials": num_trials, "sampler": space.sampler, "search_space_digest": space.digest()}
        )
    max_t = study.max_evaluations(space, prepared.spec, _train_examples(prepared.spec))
    t0 = time.time()
    settings = study.trial_settings(prepared.spec)
    with study.DiskWatch(layout, low_bytes=study.checkpoint_bytes(prepared.local_spec) + 2**20) as disk:
        outcome = study.fit_study(cfg, space, prepared, name, num_trials, [runs.callback(settings)], max_t)
    if disk.tripped:
        return _disk_full(runs, layout, name, disk.free)
    if outcome.interrupted:
        return _interrupted(runs, layout, name)
    try:
        return _summarise(outcome.results, runs, prepared, cfg, space, name, time.time() - t0)
    except BaseException:  # nothing is left RUNNING: the trials ended; the parent says the summary failed
        runs.finish("FAILED")
        raise


def _check_same_space(runs, space, name: str) -> None:
    """A resumed study searches what it started with: Tune restores its own searcher, so a changed file (or a flag
    that now fixes a searched key) would be silently ignored for the trials still to come."""
    started = runs.client.get_run(runs.parent_id).data.params.get("search_space_digest")
    if started is not None and started != space.digest():
        runs.finish("KILLED")  # opening it for the resume set it RUNNING: back to the interrupted study it was
        raise SinkdError(
            f"the search space is not the one study {name} started with ({space.path} or the flags fixing its keys "
            "changed) — resume with the original file and flags, or start a new study with another --name"
        )


def _check_free_space(layout: StorageLayout, spec: RunSpec, cfg: StudyConfig) -> None:
    """Refuse at once a local storage that cannot hold what the study writes at its peak (`study.space_needed`)."""
    from sinkd_ray.storage import free_bytes, mib

    if layout.remote:
        return
    concurrent = min(cfg.max_concurrent_trials, cfg.num_trials or cfg.max_concurrent_trials)
    need, free = (
        study.space_needed(spec, concurrent, spec.train.checkpoints_to_keep, cfg.teacher_base),
        free_bytes(layout.root),
    )
    if free < need:
        raise SinkdError(
            f"--storage-path {layout.root} has {mib(free)} free, and this study writes up to about {mib(need)} "
            f"({concurrent} trial(s) × {spec.train.checkpoints_to_keep + 1} student checkpoints, the teacher's, "
            "MLflow's store) — free space or choose another --storage-path"
        )


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


def _disk_full(runs, layout: StorageLayout, name: str, free: int) -> int:
    """The storage filled up mid-study: Tune saved the study; every open run ends FAILED, copies cut short are
    removed, and the one line says how to continue once space is freed."""
    from sinkd_ray.storage import mib

    removed = study.sweep_partial_checkpoints(layout, name)  # first: it gives space back
    statuses = study.finished_trials(layout.study_dir(name))
    try:
        runs.end_unfinished({t for t, s in statuses.items() if s in ("TERMINATED", "ERROR")}, status="FAILED")
        unended = ""
    except Exception:  # the store is on the full disk too: its runs read RUNNING until --resume takes them up
        unended = ", its MLflow runs could not be marked FAILED (the store is on that disk)"
    finished = sum(s == "TERMINATED" for s in statuses.values())
    raise SinkdError(
        f"the storage {layout.root} is full ({mib(free)} free): study {name} stopped with {finished} trial(s) "
        f"finished, nothing registered{f', {removed} partial checkpoint copies removed' if removed else ''}"
        f"{unended} — free space, then continue it with the same command plus --resume --name {name}"
    )


def _summarise(results, runs, prepared, cfg: StudyConfig, space, name: str, elapsed: float) -> int:
    """The best trial's student exported; the teacher and the CE-only student as nested runs and the table's figures
    as metrics of the parent; the student registered as an MLflow model with its model card; a short report."""
    import ray.train

    layout, spec = prepared.layout, prepared.spec
    task = get_task(spec.train.task)
    board = study.leaderboard(results)
    errors = [study.trial_error(r.error) for r in results if r.error is not None]
    if board.empty:
        runs.finish("FAILED")
        raise SinkdError(f"no trial finished an evaluation ({'; '.join(errors)[:500] or 'see the log above'})")
    best = board.iloc[0]
    best_id, best_metric = best["trial_id"], float(best[study.METRIC])
    student_dir = layout.study_export_dir(name)
    print(f"\nexporting the best trial's student ({best_id}) to {student_dir}", flush=True)
    export_best(ray.train.Result.from_path(layout.trial_run_dir(name, best_id)), student_dir)
    runs.log_summary(board, study.METRIC, layout.study_summary_dir(name), space.optuna_space())
    params = {c[len("config/") :]: _plain(best[c]) for c in board.columns if c.startswith("config/")}

    stopped = study.stopped_early(results, spec)
    print(
        f"\nstudy {name}: {len(board)} trials in {elapsed / 60:.1f} min"
        + (f", {stopped} stopped early by ASHA" if stopped is not None else "")
        + (f", {len(errors)} failed ({errors[0]})" if errors else "")
    )
    print(f"best trial {best_id}: dev {task.metric} = {best_metric:.4f}")
    print("best hyper-parameters: " + json.dumps(params))
    print(f"best student: {student_dir}")

    from sinkd_ray.driver import teacher_dev_score

    teacher = teacher_dev_score(prepared)
    runs.nested_run("teacher", _teacher_params(prepared, cfg), {"dev_metric": teacher})
    baseline = _ce_baseline(prepared, params, name, runs) if cfg.ce_baseline else None
    figures = _figures(teacher, best_metric, baseline)
    runs.log_metrics(figures)
    model_name = f"sinkd-{task.name}-student"
    version = None
    if cfg.register:
        card = model_card(task, prepared, name, best_id, params, figures)
        tags = model_tags(task, prepared, name, best_id, params, best_metric)
        version = runs.register(model_name, best_id, _log_model(student_dir, task, prepared, card), tags, card)
        print(f"registered model: {model_name} version {version} (alias 'best')")
    runs.finish("FINISHED", best_id=best_id, best_metric=best_metric)
    _outcome_table(task.metric, figures)
    print(runs.browse_hint(model_name if version else None))
    return 0


def _figures(teacher: float, best: float, baseline: float | None) -> dict[str, float]:
    """The table's numbers, as the parent run's metrics: teacher, best student, CE-only, the share of the gap closed."""
    figures = {"teacher_dev_metric": teacher, "best_dev_metric": best}
    if baseline is not None:
        figures["ce_baseline_dev_metric"] = baseline
        if teacher > baseline:
            figures["gap_closed"] = (best - baseline) / (teacher - baseline)
    return figures


def _teacher_params(prepared, cfg: StudyConfig) -> dict:
    tcfg = prepared.local_spec.train
    params = {
        "teacher": tcfg.teacher,
        "task": tcfg.task,
        "max_length": tcfg.max_length,
        "logit_space": tcfg.logit_space,
    }
    if Path(tcfg.teacher).parent == prepared.layout.work_dir / "teachers":  # fine-tuned here from --teacher-base
        params.update(
            teacher_base=cfg.teacher_base,
            teacher_epochs=cfg.teacher_epochs,
            teacher_lr=cfg.teacher_lr,
            teacher_batch_size=cfg.teacher_batch_size,
        )
    return params


def _objective(distill: DistillConfig, params: dict) -> str:
    d = distill.to_dict() | params
    term = "none" if not distill.distribution_on else f"{d['distribution_term']} ({d['sinkhorn_variant']})"
    weight = f"share ρ {d['sd_share']:g}" if d["sd_weighting"] == "share" else f"β {d['beta']:g}"
    return f"(1−α)·CE + α·KL + {weight}·{term}, α {d['alpha']:g}, τ_KL {d['tau_kl']:g}, b {d['batch_size']}"


def model_tags(task, prepared, study_name: str, trial_id: str, params: dict, metric: float) -> dict:
    """What a user filters the registry on."""
    tcfg = prepared.local_spec.train
    return {
        "task": task.name,
        "teacher": tcfg.teacher,
        "student": f"{tcfg.student}" + (f" (first {tcfg.student_layers} layers)" if tcfg.student_layers else ""),
        "objective": _objective(prepared.spec.distill, params),
        f"dev_{task.metric}": f"{metric:.4f}",
        "study": study_name,
        "trial": trial_id,
    }


def model_card(task, prepared, study_name: str, trial_id: str, params: dict, figures: dict) -> str:
    """The model version's description: what the student is and the study's table."""
    tags = model_tags(task, prepared, study_name, trial_id, params, figures["best_dev_metric"])
    rows = [("teacher", "teacher_dev_metric"), (f"this student (trial {trial_id})", "best_dev_metric")]
    rows += [("CE-only student, same settings", "ce_baseline_dev_metric")]
    table = "\n".join(f"| {label} | {figures[key]:.4f} |" for label, key in rows if key in figures)
    gap = ""
    if "gap_closed" in figures:
        gap = f"\n\nGap closed: {100 * figures['gap_closed']:.0f} % ((student − CE-only) / (teacher − CE-only))."
    return (
        f"SinKD-distilled student for {task.name}, study {study_name}.\n\n"
        f"Student: {tags['student']}. Teacher: {tags['teacher']}.\nObjective: {tags['objective']}.\n"
        f"Best hyper-parameters: {json.dumps(params)}.\n\n| | dev {task.metric} |\n|---|---|\n{table}{gap}"
    )


def _log_model(student_dir, task, prepared, card: str):
    """What the registry calls inside the best trial's run: log the student as an MLflow model."""
    from sinkd_ray.data import load_split
    from sinkd_ray.serving import log_student

    def log() -> str:
        dev = load_split(task, "dev", prepared.local_spec.train.data_dir)
        rows = [dev[i] for i in range(min(2, len(dev)))]
        fields = task.text_fields
        examples = [r[fields[0]] if len(fields) == 1 else {f: r[f] for f in fields} for r in rows]
        return log_student(student_dir, task, examples, card)

    return log


def ce_baseline_spec(spec: RunSpec, params: dict) -> RunSpec:
    """The study's spec (its fixed values included) with the best trial's ``params``, CE only and no teacher: a
    teacher left in the spec would still run at every step (no cached logits are handed over) for nothing."""
    spec = spec.with_values({**params, "alpha": 0.0, "beta": 0.0, "gamma": 0.0, "online_teacher": False})
    return RunSpec(replace(spec.train, teacher=None), spec.distill)


def _ce_baseline(prepared, params: dict, name: str, runs) -> float:
    """One CE-only student (α = β = γ = 0) with the best trial's other settings: what the student reaches without
    the teacher, at the same budget. A nested run of the study (its settings and best evaluation)."""
    from sinkd_ray.checkpoints import METRICS_FILE, load_json
    from sinkd_ray.driver import PrintProgress, best_checkpoint_dir, fit_run

    spec = ce_baseline_spec(prepared.spec, params)
    print("\nCE-only baseline: the best trial's settings without the teacher (α = β = γ = 0)")
    baseline = replace(prepared, spec=spec, teacher_logits=None, driver_spec=None)
    result = fit_run(baseline, f"{name}-ce-baseline", callbacks=[PrintProgress()])
    metrics = load_json(best_checkpoint_dir(result) / METRICS_FILE)
    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    runs.nested_run("ce-baseline", study.trial_settings(spec)({}), numeric)
    return float(metrics["dev_metric"])


def _outcome_table(metric: str, figures: dict) -> None:
    """Teacher, best student, CE-only student and the share of the gap closed, in a few lines."""
    rows = [("teacher", "teacher_dev_metric"), ("best student", "best_dev_metric")]
    rows += [("CE-only student", "ce_baseline_dev_metric")]
    print(f"\n{'':18}dev {metric}")
    for label, key in rows:
        if key in figures:
            print(f"{label:18}{figures[key]:.4f}")
    if "gap_closed" in figures:
        print(f"{'gap closed':18}{100 * figures['gap_closed']:.0f} %  ((best − CE-only) / (teacher − CE-only))")


def _plain(value):
    return value.item() if hasattr(value, "item") else value


if __name__ == "__main__":
    run_cli(main)
