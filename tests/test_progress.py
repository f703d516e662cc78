"""Progress lines: every long step says where it stands (done / total, speed, time left) at most every ~30 s."""

import re

import pytest
from conftest import spec_for

from sinkd_ray.progress import ProgressLine, duration

LINE = re.compile(r"^(\w[\w ]*): (\d+)/(\d+) (\w+) \((\d+) %\), ([\d.]+) examples/s, ETA (.+?)( \(.*\))?$")


def test_a_line_says_done_total_speed_and_time_left(capsys, monkeypatch):
    clock = iter([0.0, 0.0, 10.0, 45.0])  # created, first update, 10 s, 45 s
    monkeypatch.setattr("sinkd_ray.progress.time.monotonic", lambda: next(clock))
    line = ProgressLine("teacher logits", 1000, every_s=30)
    assert not line.update(0)  # the start
    assert not line.update(300)  # 10 s: too soon for a line
    assert line.update(900, "epoch 1/2")  # 45 s
    text = capsys.readouterr().out.strip()
    name, done, total, unit, pct, rate, eta, extra = LINE.match(text).groups()
    assert (name, done, total, unit, pct, extra) == ("teacher logits", "900", "1000", "examples", "90", " (epoch 1/2)")
    assert float(rate) == pytest.approx(20.0) and eta == "5 s"  # 900 examples in 45 s; 100 left at 20/s


def test_durations_read_as_a_person_would():
    assert [duration(s) for s in (7, 65, 3725)] == ["7 s", "1 min 05 s", "1 h 02 min"]


def test_a_run_prints_training_and_evaluation_progress(
    tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir, capsys, monkeypatch
):
    from sinkd_ray.worker import distill

    monkeypatch.setenv("SINKD_PROGRESS_EVERY_S", "0")
    distill(
        spec_for(tiny_bert_dir, tiny_teacher_dir, cola_fixture_dir, teacher_source="live"), report=lambda m, d: None
    )
    lines = [ln for ln in capsys.readouterr().out.splitlines() if LINE.match(ln)]
    training = [LINE.match(ln).groups() for ln in lines if ln.startswith("training:")]
    assert training and all(total == "12" and unit == "steps" for _, _, total, unit, *_ in training)  # 6 steps × 2
    assert [int(done) for _, done, *_ in training] == sorted(int(done) for _, done, *_ in training)
    assert training[-1][7] == " (epoch 2/2)" and all(float(rate) > 0 for *_, rate, _, _ in training)
    assert any(ln.startswith("evaluating:") for ln in lines)


def test_the_end_of_a_step_longer_than_an_interval_is_said_at_once(capsys, monkeypatch):
    """A step that ends between two lines says so when it ends (once), so its silence and the next step's first
    interval do not add up; a step shorter than one interval stays quiet."""
    clock = iter([0.0, 0.0, 31.0, 50.0, 51.0, 100.0, 100.0, 110.0])
    monkeypatch.setattr("sinkd_ray.progress.time.monotonic", lambda: next(clock))
    long = ProgressLine("training", 100, unit="steps", every_s=30)
    assert not long.update(0)
    assert long.update(60)  # 31 s: the interval's line
    assert long.update(100)  # 50 s: done, 19 s after the last line — said at once
    assert not long.update(100)  # 51 s: not twice
    short = ProgressLine("evaluating", 40, every_s=30)  # created at 100 s
    assert not short.update(0) and not short.update(40)  # done after 10 s: no line needed
    out = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in out] == ["training: 60/100 steps", "training: 100/100 steps"]
