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
import math
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
    # The weighting of the distribution term: fixed β at unit mass (0.8 = the paper's text), and β set per step so
    # that the term's gradient is the share ρ of the total (objective.share_weight); TVD and JS by share at the
    # better ρ of the two SinKD share rows (chosen on the held-out slice): "more push toward the teacher" against
    # "optimal transport across the batch" at equal push.
    "sinkd_unit_b01": Row("SinKD, unit mass, β 0.1", {"sinkhorn_scale_preset": "unit", "beta": 0.1}),
    "sinkd_unit_b08": Row("SinKD, unit mass, β 0.8 (the paper's text)", {"sinkhorn_scale_preset": "unit", "beta": 0.8}),
    "sinkd_unit_b2": Row("SinKD, unit mass, β 2", {"sinkhorn_scale_preset": "unit", "beta": 2.0}),
    "share_01": Row("SinKD by share, ρ 0.1", {"sd_weighting": "share", "sd_share": 0.1}),
    "share_03": Row("SinKD by share, ρ 0.3", {"sd_weighting": "share", "sd_share": 0.3}),
    "tvd_share": Row(
        "CE + KD + TVD by share, best ρ", {"distribution_term": "tvd", "sd_weighting": "share", "sd_share": None}
    ),
    "js_share": Row(
        "CE + KD + JS by share, best ρ", {"distribution_term": "js", "sd_weighting": "share", "sd_share": None}
    ),
}
SHARE_ROWS = {"share_01": 0.1, "share_03": 0.3}  # the candidates for the controls' "best ρ"
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
    "weighting": (
        "Does SinKD beat KD, and at which weight? — fixed β against the gradient share ρ",
        [
            "ce",
            "ce_kd",
            "sinkd",
            "sinkd_unit_b01",
            "sinkd_unit_b08",
            "sinkd_unit_b2",
            "share_01",
            "share_03",
            "tvd_share",
            "js_share",
        ],
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


def row_values(args, best_rho: float | None = None) -> dict:
    """What the rows' None overrides take; ``best_rho``: the share rows' best ρ, once known (`best_share`)."""
    return {
        "gamma": args.ranking_gamma,
        "beta": args.unit_beta,
        "sinkhorn_lambda": args.unit_lambda,
        "sd_share": best_rho,
    }


def needs_best_rho(row: str) -> bool:
    return ROWS[row].overrides.get("sd_share", 0.0) is None


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
    return {**job["record"], **summarise_history(history), "history": history, "wall_s": time.time() - t0}


def run_in_processes(fn, jobs: list, workers: int, done) -> None:
    """``done(fn(job))`` for every job, ``workers`` jobs at a time in spawned processes. Interrupted (Ctrl+C, or
    `kill`, which `run_cli` turns into one), the runs in progress end too: leaving the pool's ``with`` block waits
    for them (minutes each), and ProcessPoolExecutor can stop its workers itself only from Python 3.14."""
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
    try:
        for future in as_completed([pool.submit(fn, job) for job in jobs]):
            done(future.result())
    except BaseException:
        for process in list((pool._processes or {}).values()):
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def summarise_history(history: list[dict]) -> dict:
    """One run's figures. ``selected``: dev at the evaluation with the best held-out metric (the first of equals;
    the honest figure: dev is read once, for an epoch chosen without it); without a held-out slice that is the best
    dev evaluation (optimistic). ``final``: the last evaluation's dev; ``best``: the best dev of any evaluation.
    ``shares``: each term's mean share of the gradient over the evaluations (`objective.gradient_shares`)."""
    key = "holdout_metric" if "holdout_metric" in history[0] else "dev_metric"
    chosen = max(range(len(history)), key=lambda i: (history[i][key], -i))
    terms = sorted({k[len("grad_share_") :] for m in history for k in m if k.startswith("grad_share_")})
    return {
        "best": max(m["dev_metric"] for m in history),
        "final": history[-1]["dev_metric"],
        "selected": history[chosen]["dev_metric"],
        "selected_epoch": history[chosen]["epoch"],
        "holdout": history[chosen].get("holdout_metric"),
        "selected_on": "holdout" if key == "holdout_metric" else "dev",
        "shares": {t: statistics.fmean(m.get(f"grad_share_{t}", 0.0) for m in history) for t in terms},
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


def score(record: dict) -> float:
    """The figure a run is reported by: dev at the held-out-chosen epoch (records of earlier versions: best dev)."""
    return record.get("selected", record["best"])


def paired_interval(differences: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean of paired differences and its two-sided Student-t interval: mean ± t_{(1+c)/2, n−1} · s / √n.
    One difference: (mean, nan, nan) — no spread to build an interval from."""
    from scipy.stats import t

    n, mean = len(differences), statistics.fmean(differences)
    if n < 2:
        return mean, math.nan, math.nan
    half = t.ppf((1 + confidence) / 2, n - 1) * statistics.stdev(differences) / math.sqrt(n)
    return mean, mean - half, mean + half


def paired(records: dict[str, list[dict]], row: str, reference: str) -> tuple[float, float, float, int] | None:
    """``row`` − ``reference`` on the seeds both have (same seed = same data order and initialisation)."""
    a = {r["seed"]: score(r) for r in records.get(row, [])}
    b = {r["seed"]: score(r) for r in records.get(reference, [])}
    seeds = sorted(set(a) & set(b))
    if not seeds or row == reference:
        return None
    return (*paired_interval([a[s] - b[s] for s in seeds]), len(seeds))


def _delta(result) -> str:
    if result is None:
        return ""
    mean, low, high, n = result
    interval = "" if math.isnan(low) else f" [{low:+.4f}, {high:+.4f}]"
    return f"{mean:+.4f}{interval}"


def summarise(
    records: dict[str, list[dict]], tables: list[str], metric: str, teacher_score: float | None, header: str
) -> tuple[str, list[dict]]:
    lines, rows_csv = [header, ""], []
    for table in tables:
        title, rows = TABLES[table]
        lines += [
            f"### {title}",
            "",
            f"| Objective | dev {metric} (mean ± std) | last epoch | Δ vs KD [95 % CI] | Δ vs CE [95 % CI] "
            "| gap closed | grad. share of the β term | per seed | wall time / run |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        if teacher_score is not None:
            lines.append(f"| Teacher | {teacher_score:.4f} | | | | | | | |")
        for row in rows:
            runs = sorted(records.get(row, []), key=lambda r: r["seed"])
            if not runs:
                continue
            mean, std = mean_std([score(r) for r in runs])
            last_mean, last_std = mean_std([r["final"] for r in runs])
            wall = statistics.fmean(r["wall_s"] for r in runs)
            share = [r["shares"]["sd"] for r in runs if r.get("shares", {}).get("sd") is not None]
            share_text = f"{100 * statistics.fmean(share):.1f} %" if share else ""
            vs_kd, vs_ce = paired(records, row, "ce_kd"), paired(records, row, "ce")
            lines.append(
                f"| {ROWS[row].label} | {mean:.4f} ± {std:.4f} | {last_mean:.4f} ± {last_std:.4f} | {_delta(vs_kd)} | "
                f"{_delta(vs_ce)} | {gap_closed(mean, records, teacher_score)} | {share_text} | "
                f"{', '.join(f'{score(r):.3f}' for r in runs)} | {wall:.0f} s |"
            )
            rows_csv.append(
                {
                    "table": table,
                    "row": row,
                    "objective": ROWS[row].label,
                    "metric": metric,
                    "mean": f"{mean:.4f}",
                    "std": f"{std:.4f}",
                    "seeds": len(runs),
                    "per_seed": " ".join(f"{score(r):.4f}" for r in runs),
                    "final_per_seed": " ".join(f"{r['final']:.4f}" for r in runs),
                    "delta_vs_kd": _delta(vs_kd),
                    "delta_vs_ce": _delta(vs_ce),
                    "grad_share_sd": f"{statistics.fmean(share):.4f}" if share else "",
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
    ce_mean = mean_std([score(r) for r in records["ce"]])[0]
    gap = teacher_score - ce_mean
    return f"{100 * (mean - ce_mean) / gap:.0f} %" if gap > 0 else ""


ORDERINGS = [
    ("CE < CE+KD", "ce", "ce_kd"),
    ("CE+KD < SinKD", "ce_kd", "sinkd"),
    ("CE+KD < SinKD (unit mass)", "ce_kd", "sinkd_unit"),
    ("CE+KD < SinKD (unit mass, β 0.1)", "ce_kd", "sinkd_unit_b01"),
    ("CE+KD < SinKD (unit mass, β 0.8)", "ce_kd", "sinkd_unit_b08"),
    ("CE+KD < SinKD (unit mass, β 2)", "ce_kd", "sinkd_unit_b2"),
    ("CE+KD < SinKD by share ρ 0.1", "ce_kd", "share_01"),
    ("CE+KD < SinKD by share ρ 0.3", "ce_kd", "share_03"),
    ("TVD by share < SinKD by share (best ρ)", "tvd_share", "share_best"),
    ("JS by share < SinKD by share (best ρ)", "js_share", "share_best"),
    ("sample-wise < batch-wise", "sample", "sinkd"),
    ("RKL < Sinkhorn", "rkl", "sinkd"),
    ("JS < Sinkhorn", "js", "sinkd"),
    ("TVD < Sinkhorn", "tvd", "sinkd"),
    # generative students: Sinkhorn against KD in the same logit space (the label-word rows also move CE and KD)
    ("CE+KD < SinKD, vocabulary logits", "ce_kd", "sinkd_vocab"),
    ("CE+KD < SinKD, label-word logits", "ce_kd_label", "sinkd_label"),
]


def orderings(records: dict[str, list[dict]]) -> list[str]:
    """The paper's orderings, each checked by the paired difference high − low on the seeds both rows have (seed =
    data order and initialisation, the same across rows, so a lucky seed lifts every row alike). "held" only when
    the 95 % t interval of that difference excludes 0; "reversed" when it excludes 0 on the other side."""
    records = dict(records)
    best = best_share(records)
    if best is not None:  # the SinKD share row the controls were run against
        records["share_best"] = records[next(r for r, rho in SHARE_ROWS.items() if rho == best)]
    out = ["### The paper's orderings on these runs (paired over the seeds both rows have, 95 % t interval)", ""]
    for name, low, high in ORDERINGS:
        result = paired(records, high, low)
        if result is None:
            continue
        mean, lo, hi, n = result
        if math.isnan(lo):
            verdict = f"one seed, no interval (Δ {mean:+.4f})"
        elif lo > 0:
            verdict = f"held (Δ {mean:+.4f}, 95 % CI [{lo:+.4f}, {hi:+.4f}], {n} seeds)"
        elif hi < 0:
            verdict = f"reversed (Δ {mean:+.4f}, 95 % CI [{lo:+.4f}, {hi:+.4f}], {n} seeds)"
        else:
            verdict = f"not shown: the interval includes 0 (Δ {mean:+.4f}, 95 % CI [{lo:+.4f}, {hi:+.4f}], {n} seeds)"
        out.append(f"- {name}: {verdict}")
    return out + [""]


def best_share(records: dict[str, list[dict]]) -> float | None:
    """The better ρ of the SinKD share rows, on the held-out metric at each run's chosen epoch (dev is not looked
    at), on the seeds every candidate has; ties go to the smaller ρ. None until every candidate has a run."""
    by_row = {row: {r["seed"]: r for r in records.get(row, [])} for row in SHARE_ROWS}
    seeds = set.intersection(*(set(runs) for runs in by_row.values()))
    if not seeds:
        return None

    def held(record: dict) -> float:
        return record["holdout"] if record.get("holdout") is not None else score(record)

    means = {rho: statistics.fmean(held(by_row[row][s]) for s in seeds) for row, rho in SHARE_ROWS.items()}
    return max(sorted(means), key=lambda rho: means[rho])


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
    return prepared, teacher_dev_score(prepared)


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
    # students train here, in plain processes: this machine's own paths
    spec, layout, metric = prepared.local_spec, prepared.layout, task.metric
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
    specs: dict[str, RunSpec] = {}

    def plan(values: dict, deferred: bool) -> list[dict]:
        """The runs still to train: rows that need the best ρ only once it is known (``deferred``)."""
        jobs = []
        for seed in range(args.seeds):  # seed-major, so a partial run already covers every row for seed 0
            for row in rows:
                if needs_best_rho(row) != deferred:
                    continue
                run = row_spec(spec, row, values, seed)
                key = run_key(run)
                specs[key] = run
                if key not in done and row in trained_rows:
                    record = {"row": row, "seed": seed, "key": key}
                    jobs.append(
                        {"spec": run.to_dict(), "teacher_logits": logits_for(run), "threads": threads, "record": record}
                    )
        return jobs

    def finished(record: dict) -> None:
        done[record["key"]] = record
        with records_file.open("a") as f:
            f.write(json.dumps(record) + "\n")
        log_to_mlflow(client, experiment_id, record, specs[record["key"]])
        print(
            f"  {record['row']:14s} seed {record['seed']}: dev {metric} {record['selected']:.4f} at epoch "
            f"{record['selected_epoch']:g} (chosen on {record['selected_on']}; last {record['final']:.4f}, best "
            f"{record['best']:.4f}) in {record['wall_s']:.0f}s",
            flush=True,
        )

    def train(jobs: list[dict]) -> None:
        if args.jobs == 1:
            for job in jobs:
                finished(train_one(job))
            return
        run_in_processes(train_one, jobs, args.jobs, finished)

    def collect(values: dict) -> dict[str, list[dict]]:
        records: dict[str, list[dict]] = {}
        for seed in range(args.seeds):
            for row in rows:
                if needs_best_rho(row) and values["sd_share"] is None:
                    continue
                key = run_key(row_spec(spec, row, values, seed))
                if key in done:  # a row left out with --rows and never trained is left out of the tables too
                    records.setdefault(row, []).append(done[key])
        return records

    jobs = plan(row_values(args), deferred=False)
    print(
        f"{len(rows)} rows x {args.seeds} seeds: {len(jobs)} to train"
        f"{' first (then the rows at the best ρ)' if any(map(needs_best_rho, rows)) else ''}, "
        f"{sum(k in done for k in specs)} reused from {records_file}"
    )
    train(jobs)
    values = row_values(args, best_share(collect(row_values(args))))
    if any(map(needs_best_rho, rows)):
        if values["sd_share"] is None:
            print("the rows at the best ρ wait for every share row to have a run (train them with --rows)")
        else:
            jobs = plan(values, deferred=True)
            print(f"best ρ on the held-out slice: {values['sd_share']:g}; {len(jobs)} runs at it to train")
            train(jobs)
    records = collect(values)
    tcfg, dcfg = spec.train, spec.distill
    header = (
        f"## SinKD ablations — {task.name}, {args.seeds} seeds\n\n"
        f"Teacher `{Path(tcfg.teacher).name}`; student `{tcfg.student}`"
        f"{f' (first {tcfg.student_layers} layers)' if tcfg.student_layers else ''}; {tcfg.epochs} epochs, "
        f"lr {tcfg.lr:g}, b {dcfg.batch_size}, α {dcfg.alpha:g}, τ_KL {dcfg.tau_kl:g} (no τ²: "
        f"{not dcfg.kl_tau_squared}), β {dcfg.beta:g} (mass {dcfg.sinkhorn_mass}, × {dcfg.sinkhorn_scale:g}), "
        f"τ_SD {dcfg.tau_sd:g}, λ {dcfg.sinkhorn_lambda:g}, T {dcfg.sinkhorn_iters}, max length "
        f"{tcfg.max_length}, logits {tcfg.logit_space}. Metric: "
        + (
            f"dev {metric} at the epoch with the best held-out {metric} ({tcfg.holdout_fraction:g} of train, a "
            "fixed stratified split, the same for every row; dev read once); 'last epoch': dev after the last epoch"
            if tcfg.holdout_fraction
            else f"best dev {metric} over the per-epoch evaluations (no held-out slice: optimistic)"
        )
        + f". Δ: paired over the seeds both rows have, mean and 95 % t interval. Wall time of this invocation: "
        f"{time.time() - t_start:.0f} s."
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
