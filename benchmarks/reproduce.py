"""Reproduce the SinKD paper's ablation tables on a local GLUE copy, offline, on a CPU.

    python benchmarks/reproduce.py --task cola --data-dir ../shared/data \
        --teacher <fine-tuned teacher, or a base model to fine-tune> --student <model> --student-layers 3 \
        --seeds 3 --epochs 2 --jobs 2

Steps: (1) a base-model teacher is fine-tuned once (cached by fingerprint under --out-dir/teachers); its
train/dev logits are cached once; (2) every row of the selected tables trains one student per seed, with the
same data order and student initialisation per seed across rows (the seed drives both); (3) one Markdown and
one CSV table per paper table — dev metric mean ± std over seeds (best of the per-epoch evaluations), the
teacher's score, wall time per run — and every run logged to MLflow under one experiment.

Paper tables (Cui et al. 2024): 2 = loss components, 3 = batch- vs sample-wise Sinkhorn, 4 = Sinkhorn vs
RKL / JS / TVD. ``related`` adds the two objectives from the related work (ranking term, online teacher).
Fixed settings: τ_SD = 2, λ = 0.1, T = 20, β = 0.8 with the released code's Sinkhorn scale (plan mass b,
factor 0.001: ``--sinkhorn-scale-preset released``), α, τ_KL, lr and b from the paper's per-task scripts;
every flag overrides. Finished runs are kept in ``<out-dir>/runs.jsonl`` and reused when the command is run
again with the same settings, so an interrupted reproduction loses nothing.

Students train in plain processes (no Ray): `--jobs` runs in parallel, each with cores/jobs threads.
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
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sinkd_ray.cli import run_cli  # noqa: E402
from sinkd_ray.config import DistillConfig, TrainConfig  # noqa: E402
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
    "sinkd_unit": Row("CE + KD + SD (SinKD, unit mass, β/λ from a study)",
                      {"sinkhorn_scale_preset": "unit", "beta": None, "sinkhorn_lambda": None}),
    "kd_sd": Row("KD + SD (w/o CE, α = 1)", {"alpha": 1.0}),
    "ce_sd": Row("CE + SD (w/o KD, α = 0)", {"alpha": 0.0}),
    "sample": Row("CE + KD + SD sample-wise", {"sinkhorn_variant": "sample"}),
    "rkl": Row("CE + KD + RKL", {"distribution_term": "rkl"}),
    "js": Row("CE + KD + JS", {"distribution_term": "js"}),
    "tvd": Row("CE + KD + TVD", {"distribution_term": "tvd"}),
    "ranking": Row("CE + KD + SD + ranking (γ)", {"gamma": None}),  # γ from --gamma
    "online": Row("CE + KD + SD, online teacher modules", {"online_teacher": True}),
}
TABLES = {
    "2": ("Table 2 — loss components", ["ce", "ce_kd", "sinkd", "kd_sd", "ce_sd"]),
    "3": ("Table 3 — batch-wise vs sample-wise Sinkhorn", ["sinkd", "sample"]),
    "4": ("Table 4 — Sinkhorn vs other divergences (each with CE + KD, same β, mass and scale)",
          ["sinkd", "rkl", "js", "tvd"]),
    "evidence": ("Does SinKD beat KD? — every objective at the same budget",
                 ["ce", "ce_kd", "sinkd", "sinkd_unit", "sample", "rkl", "js", "tvd"]),
    "related": ("Related objectives — ranking term (RLKD) and online teacher modules (OKD)",
                ["ce_kd", "sinkd", "ranking", "online"]),
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/reproduce.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="cola")
    p.add_argument("--data-dir", help="local GLUE/SuperGLUE copy (else $SINKD_DATA_DIR, else the hub)")
    p.add_argument("--teacher", required=True,
                   help="a fine-tuned teacher for the task, or a base model to fine-tune first (hub id or path)")
    p.add_argument("--student", required=True, help="student checkpoint, or the model whose first k layers start it")
    p.add_argument("--student-layers", type=int, help="keep the first k transformer layers of --student")
    p.add_argument("--seeds", type=int, default=3, help="seeds per row: 0 .. N-1 (data order and initialisation)")
    p.add_argument("--tables", default="2,3,4", help=f"comma-separated, from {list(TABLES)}")
    p.add_argument("--epochs", type=int, help="student epochs (default: the paper's per-task script)")
    p.add_argument("--lr", type=float, help="student learning rate (default: the paper's per-task script)")
    p.add_argument("--batch-size", type=int, help="b (default: the paper's per-task script)")
    p.add_argument("--alpha", type=float, help="α (default: the paper's per-task script)")
    p.add_argument("--tau-kl", type=float, help="τ_KL (default: the paper's per-task script)")
    p.add_argument("--beta", type=float, default=0.8)
    p.add_argument("--tau-sd", type=float, default=2.0)
    p.add_argument("--sinkhorn-lambda", type=float, default=0.1)
    p.add_argument("--sinkhorn-iters", type=int, default=20)
    p.add_argument("--sinkhorn-scale-preset", default="released", choices=("released", "unit"),
                   help="'released': the authors' code (plan mass b × 0.001); 'unit': this project's default")
    p.add_argument("--gamma", type=float, default=0.5, help="γ of the ranking row")
    p.add_argument("--unit-beta", type=float, default=0.05, help="β of the unit-mass SinKD row (from a study)")
    p.add_argument("--unit-lambda", type=float, default=0.1, help="λ of the unit-mass SinKD row (from a study)")
    p.add_argument("--logit-space", default="paper", choices=("label", "vocab", "paper"),
                   help="generative families: label words or the vocabulary; 'paper' = the paper's (vocabulary)")
    p.add_argument("--online-lr", type=float, default=1e-4, help="learning rate of the online teacher modules")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--max-train-examples", type=int)
    p.add_argument("--max-eval-examples", type=int)
    p.add_argument("--eval-every-steps", type=int, default=0, help="0: evaluate once per epoch")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast; default auto: on where the CPU/GPU has native bf16 (1.5x faster on an "
                        "AVX-512 BF16 CPU, 16x slower on an AVX2-only one)")
    p.add_argument("--teacher-epochs", type=int, default=3, help="epochs when --teacher is a base model")
    p.add_argument("--teacher-lr", type=float, default=5e-5, help="lr when --teacher is a base model")
    p.add_argument("--jobs", type=int, default=1, help="student runs in parallel (threads split evenly)")
    p.add_argument("--out-dir", default="./sinkd_runs/reproduce", help="tables, run records, caches, mlflow.db")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite file in --out-dir)")
    p.add_argument("--experiment", help="MLflow experiment (default: sinkd-reproduce-<task>)")
    return p


# ------------------------------------------------------------------------------------------- settings


def parse_tables(text: str) -> list[str]:
    tables = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tables if t not in TABLES]
    if unknown or not tables:
        raise SinkdError(f"--tables {text!r}: unknown table(s) {unknown} — choose from {list(TABLES)}")
    return tables


def base_configs(args, teacher: str) -> tuple[TrainConfig, DistillConfig]:
    """The fixed settings every row starts from (paper script values unless a flag overrides them)."""
    script = {**PAPER_SCRIPTS.get(args.task, DEFAULT_SCRIPT)}
    for key in ("epochs", "lr", "batch_size", "alpha", "tau_kl"):
        if getattr(args, key) is not None:
            script[key] = getattr(args, key)
    tcfg = TrainConfig(task=args.task, student=args.student, student_layers=args.student_layers, teacher=teacher,
                       data_dir=args.data_dir, max_length=args.max_length, epochs=script["epochs"], lr=script["lr"],
                       bf16=args.bf16, max_train_examples=args.max_train_examples, logit_space=args.logit_space,
                       max_eval_examples=args.max_eval_examples, eval_every_steps=args.eval_every_steps)
    dcfg = DistillConfig(alpha=script["alpha"], tau_kl=script["tau_kl"], batch_size=script["batch_size"],
                         beta=args.beta, tau_sd=args.tau_sd, sinkhorn_lambda=args.sinkhorn_lambda,
                         sinkhorn_iters=args.sinkhorn_iters, sinkhorn_scale_preset=args.sinkhorn_scale_preset,
                         online_lr=args.online_lr, kl_tau_squared=False)  # Eq. 19 / released DistillKL: no τ²
    return tcfg, dcfg


def row_config(dcfg: DistillConfig, row: str, values: dict) -> DistillConfig:
    """The row's settings; a None override takes its value from ``values`` (--gamma, --unit-beta, …)."""
    overrides = {k: (values[k] if v is None else v) for k, v in ROWS[row].overrides.items()}
    return DistillConfig.from_dict({**dcfg.to_dict(), **overrides})


def row_values(args) -> dict:
    return {"gamma": args.gamma, "beta": args.unit_beta, "sinkhorn_lambda": args.unit_lambda}


def run_key(tcfg: TrainConfig, dcfg: DistillConfig) -> str:
    """Identifies a finished run: same settings (seed included) -> same key -> reused."""
    text = json.dumps({"train": asdict(tcfg), "distill": dcfg.to_dict()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------- teacher


def resolve_teacher(args, out_dir: Path) -> tuple[str, dict | None]:
    """A fine-tuned teacher: the given one, or a base model fine-tuned once (reused by fingerprint)."""
    from sinkd_ray.models import load_config
    from sinkd_ray.train import finetune_teacher, has_task_head

    if has_task_head(load_config(args.teacher), None, get_task(args.task)):
        return args.teacher, None
    tcfg = TrainConfig(task=args.task, student=args.teacher, data_dir=args.data_dir, max_length=args.max_length,
                       epochs=args.teacher_epochs, lr=args.teacher_lr, cpus_per_worker=float(os.cpu_count() or 1))
    path = finetune_teacher(args.teacher, tcfg, storage=str(out_dir))
    return str(path), json.loads((path / "dev_metrics.json").read_text())


def teacher_dev_score(tcfg: TrainConfig, cache: dict[str, str]) -> float:
    """The teacher's dev metric from its cached dev logits: class logits, or the label words' columns of
    vocabulary logits (what the model would answer)."""
    from transformers import AutoTokenizer

    from sinkd_ray.data import load_split
    from sinkd_ray.models import detect_family, label_token_ids, load_config, resolve_logit_space
    from sinkd_ray.tasks import compute_metrics
    from sinkd_ray.teacher_cache import load_teacher_logits

    task = get_task(tcfg.task)
    logits = load_teacher_logits(cache["dev"])
    family = detect_family(load_config(tcfg.teacher), tcfg.family)
    if resolve_logit_space(tcfg.logit_space, family) == "vocab":
        tokenizer = AutoTokenizer.from_pretrained(tcfg.teacher)
        logits = logits[:, label_token_ids(tokenizer, task.verbalizer, family, task.template)]
    labels = load_split(task, "dev", tcfg.data_dir)["label"]
    return compute_metrics(task, logits.argmax(-1)[: len(labels)], labels)[task.metric]


# ------------------------------------------------------------------------------------------ one run


def train_one(spec: dict) -> dict:
    """One student in this process: returns its evaluation history and wall time."""
    import torch

    from sinkd_ray.train import distill

    torch.set_num_threads(spec["threads"])
    tcfg, dcfg = TrainConfig(**spec["train"]), DistillConfig.from_dict(spec["distill"])
    history: list[dict] = []
    t0 = time.time()
    distill(tcfg, dcfg, report=lambda metrics, _: history.append(metrics), teacher_cache=spec["cache"],
            checkpoint=False)
    return {**spec["record"], "history": history, "wall_s": time.time() - t0,
            "best": max(m["dev_metric"] for m in history), "final": history[-1]["dev_metric"]}


def log_to_mlflow(client, experiment_id: str, record: dict, tcfg: TrainConfig, dcfg: DistillConfig) -> None:
    from mlflow.entities import Metric, Param

    run = client.create_run(experiment_id, run_name=f"{record['row']}-seed{record['seed']}",
                            tags={"sinkd.row": record["row"], "sinkd.key": record["key"],
                                  "sinkd.seed": str(record["seed"])})
    params = {**{f"train.{k}": v for k, v in asdict(tcfg).items()}, **dcfg.to_dict()}
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, int(m["step"])) for m in record["history"] for k, v in m.items()
               if isinstance(v, (int, float)) and k not in ("step",)]
    metrics += [Metric("best_dev_metric", record["best"], now, 0), Metric("wall_s", record["wall_s"], now, 0)]
    client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, str(v)[:500]) for k, v in params.items()])
    client.set_terminated(run.info.run_id)


# -------------------------------------------------------------------------------------------- tables


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(records: dict[str, list[dict]], tables: list[str], metric: str, teacher_score: float | None,
              header: str) -> tuple[str, list[dict]]:
    lines, rows_csv = [header, ""], []
    for table in tables:
        title, rows = TABLES[table]
        lines += [f"### {title}", "", f"| Objective | dev {metric} (mean ± std) | gap closed | per seed | "
                  "wall time / run |", "|---|---|---|---|---|"]
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
            rows_csv.append({"table": table, "row": row, "objective": ROWS[row].label, "metric": metric,
                             "mean": f"{mean:.4f}", "std": f"{std:.4f}", "seeds": len(runs),
                             "per_seed": " ".join(f"{r['best']:.4f}" for r in runs),
                             "final_per_seed": " ".join(f"{r['final']:.4f}" for r in runs),
                             "wall_s_per_run": f"{wall:.1f}"})
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
    """The paper's orderings, checked on the means (and whether the gap exceeds the seed spread)."""
    stats = {row: mean_std([r["best"] for r in runs]) for row, runs in records.items() if runs}
    checks = [("CE < CE+KD", "ce", "ce_kd"), ("CE+KD < SinKD", "ce_kd", "sinkd"),
              ("CE+KD < SinKD (unit mass)", "ce_kd", "sinkd_unit"),
              ("sample-wise < batch-wise", "sample", "sinkd"), ("RKL < Sinkhorn", "rkl", "sinkd"),
              ("JS < Sinkhorn", "js", "sinkd"), ("TVD < Sinkhorn", "tvd", "sinkd")]
    out = ["### The paper's orderings on these runs", ""]
    for name, low, high in checks:
        if low in stats and high in stats:
            (m_lo, s_lo), (m_hi, s_hi) = stats[low], stats[high]
            held = m_lo < m_hi
            clear = abs(m_hi - m_lo) > max(s_lo, s_hi)
            out.append(f"- {name}: {'held' if held else 'did not hold'} ({m_lo:.4f} vs {m_hi:.4f}; "
                       f"{'gap larger than' if clear else 'gap within'} the seed std {max(s_lo, s_hi):.4f})")
    return out + [""]


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    from mlflow.tracking import MlflowClient

    import torch

    from sinkd_ray.hardware import describe_precision
    from sinkd_ray.tracking import default_tracking_uri, ensure_experiment
    from sinkd_ray.train import preflight, prepare_teacher_cache

    args = build_parser().parse_args(argv)
    tables = parse_tables(args.tables)
    if args.seeds < 1 or args.jobs < 1:
        raise SinkdError(f"--seeds {args.seeds} / --jobs {args.jobs}: both must be at least 1")
    get_task(args.task)
    out_dir = Path(args.out_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    print(describe_precision(args.bf16, torch.device("cpu")))

    # Fail fast (one line) on missing data or models, before any training.
    preflight(TrainConfig(task=args.task, student=args.student, data_dir=args.data_dir))
    teacher, teacher_metrics = resolve_teacher(args, out_dir)
    tcfg, dcfg = base_configs(args, teacher)
    tcfg = preflight(tcfg)
    cache = prepare_teacher_cache(tcfg, out_dir / "teacher_cache")
    teacher_score = teacher_dev_score(tcfg, cache)
    metric = get_task(args.task).metric
    print(f"teacher {tcfg.teacher}: dev {metric} {teacher_score:.4f}"
          + (f" (fine-tuned here, {teacher_metrics['epoch']:.0f} epochs)" if teacher_metrics else ""))

    tracking_uri = args.tracking_uri or default_tracking_uri(out_dir)
    client = MlflowClient(tracking_uri)
    experiment_id = ensure_experiment(client, args.experiment or f"sinkd-reproduce-{args.task}",
                                      (out_dir / "mlartifacts").as_uri() if not args.tracking_uri else None)

    records_file = out_dir / "runs.jsonl"
    done = {}
    if records_file.exists():
        for line in records_file.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                done[record["key"]] = record

    rows = list(dict.fromkeys(row for t in tables for row in TABLES[t][1]))
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    specs, configs = [], {}
    for seed in range(args.seeds):  # seed-major, so a partial run already covers every row for seed 0
        for row in rows:
            run_tcfg, run_dcfg = replace(tcfg, seed=seed), row_config(dcfg, row, row_values(args))
            key = run_key(run_tcfg, run_dcfg)
            configs[key] = (run_tcfg, run_dcfg)
            if key in done:
                continue
            specs.append({"train": asdict(run_tcfg), "distill": run_dcfg.to_dict(), "cache": cache,
                          "threads": threads, "record": {"row": row, "seed": seed, "key": key}})
    print(f"{len(rows)} rows x {args.seeds} seeds: {len(specs)} to train, "
          f"{len(rows) * args.seeds - len(specs)} reused from {records_file}")

    def finished(record: dict) -> None:
        done[record["key"]] = record
        with records_file.open("a") as f:
            f.write(json.dumps(record) + "\n")
        log_to_mlflow(client, experiment_id, record, *configs[record["key"]])
        print(f"  {record['row']:8s} seed {record['seed']}: best dev {metric} {record['best']:.4f} "
              f"(final {record['final']:.4f}) in {record['wall_s']:.0f}s", flush=True)

    if args.jobs == 1:
        for spec in specs:
            finished(train_one(spec))
    else:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            for future in as_completed([pool.submit(train_one, spec) for spec in specs]):
                finished(future.result())

    records: dict[str, list[dict]] = {}
    for seed in range(args.seeds):
        for row in rows:
            key = run_key(replace(tcfg, seed=seed), row_config(dcfg, row, row_values(args)))
            records.setdefault(row, []).append(done[key])
    header = (f"## SinKD ablations — {args.task}, {args.seeds} seeds\n\n"
              f"Teacher `{Path(tcfg.teacher).name}`; student `{Path(args.student).name}`"
              f"{f' (first {args.student_layers} layers)' if args.student_layers else ''}; {tcfg.epochs} epochs, "
              f"lr {tcfg.lr:g}, b {dcfg.batch_size}, α {dcfg.alpha:g}, τ_KL {dcfg.tau_kl:g}, β {dcfg.beta:g} "
              f"({args.sinkhorn_scale_preset} Sinkhorn scale), τ_SD {dcfg.tau_sd:g}, λ {dcfg.sinkhorn_lambda:g}, "
              f"T {dcfg.sinkhorn_iters}, max length {tcfg.max_length}. Metric: best dev {metric} over the "
              f"per-epoch evaluations. Wall time of this invocation: {time.time() - t_start:.0f} s.")
    markdown, rows_csv = summarise(records, tables, metric, teacher_score, header)
    md_path, csv_path = out_dir / f"reproduce-{args.task}.md", out_dir / f"reproduce-{args.task}.csv"
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
