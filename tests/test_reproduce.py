"""benchmarks/reproduce.py: its machinery on tiny random models and the CoLA-format fixture (seconds)."""

import csv
import importlib.util
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from sinkd_ray.errors import SinkdError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "benchmarks" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def _argv(out: Path, teacher, student, data, *extra):
    return [
        "--task",
        "cola",
        "--data-dir",
        str(data),
        "--teacher",
        str(teacher),
        "--student",
        str(student),
        "--student-layers",
        "2",
        "--seeds",
        "2",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--lr",
        "1e-3",
        "--max-length",
        "32",
        "--no-bf16",
        "--out-dir",
        str(out),
        *extra,
    ]


def test_reproduce_writes_tables_logs_runs_and_reuses_finished_ones(
    tmp_path, reproduce, tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir, capsys
):
    out = tmp_path / "repro"
    argv = _argv(out, tiny_teacher_dir, tiny_bert_dir, cola_fixture_dir, "--tables", "2,3")
    assert reproduce.main(argv) == 0
    rows = list(csv.DictReader((out / "reproduce-cola.csv").open()))
    # Table 2's five rows and Table 3's two (the SinKD row appears in both, trained once per seed).
    assert [r["row"] for r in rows] == ["ce", "ce_kd", "sinkd", "kd_sd", "ce_sd", "sinkd", "sample"]
    assert all(r["seeds"] == "2" and len(r["per_seed"].split()) == 2 for r in rows)
    markdown = (out / "reproduce-cola.md").read_text()
    assert "Table 2" in markdown and "Table 3" in markdown and "| Teacher |" in markdown
    assert "CE < CE+KD" in markdown and "sample-wise < batch-wise" in markdown

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sinkd-reproduce-cola")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 6 * 2  # unique rows × seeds
    one = runs[0]
    assert "best_dev_metric" in one.data.metrics and one.data.params["alpha"]
    assert client.get_metric_history(one.info.run_id, "dev_metric")

    # Same seed -> same data order and initialisation: the CE-only row (no teacher involved) and the
    # CE + SD row differ only by the Sinkhorn term, so the records share a seed but not a key.
    records = [line for line in (out / "runs.jsonl").read_text().splitlines() if line]
    assert len(records) == 12

    # Rerun: everything is reused, nothing is trained or logged again.
    capsys.readouterr()
    assert reproduce.main(argv) == 0
    assert "0 to train, 12 reused" in capsys.readouterr().out
    assert len(client.search_runs([experiment.experiment_id])) == 12


def test_reproduce_row_settings_match_the_paper_ablations(reproduce):
    from sinkd_ray.config import DistillConfig, RunSpec, TrainConfig
    from sinkd_ray.objective import objective_weights

    base = RunSpec(TrainConfig(), DistillConfig(alpha=0.9, beta=0.8, sinkhorn_scale_preset="released"))
    values = {"gamma": 0.5, "beta": 0.05, "sinkhorn_lambda": 0.2, "sd_share": 0.3}
    rows = {row: reproduce.row_spec(base, row, values, seed=1).distill for row in reproduce.ROWS}
    weights = {row: objective_weights(cfg) for row, cfg in rows.items()}
    assert weights["ce"] == {"ce": pytest.approx(1.0), "kl": 0.0, "sd": 0.0, "rank": 0.0}
    assert weights["ce_kd"]["sd"] == 0.0 and weights["sinkd"]["sd"] == 0.8
    assert weights["kd_sd"]["ce"] == 0.0 and weights["ce_sd"]["kl"] == 0.0
    assert rows["sample"].sinkhorn_variant == "sample" and rows["js"].distribution_term == "js"
    assert rows["ranking"].gamma == 0.5 and rows["online"].online_teacher
    assert rows["sinkd"].sinkhorn_scale == pytest.approx(0.001)
    unit = rows["sinkd_unit"]
    assert (unit.sinkhorn_mass, unit.sinkhorn_scale, unit.beta, unit.sinkhorn_lambda) == ("unit", 1.0, 0.05, 0.2)
    assert reproduce.row_spec(base, "ce", values, seed=1).train.seed == 1
    # generative students: KD and SinKD each in both logit spaces, so Sinkhorn is compared with KD in the same one
    label_kd, label_sd = (reproduce.row_spec(base, row, values, seed=1) for row in ("ce_kd_label", "sinkd_label"))
    assert (label_kd.train.logit_space, label_sd.train.logit_space) == ("label", "label")
    assert weights["ce_kd_label"]["sd"] == 0.0 and weights["sinkd_label"]["sd"] == 0.8
    assert reproduce.row_spec(base, "sinkd_vocab", values, seed=1).train.logit_space == "vocab"
    # the weighting table: unit-mass β as given, the share rows at their ρ, the controls at the best ρ
    for row, beta in (("sinkd_unit_b01", 0.1), ("sinkd_unit_b08", 0.8), ("sinkd_unit_b2", 2.0)):
        assert (rows[row].sinkhorn_mass, rows[row].sinkhorn_scale, rows[row].beta) == ("unit", 1.0, beta)
    assert (rows["share_01"].sd_weighting, rows["share_01"].sd_share, rows["share_03"].sd_share) == ("share", 0.1, 0.3)
    for row, term in (("tvd_share", "tvd"), ("js_share", "js")):
        assert (rows[row].distribution_term, rows[row].sd_weighting, rows[row].sd_share) == (term, "share", 0.3)
        assert reproduce.needs_best_rho(row)
    assert not reproduce.needs_best_rho("share_01")


def test_untyped_fields_take_the_papers_settings_and_typed_flags_win(reproduce):
    """The flags come from the dataclasses; what is not typed is the paper's per-task script and objective."""
    parser = reproduce.build_parser()
    argv = ["--task", "cola", "--student", "s", "--teacher", "t", "--lr", "1e-4"]
    spec = reproduce.base_spec(parser.parse_args(argv), reproduce.explicit_dests(parser, argv))
    assert spec.train.lr == 1e-4  # typed
    assert (spec.train.epochs, spec.distill.batch_size, spec.distill.alpha) == (20, 16, 0.9)  # CoLA's script
    assert not spec.distill.kl_tau_squared and spec.train.logit_space == "paper"
    assert (spec.distill.sinkhorn_mass, spec.distill.sinkhorn_scale) == ("batch", 0.001)
    assert spec.train.max_length == reproduce.TrainConfig().max_length  # the CLIs' default, not a copy of it


@pytest.mark.parametrize(
    "change, match",
    [
        ({"data": "missing"}, "CoLA"),
        ({"teacher": "missing"}, "missing-teacher"),
        ({"extra": ["--tables", "2,9"]}, "unknown table"),
    ],
)
def test_reproduce_exits_with_one_line_when_inputs_are_missing(
    tmp_path, reproduce, tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir, change, match, capsys
):
    data = tmp_path / "nowhere" if change.get("data") else cola_fixture_dir
    teacher = tmp_path / "missing-teacher" if change.get("teacher") else tiny_teacher_dir
    argv = _argv(tmp_path / "out", teacher, tiny_bert_dir, data, *change.get("extra", []))
    with pytest.raises(SinkdError, match=match):
        reproduce.main(argv)
    with pytest.raises(SystemExit) as exit_info:
        reproduce.run_cli(reproduce.main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1
    assert not (tmp_path / "out" / "runs.jsonl").exists()


def test_paired_interval_is_the_student_t_interval_computed_by_hand(reproduce):
    """Three paired differences: mean 0.004667, s = 0.010263 (by hand), t_{0.975, 2} = 4.302653 (the t table), so
    the 95 % interval is 0.004667 ± 4.302653 · 0.010263 / √3 = [−0.020828, +0.030161]."""
    mean, low, high = reproduce.paired_interval([0.002, 0.016, -0.004])
    assert mean == pytest.approx(0.0046667, abs=1e-7)
    assert (low, high) == (pytest.approx(-0.020828, abs=2e-6), pytest.approx(0.030161, abs=2e-6))
    one = reproduce.paired_interval([0.01])
    assert one[0] == 0.01 and all(map(math.isnan, one[1:]))


def test_orderings_hold_only_when_the_paired_interval_excludes_zero(reproduce):
    """Seed 0 lifted every row here (~0.37); rows are compared seed by seed, on the seeds both have, and an ordering
    holds only when the paired difference's 95 % interval excludes 0."""

    def runs(*values):
        return [{"seed": seed, "best": v} for seed, v in enumerate(values)]

    records = {
        "ce": runs(0.332, 0.318, 0.291),
        "ce_kd": runs(0.369, 0.331, 0.311),
        "sinkd": runs(0.371, 0.347, 0.307),
        "sample": runs(0.3706),
        "tvd": runs(0.350, 0.320, 0.280),
        "rkl": runs(0.390, 0.367, 0.328),
    }
    lines = {line.split(":")[0][2:]: line for line in reproduce.orderings(records) if line.startswith("- ")}
    assert "one seed, no interval (Δ +0.0004)" in lines["sample-wise < batch-wise"]
    assert (
        "not shown: the interval includes 0 (Δ +0.0047, 95 % CI [-0.0208, +0.0302], 3 seeds)" in lines["CE+KD < SinKD"]
    )
    # +0.037, +0.013, +0.020 on every seed, yet three seeds leave an interval that includes 0
    assert lines["CE < CE+KD"].startswith("- CE < CE+KD: not shown: the interval includes 0 (Δ +0.0233")
    assert lines["TVD < Sinkhorn"].startswith("- TVD < Sinkhorn: held (Δ +0.0250")  # +0.021, +0.027, +0.027
    assert lines["RKL < Sinkhorn"].startswith("- RKL < Sinkhorn: reversed (Δ -0.0200")  # −0.019, −0.020, −0.021
    # a held-out selection, when recorded, is what a row is reported by (not the best dev epoch)
    chosen = [{"seed": 0, "best": 0.4, "selected": 0.3}, {"seed": 1, "best": 0.5, "selected": 0.2}]
    assert reproduce.paired({"a": chosen, "b": runs(0.1, 0.1)}, "a", "b")[0] == pytest.approx(0.15)


def test_the_best_rho_is_chosen_on_the_held_out_metric_not_on_dev(reproduce):
    def runs(holdout, dev):
        return [{"seed": s, "best": d, "selected": d, "holdout": h} for s, (h, d) in enumerate(zip(holdout, dev))]

    records = {"share_01": runs([0.30, 0.32], [0.40, 0.41]), "share_03": runs([0.33, 0.34], [0.20, 0.21])}
    assert reproduce.best_share(records) == 0.3  # better held out, worse on dev
    assert reproduce.best_share({"share_01": records["share_01"]}) is None  # not every candidate has run yet
    tie = {"share_01": runs([0.3], [0.1]), "share_03": runs([0.3], [0.2])}
    assert reproduce.best_share(tie) == 0.1


def test_a_runs_figures_come_from_the_epoch_chosen_on_the_held_out_slice(reproduce):
    history = [
        {"epoch": 1, "dev_metric": 0.30, "holdout_metric": 0.25, "grad_share_sd": 0.2, "grad_share_ce": 0.8},
        {"epoch": 2, "dev_metric": 0.40, "holdout_metric": 0.28, "grad_share_sd": 0.4, "grad_share_ce": 0.6},
        {"epoch": 3, "dev_metric": 0.45, "holdout_metric": 0.28, "grad_share_sd": 0.3, "grad_share_ce": 0.7},
    ]
    figures = reproduce.summarise_history(history)
    assert (figures["selected"], figures["selected_epoch"], figures["holdout"]) == (0.40, 2, 0.28)  # first of equals
    assert (figures["best"], figures["final"], figures["selected_on"]) == (0.45, 0.45, "holdout")
    assert figures["shares"] == {"ce": pytest.approx(0.7), "sd": pytest.approx(0.3)}
    no_holdout = reproduce.summarise_history([{k: v for k, v in h.items() if k != "holdout_metric"} for h in history])
    assert (no_holdout["selected"], no_holdout["selected_on"]) == (0.45, "dev")


def test_teacher_base_is_fine_tuned_first_even_when_a_generative_model_could_teach_as_is(
    tmp_path, reproduce, tiny_gptneo_dir, monkeypatch
):
    """A decoder's LM head reads label words, so a --teacher decoder is used as is; --teacher-base asks for the
    CE fine-tune first (the teacher the paper distils from), with --teacher-epochs / --teacher-lr."""
    import sinkd_ray.driver as driver

    calls = []
    monkeypatch.setattr(
        driver, "prepare_run", lambda spec, *a, **kw: calls.append((spec, kw)) or SimpleNamespace(spec=spec)
    )
    monkeypatch.setattr(driver, "teacher_dev_score", lambda prepared: 0.5)
    parser = reproduce.build_parser()
    common = ["--task", "cola", "--student", str(tiny_gptneo_dir), "--out-dir", str(tmp_path)]

    def prepare(*flags):
        argv = [*common, *flags]
        return reproduce.prepare(parser.parse_args(argv), reproduce.explicit_dests(parser, argv))

    prepare("--teacher", str(tiny_gptneo_dir))
    spec, kw = calls.pop()
    assert spec.train.teacher == str(tiny_gptneo_dir) and kw["teacher_base"] is None  # used as is

    prepare("--teacher-base", str(tiny_gptneo_dir), "--teacher-epochs", "2", "--teacher-lr", "5e-5")
    spec, kw = calls.pop()
    assert spec.train.teacher is None and kw["teacher_base"] == str(tiny_gptneo_dir)
    assert (kw["teacher_train"].epochs, kw["teacher_train"].lr) == (2, 5e-5)

    with pytest.raises(SinkdError, match="give one of them"):
        prepare("--teacher", str(tiny_gptneo_dir), "--teacher-base", str(tiny_gptneo_dir))
    assert not calls


def sleep_then_pid(seconds: float, folder: str) -> int:
    """A job for `run_in_processes` (module level: spawned processes import it): its pid on disk, then a nap."""
    (Path(folder) / str(os.getpid())).write_text("")
    time.sleep(seconds)
    (Path(folder) / f"{os.getpid()}.done").write_text("")
    return os.getpid()


def test_an_interrupted_reproduction_ends_the_runs_in_progress(reproduce, tmp_path):
    """Ctrl+C (or `kill`, made one by run_cli) while two runs train: both processes end instead of training on."""
    from functools import partial

    def interrupted(_):  # the first run is done; Ctrl+C once the other two are training
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("[0-9]*[0-9]"))) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        reproduce.run_in_processes(partial(sleep_then_pid, folder=str(tmp_path)), [0.5, 10, 10], 3, interrupted)
    pids = [int(p.name) for p in tmp_path.glob("[0-9]*[0-9]")]
    assert len(pids) == 3
    deadline = time.monotonic() + 30  # a bound on the wait, not a performance figure: terminate is asynchronous
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in pids if _alive(pid)]
    # the first run only: the two in progress did not train on (waiting for them, as before, lets both finish)
    assert len(list(tmp_path.glob("*.done"))) == 1


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its parent has not reaped it yet
