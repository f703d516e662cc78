"""Reproduce the SinKD paper's ablation tables on a local GLUE copy, offline, on a CPU.

    python benchmarks/reproduce.py --task cola --data-dir ../shared/data \
        --teacher <fine-tuned teacher> (or --teacher-base <model to fine-tune>) --student <model> --seeds 3 --jobs 2

Steps: (1) the teacher and its logits come through the same preparation as `python -m sinkd_ray.train` and
`python -m sinkd_ray.tune` (`driver.prepare_run`): a base-model teacher (--teacher-base, or an encoder --teacher
without the task's head) is fine-tuned once (cached by fingerprint under --out-dir/teachers), its train/dev
logits cached once; (2) every row of the selected tables
trains one student per seed, with the same data order and student initialisation per seed across rows (the seed
drives both), in plain processes (no Ray; the workers' own loop, `worker.distill`; `--jobs` in parallel, each
with cores/jobs threads); (3) one Markdown and one CSV table — dev metric mean ± std over seeds (best of the
per-epoch evaluations), the share of the teacher–student gap each row closes, the teacher's score, wall time per
run — and every run logged to MLflow under one experiment.

Paper tables (Cui et al. 2024): 2 = loss components, 3 = batch- vs sample-wise Sinkhorn, 4 = Sinkhorn vs
RKL / JS / TVD (same β, mass and scale); ``evidence`` = every objective at one budget, with a unit-mass SinKD
row whose β and λ come from a study (--unit-beta / --unit-lambda); ``related`` = ranking term, online teacher.
Every TrainConfig / DistillConfig field is a flag (generated from the dataclasses, so defaults cannot drift from
the CLIs'); fields not typed take the paper's per-task script (PAPER_SCRIPTS) and objective (PAPER_OBJECTIVE:
τ_SD = 2, λ = 0.1, T = 20, β = 0.8 at the released code's Sinkhorn scale, no τ_KL², vocabulary logits for
generative models). Finished runs are kept in ``<out-dir>/runs.jsonl`` and reused when the command is run again
with the same settings, so an interrupted reproduction loses nothing.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sinkd_ray.cli import add_config_args, config_from_args, explicit_dests, parse_args, run_cli  # noqa: E402
from sinkd_ray.config import DistillConfig, RunSpec, RuntimeConfig, StudyConfig, TrainConfig  # noqa: E402
from sinkd_ray.errors import SinkdError  # noqa: E402
from sinkd_ray.tasks import get_task  # noqa: E402


@dataclass(frozen=True)
class Row:
    label: str
    overrides: dict  # DistillConfig fields on top of the fixed settings


ROWS = {
    "ce": Row("CE only", {"alpha": 0.0, "beta": 0.0}),
    "ce_kd": Row("CE + KD", {"beta": 0.0}),
    "sinkd": Row("CE + KD + SD (SinKD, paper preset)", {}),
    # Unit-mass Sinkhorn with β and λ chosen by a study (--unit-beta / --unit-lambda): the project's default
    # semantics, where β means the same at every batch size.
    "sinkd_unit": Row(
        "CE + KD + SD (SinKD, unit mass, β/λ from a study)",
        {"sinkhorn_scale_preset": "unit", "beta": None, "sinkhorn_lambda": None},
    ),
    "kd_sd": Row("KD + SD (w/o CE, α = 1)", {"alpha": 1.0}),
    "ce_sd": Row("CE + SD (w/o KD, α = 0)", {"alpha": 0.0}),
    "sample": Row("CE + KD + SD sample-wise", {"sinkhorn_variant": "sample"}),
    "rkl": Row("CE + KD + RKL", {"distribution_term": "rkl"}),
    "js": Row("CE + KD + JS", {"distribution_term": "js"}),
    "tvd": Row("CE + KD + TVD", {"distribution_term": "tvd"}),
    # Generative models: SinKD on the label words' logits or on the whole vocabulary (the paper's Sec. 5.4)
    "ce_kd_label": Row("CE + KD, label-word logits", {"beta": 0.0, "logit_space": "label"}),
    "sinkd_label": Row("CE + KD + SD, label-word logits", {"logit_space": "label"}),
    "sinkd_vocab": Row("CE + KD + SD, vocabulary logits", {"logit_space": "vocab"}),
    "ranking": Row("CE + KD + SD + ranking (γ)", {"gamma": None}),  # γ from --ranking-gamma
    "online": Row("CE + KD + SD, online teacher modules", {"online_teacher": True}),
}
TABLES = {
    "2": ("Table 2 — loss components", ["ce", "ce_kd", "sinkd", "kd_sd", "ce_sd"]),
    "3": ("Table 3 — batch-wise vs sample-wise Sinkhorn", ["sinkd", "sample"]),
    "4": (
        "Table 4 — Sinkhorn vs other divergences (each with CE + KD, same β, mass and scale)",
        ["sinkd", "rkl", "js", "tvd"],
    ),
    "evidence": (
        "Does SinKD beat KD? — every objective at the same budget",
        ["ce", "ce_kd", "sinkd", "sinkd_unit", "sample", "rkl", "js", "tvd"],
    ),
    "generative": (
        "Generative students — SinKD on label-word vs vocabulary logits (CE and KD as the paper: vocabulary)",
        ["ce", "ce_kd", "sinkd_vocab", "ce_kd_label", "sinkd_label"],
    ),
    "related": (
        "Related objectives — ranking term (RLKD) and online teacher modules (OKD)",
        ["ce_kd", "sinkd", "ranking", "online"],
    ),
}
# The released student scripts (github.com/2018cx/SinKD, script/student/*.sh): batch size, epochs, lr, α, τ_KL.
PAPER_SCRIPTS = {
    "cola": dict(batch_size=16, epochs=20, lr=5e-5, alpha=0.9, tau_kl=1.0),
    "sst2": dict(batch_size=32, epochs=2, lr=4e-5, alpha=0.9, tau_kl=2.0),
    "rte": dict(batch_size=16, epochs=5, lr=2e-5, alpha=0.9, tau_kl=3.5),
    "mrpc": dict(batch_size=16, epochs=3, lr=3e-5, alpha=1.0, tau_kl=4.0),
    "qnli": dict(batch_size=16, epochs=6, lr=3.5e-6, alpha=0.8, tau_kl=3.0),
    "qqp": dict(batch_size=32, epochs=8, lr=4e-5, alpha=1.0, tau_kl=4.0),
    "mnli": dict(batch_size=16, epochs=10, lr=4e-6, alpha=0.8, tau_kl=3.0),
}
DEFAULT_SCRIPT = dict(batch_size=32, epochs=3, lr=5e-5, alpha=0.9, tau_kl=1.0)
# The paper's objective on top of the per-task script: the released code's Sinkhorn weighting (plan mass b ×
# 0.001), no τ² on the KL term (Eq. 19, DistillKL), vocabulary-level distributions for generative models (5.4).
PAPER_OBJECTIVE = dict(
    beta=0.8,
    tau_sd=2.0,
    sinkhorn_lambda=0.1,
    sinkhorn_iters=20,
    sinkhorn_scale_preset="released",
    kl_tau_squared=False,
    logit_space="paper",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/reproduce.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds per row: 0 .. N-1 (data order and initialisation)")
    p.add_argument("--tables", default="2,3,4", help=f"comma-separated, from {list(TABLES)}")
    p.add_argument(
        "--rows",
        help=f"train only these rows of the tables (comma-separated, from {list(ROWS)}); the "
        "others are reported if an earlier invocation trained them",
    )
    p.add_argument("--unit-beta", type=float, default=0.05, help="β of the unit-mass SinKD row (from a study)")
    p.add_argument("--unit-lambda", type=float, default=0.1, help="λ of the unit-mass SinKD row (from a study)")
    p.add_argument("--ranking-gamma", type=float, default=0.5, help="γ of the ranking row")
    p.add_argument("--jobs", type=int, default=1, help="student runs in parallel (threads split evenly)")
    p.add_argument("--out-dir", default="./sinkd_runs/reproduce", help="tables, run records, caches, mlflow.db")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite file in --out-dir)")
    p.add_argument("--experiment", help="MLflow experiment (default: sinkd-reproduce-<task>)")
    add_config_args(
        p,
        StudyConfig,
        group="the teacher to fine-tune first: --teacher-base, or a --teacher encoder without the task's head",
        skip=tuple(f for f in StudyConfig.help_texts() if f not in ("teacher_base", "teacher_epochs", "teacher_lr")),
    )
    add_config_args(p, RuntimeConfig, group="runtime", skip=("storage_path",))
    add_config_args(p, TrainConfig, group="every run (unset: the paper's per-task script)")
    add_config_args(p, DistillConfig, group="the objective (unset: the paper's settings)")
    return p


# ------------------------------------------------------------------------------------------- settings


def parse_tables(text: str) -> list[str]:
    tables = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tables if t not in TABLES]
    if unknown or not tables:
        raise SinkdError(f"--tables {text!r}: unknown table(s) {unknown} — choose from {list(TABLES)}")
    return tables


def parse_rows(text: str | None, rows: list[str]) -> list[str]:
    if not text:
        return rows
    chosen = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in chosen if r not in rows]
    if unknown:
        raise SinkdError(f"--rows {text!r}: {unknown} are not rows of the selected tables — choose from {rows}")
    return chosen


def base_spec(args, typed: set[str]) -> RunSpec:
    """The settings every row starts from: a typed flag wins; the paper's per-task script and objective fill the
    fields not typed; every other field keeps its dataclass default (the CLIs' defaults)."""
    paper = {
        k: v for k, v in {**PAPER_OBJECTIVE, **PAPER_SCRIPTS.get(args.task, DEFAULT_SCRIPT)}.items() if k not in typed
    }
    train = config_from_args(TrainConfig, args, **{k: v for k, v in paper.items() if k in TrainConfig.help_texts()})
    distill = config_from_args(
        DistillConfig, args, **{k: v for k, v in paper.items() if k in DistillConfig.help_texts()}
    )
    return RunSpec(train, distill)


def row_spec(spec: RunSpec, row: str, values: dict, seed: int) -> RunSpec:
    """The row's settings; a None override takes its value from ``values`` (--ranking-gamma, --unit-beta, …)."""
    overrides = {k: (values[k] if v is None else v) for k, v in ROWS[row].overrides.items()}
    return spec.with_values({**overrides, "seed": seed})


def row_values(args) -> dict:
    return {"gamma": args.ranking_gamma, "beta": args.unit_beta, "sinkhorn_lambda": args.unit_lambda}


def run_key(spec: RunSpec) -> str:
    """Identifies a finished run: same settings (seed included) -> same key -> reused."""
    return hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ one run


def train_one(job: dict) -> dict:
    """One student in this process (the workers' own loop): returns its evaluation history and wall time."""
    import torch

    from sinkd_ray.worker import distill

    torch.set_num_threads(job["threads"])
    history: list[dict] = []
    t0 = time.time()
    logits = job["teacher_logits"].tensor() if job["teacher_logits"] else None
    distill(
        RunSpec.from_dict(job["spec"]),
        report=lambda metrics, _: history.append(metrics),
        teacher_logits=logits,
        checkpoint=False,
    )
    return {
        **job["record"],
        "history": history,
        "wall_s": time.time() - t0,
        "best": max(m["dev_metric"] for m in history),
        "final": history[-1]["dev_metric"],
    }


def log_to_mlflow(client, experiment_id: str, record: dict, spec: RunSpec) -> None:
    from mlflow.entities import Metric, Param

    run = client.create_run(
        experiment_id,
        run_name=f"{record['row']}-seed{record['seed']}",
        tags={"sinkd.row": record["row"], "sinkd.key": record["key"], "sinkd.seed": str(record["seed"])},
    )
    params = {**{f"train.{k}": v for k, v in spec.train.to_dict().items()}, **spec.distill.to_dict()}
    now = int(time.time() * 1000)
    metrics = [
        Metric(k, float(v), now, int(m["step"]))
        for m in record["history"]
        for k, v in m.items()
        if isinstance(v, (int, float)) and k not in ("step",)
    ]
    metrics += [Metric("best_dev_metric", record["best"], now, 0), Metric("wall_s", record["wall_s"], now, 0)]
    client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, str(v)[:500]) for k, v in params.items()])
    client.set_terminated(run.info.run_id)


# -------------------------------------------------------------------------------------------- tables


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(
    records: dict[str, list[dict]], tables: list[str], metric: str, teacher_score: float | None, header: str
) -> tuple[str, list[dict]]:
    lines, rows_csv = [header, ""], []
    for table in tables:
        title, rows = TABLES[table]
        lines += [
            f"### {title}",
            "",
            f"| Objective | dev {metric} (mean ± std) | gap closed | per seed | wall time / run |",
            "|---|---|---|---|---|",
        ]
        if teacher_score is not None:
            lines.append(f"| Teacher | {teacher_score:.4f} | | | |")
        for row in rows:
            runs = sorted(records.get(row, []), key=lambda r: r["seed"])
            if not runs:
                continue
            mean, std = mean_std([r["best"] for r in runs])
            wall = statistics.fmean(r["wall_s"] for r in runs)
            seeds = ", ".join(f"{r['best']:.3f}" for r in runs)
            closed = gap_closed(mean, records, teacher_score)
            lines.append(f"| {ROWS[row].label} | {mean:.4f} ± {std:.4f} | {closed} | {seeds} | {wall:.0f} s |")
            rows_csv.append(
                {
                    "table": table,
                    "row": row,
                    "objective": ROWS[row].label,
                    "metric": metric,
                    "mean": f"{mean:.4f}",
                    "std": f"{std:.4f}",
                    "seeds": len(runs),
                    "per_seed": " ".join(f"{r['best']:.4f}" for r in runs),
                    "final_per_seed": " ".join(f"{r['final']:.4f}" for r in runs),
                    "wall_s_per_run": f"{wall:.1f}",
                }
            )
        lines.append("")
    lines += orderings(records)
    return "\n".join(lines), rows_csv


def gap_closed(mean: float, records: dict[str, list[dict]], teacher_score: float | None) -> str:
    """Share of the teacher – CE-only-student gap a row closes: (row − CE) / (teacher − CE)."""
    if teacher_score is None or not records.get("ce"):
        return ""
    ce_mean = mean_std([r["best"] for r in records["ce"]])[0]
    gap = teacher_score - ce_mean
    return f"{100 * (mean - ce_mean) / gap:.0f} %" if gap > 0 else ""


def orderings(records: dict[str, list[dict]]) -> list[str]:
    """The paper's orderings, each checked on the seeds both rows have (seed = data order and initialisation, the
    same across rows, so a lucky seed lifts every row alike): the means over those seeds, and whether their gap
    exceeds the larger of the two seed stds."""
    by_seed = {row: {r["seed"]: r["best"] for r in runs} for row, runs in records.items() if runs}
    checks = [
        ("CE < CE+KD", "ce", "ce_kd"),
        ("CE+KD < SinKD", "ce_kd", "sinkd"),
        ("CE+KD < SinKD (unit mass)", "ce_kd", "sinkd_unit"),
        ("sample-wise < batch-wise", "sample", "sinkd"),
        ("RKL < Sinkhorn", "rkl", "sinkd"),
        ("JS < Sinkhorn", "js", "sinkd"),
        ("TVD < Sinkhorn", "tvd", "sinkd"),
        # generative students: Sinkhorn against KD in the same logit space (the label-word rows also move CE and KD)
        ("CE+KD < SinKD, vocabulary logits", "ce_kd", "sinkd_vocab"),
        ("CE+KD < SinKD, label-word logits", "ce_kd_label", "sinkd_label"),
    ]
    out = ["### The paper's orderings on these runs (on the seeds both rows have)", ""]
    for name, low, high in checks:
        seeds = sorted(set(by_seed.get(low, {})) & set(by_seed.get(high, {})))
        if not seeds:
            continue
        (m_lo, s_lo), (m_hi, s_hi) = (mean_std([by_seed[row][s] for s in seeds]) for row in (low, high))
        held = m_lo < m_hi
        if len(seeds) > 1:
            spread = max(s_lo, s_hi)
            verdict = f"{'gap larger than' if abs(m_hi - m_lo) > spread else 'gap within'} the seed std {spread:.4f}"
        else:
            verdict = "one seed: no spread to compare with"
        out.append(
            f"- {name}: {'held' if held else 'did not hold'} ({m_lo:.4f} vs {m_hi:.4f} over seed(s) "
            f"{', '.join(map(str, seeds))}; {verdict})"
        )
    return out + [""]


# ---------------------------------------------------------------------------------------------- main


def prepare(args, typed: set[str]):
    """The shared run preparation: preflight, the teacher (fine-tuned here from --teacher-base, or from a --teacher
    encoder without the task's head; a generative --teacher is used as is: its LM head already reads label
    words), its train logits; then its dev score."""
    from sinkd_ray.driver import prepare_run, teacher_dev_score
    from sinkd_ray.models import has_task_head, load_config
    from sinkd_ray.storage import StorageLayout

    spec = base_spec(args, typed)
    layout = StorageLayout.at(args.out_dir)
    runtime = RuntimeConfig(storage_path=str(layout.root), address=args.address, resources_wait=args.resources_wait)
    base = None
    if "teacher_base" in typed:  # fine-tune it even where it could teach as is (a generative model's LM head)
        if spec.train.teacher:
            raise SinkdError(
                "--teacher and --teacher-base both given — --teacher is used as it is, --teacher-base is "
                "fine-tuned on the task first: give one of them"
            )
        base = args.teacher_base
    elif spec.train.teacher and not has_task_head(
        load_config(spec.train.teacher), spec.train.family, get_task(spec.train.task)
    ):
        base, spec = spec.train.teacher, RunSpec(replace(spec.train, teacher=None), spec.distill)
    teacher_train = replace(
        spec.train,
        epochs=args.teacher_epochs,
        lr=args.teacher_lr,
        workers=1,
        cpus_per_worker=float(os.cpu_count() or 1),
    )
    prepared = prepare_run(spec, layout, runtime, teacher_base=base, teacher_train=teacher_train)
    return prepared, teacher_dev_score(prepared.spec, layout)


def main(argv: list[str] | None = None) -> int:
    import torch
    from mlflow.tracking import MlflowClient

    from sinkd_ray.hardware import describe_precision
    from sinkd_ray.tracking import ensure_experiment

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(parser, argv)
    tables = parse_tables(args.tables)
    if args.seeds < 1 or args.jobs < 1:
        raise SinkdError(f"--seeds {args.seeds} / --jobs {args.jobs}: both must be at least 1")
    task = get_task(args.task)
    t_start = time.time()
    print(describe_precision(args.bf16, torch.device("cpu")))
    prepared, teacher_score = prepare(args, explicit_dests(parser, argv))
    spec, layout, metric = prepared.spec, prepared.layout, task.metric
    print(f"teacher {spec.train.teacher}: dev {metric} {teacher_score:.4f}")

    tracking_uri = args.tracking_uri or layout.default_tracking_uri()
    client = MlflowClient(tracking_uri)
    experiment_id = ensure_experiment(
        client,
        args.experiment or f"sinkd-reproduce-{task.name}",
        layout.artifact_location() if not args.tracking_uri else None,
    )
    records_file = Path(layout.root) / "runs.jsonl"
    done = {}
    if records_file.exists():
        for line in records_file.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                done[record["key"]] = record

    rows = list(dict.fromkeys(row for t in tables for row in TABLES[t][1]))
    trained_rows = parse_rows(args.rows, rows)
    teacher_logits = {spec.train.logit_space: prepared.teacher_logits}

    def logits_for(run: RunSpec):
        """A row may change the logit space (label words vs the vocabulary): the teacher's logits for that one."""
        from sinkd_ray.driver import prepare_teacher_logits

        if run.train.logit_space not in teacher_logits:
            teacher_logits[run.train.logit_space] = prepare_teacher_logits(run, layout)
        return teacher_logits[run.train.logit_space]

    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    jobs, specs = [], {}
    for seed in range(args.seeds):  # seed-major, so a partial run already covers every row for seed 0
        for row in rows:
            run = row_spec(spec, row, row_values(args), seed)
            key = run_key(run)
            specs[key] = run
            if key not in done and row in trained_rows:
                jobs.append(
                    {
                        "spec": run.to_dict(),
                        "teacher_logits": logits_for(run),
                        "threads": threads,
                        "record": {"row": row, "seed": seed, "key": key},
                    }
                )
    print(
        f"{len(rows)} rows x {args.seeds} seeds: {len(jobs)} to train, "
        f"{sum(k in done for k in specs)} reused from {records_file}"
    )

    def finished(record: dict) -> None:
        done[record["key"]] = record
        with records_file.open("a") as f:
            f.write(json.dumps(record) + "\n")
        log_to_mlflow(client, experiment_id, record, specs[record["key"]])
        print(
            f"  {record['row']:10s} seed {record['seed']}: best dev {metric} {record['best']:.4f} "
            f"(final {record['final']:.4f}) in {record['wall_s']:.0f}s",
            flush=True,
        )

    if args.jobs == 1:
        for job in jobs:
            finished(train_one(job))
    else:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            for future in as_completed([pool.submit(train_one, job) for job in jobs]):
                finished(future.result())

    records: dict[str, list[dict]] = {}
    for seed in range(args.seeds):
        for row in rows:
            key = run_key(row_spec(spec, row, row_values(args), seed))
            if key in done:  # a row left out with --rows and never trained is left out of the tables too
                records.setdefault(row, []).append(done[key])
    tcfg, dcfg = spec.train, spec.distill
    header = (
        f"## SinKD ablations — {task.name}, {args.seeds} seeds\n\n"
        f"Teacher `{Path(tcfg.teacher).name}`; student `{tcfg.student}`"
        f"{f' (first {tcfg.student_layers} layers)' if tcfg.student_layers else ''}; {tcfg.epochs} epochs, "
        f"lr {tcfg.lr:g}, b {dcfg.batch_size}, α {dcfg.alpha:g}, τ_KL {dcfg.tau_kl:g} (no τ²: "
        f"{not dcfg.kl_tau_squared}), β {dcfg.beta:g} (mass {dcfg.sinkhorn_mass}, × {dcfg.sinkhorn_scale:g}), "
        f"τ_SD {dcfg.tau_sd:g}, λ {dcfg.sinkhorn_lambda:g}, T {dcfg.sinkhorn_iters}, max length "
        f"{tcfg.max_length}, logits {tcfg.logit_space}. Metric: best dev {metric} over the per-epoch "
        f"evaluations. Wall time of this invocation: {time.time() - t_start:.0f} s."
    )
    markdown, rows_csv = summarise(records, tables, metric, teacher_score, header)
    md_path, csv_path = (
        Path(layout.root) / f"reproduce-{task.name}.md",
        Path(layout.root) / f"reproduce-{task.name}.csv",
    )
    md_path.write_text(markdown + "\n")
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows_csv[0]))
        writer.writeheader()
        writer.writerows(rows_csv)
    print(markdown)
    print(f"\nwrote {md_path} and {csv_path}; MLflow: mlflow ui --backend-store-uri {tracking_uri}")
    return 0


if __name__ == "__main__":
    run_cli(main)
