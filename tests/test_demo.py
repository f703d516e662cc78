"""`make demo`'s plan (sinkd_ray/demo.py): what fits the budget follows the host's measured speed."""

import pytest

from sinkd_ray.demo import COLA_TRAIN, MIN_STUDENT_EXAMPLES, MIN_TEACHER_EXAMPLES, Plan, _cost, plan_for, study_argv
from sinkd_ray.errors import SinkdError


def test_a_fast_host_trains_on_all_of_cola_and_a_slower_one_on_less_within_the_same_budget():
    fast = plan_for(teacher_rate=60.0, student_rate=250.0, bf16=True, compute_s=18 * 60)
    assert (fast.teacher_examples, fast.student_examples) == (COLA_TRAIN, COLA_TRAIN)
    slow = plan_for(teacher_rate=14.0, student_rate=80.0, bf16=False, compute_s=18 * 60)
    assert MIN_TEACHER_EXAMPLES <= slow.teacher_examples < COLA_TRAIN
    assert MIN_STUDENT_EXAMPLES <= slow.student_examples < COLA_TRAIN
    for plan in (fast, slow):
        assert plan.expected_s <= 18 * 60 + 1  # the plan fits the time it was given
    # the plan is the most that fits: a little more data for the students would not
    assert _cost(14.0, 80.0, slow.teacher_examples, slow.student_examples + 50) > 18 * 60
    assert "float32 host at ~14 examples/s" in slow.line() and "expect ~" in slow.line()
    assert "too few" not in slow.line()


def test_a_host_too_slow_for_signal_in_the_budget_is_told_how_long_it_needs():
    # float32 on a 2-core AVX2 host, as measured in a study; ~15 minutes left after the install and measuring
    with pytest.raises(SinkdError, match=r"too few examples for a demo with signal, which needs ~3\d min"):
        plan_for(teacher_rate=5.5, student_rate=30.0, bf16=False, compute_s=15 * 60)
    longer = plan_for(teacher_rate=5.5, student_rate=30.0, bf16=False, compute_s=15 * 60, extend=True)
    assert (longer.teacher_examples, longer.student_examples) == (MIN_TEACHER_EXAMPLES, MIN_STUDENT_EXAMPLES)
    assert 30 * 60 < longer.expected_s < 40 * 60 and longer.extended_from_s == 15 * 60
    assert longer.line().startswith("demo: 15 min 00 s are too few on this host for a demo with signal")


def test_the_plan_becomes_the_study_command():
    class Args:
        storage_path, data_dir = "runs/demo", "data"

    argv = study_argv(Plan(False, 8.0, 40.0, 3000, 2500, 900.0), Args)

    def value(flag):
        return argv[argv.index(flag) + 1]

    assert value("--teacher-max-train-examples") == "3000" and value("--max-train-examples") == "2500"
    assert "--no-bf16" in argv and value("--search-space") == "demo" and "--ce-baseline" in argv
    assert value("--num-trials") == "2" and "--group-by-length" in argv  # what measure() timed
    assert value("--teacher-epochs") == "1" and value("--teacher-lr") == "5e-5"  # 3e-5 left a short teacher at MCC 0
