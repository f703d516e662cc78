"""`python -m sinkd_ray.train`: one SinKD distillation run on Ray Train, or (``--stage teacher``) the CE
fine-tuning of a teacher. Parsing only; the run itself is `driver.prepare_run` → `driver.fit_run` →
`driver.export_best`, the same path `python -m sinkd_ray.tune` takes for every trial."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from sinkd_ray.cli import add_config_args, config_from_args, parse_args, run_cli
from sinkd_ray.config import DistillConfig, RunSpec, RuntimeConfig, TrainConfig
from sinkd_ray.driver import PrintProgress, export_best, finetune_teacher, fit_run, prepare_run
from sinkd_ray.errors import SinkdError
from sinkd_ray.storage import StorageLayout
from sinkd_ray.tasks import get_task


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sinkd_ray.train",
        description="One SinKD distillation run (or, with --stage teacher, CE fine-tuning of a teacher) on Ray "
        "Train with FSDP workers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--stage",
        choices=("student", "teacher"),
        default="student",
        help="'teacher': fine-tune --model with CE only; 'student': distil --teacher into --student",
    )
    parser.add_argument("--model", metavar="PATH", help="with --stage teacher: the pretrained model to fine-tune")
    parser.add_argument(
        "--output-dir",
        metavar="DIR",
        help="where the best model is exported (save_pretrained + dev_metrics.json); "
        "default <storage-path>/<name>-best",
    )
    parser.add_argument("--name", help="run name (an existing name resumes that run); default: task-stage-time")
    add_config_args(parser, RuntimeConfig, group="runtime")
    add_config_args(parser, TrainConfig, group="training")
    add_config_args(parser, DistillConfig, group="objective")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    runtime = config_from_args(RuntimeConfig, args)
    task = get_task(args.task)  # fail fast on an unknown task
    layout = StorageLayout.at(runtime.storage_path)
    output = Path(args.output_dir) if args.output_dir else None
    if args.stage == "teacher":
        if not args.model:
            raise SinkdError("--stage teacher needs --model <pretrained model dir, hub id or offline:<name>>")
        train = config_from_args(TrainConfig, args, student=args.model, student_layers=None, teacher=None)
        batch = config_from_args(DistillConfig, args).batch_size
        finetune_teacher(args.model, train, layout, runtime, output_dir=output, batch_size=batch)
        return 0
    spec = RunSpec(config_from_args(TrainConfig, args), config_from_args(DistillConfig, args))
    name = args.name or f"{task.name}-student-{time.strftime('%Y%m%d-%H%M%S')}"
    t0 = time.time()
    prepared = prepare_run(spec, layout, runtime)
    best = export_best(fit_run(prepared, name, callbacks=[PrintProgress()]), output or layout.run_export_dir(name))
    print(
        f"done in {time.time() - t0:.0f}s: best dev {task.metric}={best['dev_metric']:.4f} at step "
        f"{best['step']}; student saved to {output or layout.run_export_dir(name)}"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
