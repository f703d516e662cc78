"""`make demo`'s plan (sinkd_ray/demo.py): what fits the budget follows the host's measured speed."""

import pytest

from sinkd_ray.demo import COLA_TRAIN, Plan, plan_for, study_argv
from sinkd_ray.errors import SinkdError


def test_a_fast_host_trains_on_all_of_cola_and_a_slower_one_on_less_within_the_same_budget():
    fast = plan_for(teacher_rate=60.0, student_rate=250.0, bf16=True, compute_s=18 * 60)
    assert (fast.teacher_examples, fast.student_examples) == (COLA_TRAIN, COLA_TRAIN)
    slow = plan_for(teacher_rate=8.0, student_rate=40.0, bf16=False, compute_s=18 * 60)
    assert 1000 <= slow.teacher_examples < COLA_TRAIN and 1000 <= slow.student_examples < COLA_TRAIN
    for plan in (fast, slow):
        assert plan.expected_s <= 18 * 60 + 1  # the plan fits the time it was given
    assert "float32 host at ~8 examples/s" in slow.line() and "expect ~" in slow.line()


def test_a_host_too_slow_for_a_demo_with_signal_is_told_so_in_one_line():
    with pytest.raises(SinkdError, match="too few examples for a demo with signal — give it more time"):
        plan_for(teacher_rate=0.5, student_rate=2.0, bf16=False, compute_s=18 * 60)


def test_the_plan_becomes_the_study_command():
    class Args:
        storage_path, data_dir = "runs/demo", "data"

    argv = study_argv(Plan(False, 8.0, 40.0, 3000, 2500, 900.0), Args)

    def value(flag):
        return argv[argv.index(flag) + 1]

    assert value("--teacher-max-train-examples") == "3000" and value("--max-train-examples") == "2500"
    assert "--no-bf16" in argv and value("--search-space") == "demo" and "--ce-baseline" in argv
    assert value("--teacher-epochs") == "1" and value("--teacher-lr") == "5e-5"  # 3e-5 left a short teacher at MCC 0
