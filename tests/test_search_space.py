"""Search-space files: the shipped ones are valid, and every kind of bad file is one clear line."""

import pytest

from sinkd_ray.errors import SinkdError
from sinkd_ray.search_space import SEARCH_SPACES_DIR, load_search_space


def test_paper_grid_is_the_papers_grid_exactly():
    space = load_search_space("paper_grid", task="cola")
    assert space.sampler == "grid"
    assert space.grid() == {
        "lr": [2e-5, 3e-5, 4e-5, 5e-5],
        "alpha": [0.8, 0.9, 1.0],
        "batch_size": [16, 32, 64],
        "tau_kl": [1.0, 2.0, 3.0, 4.0],
    }
    assert space.grid_size() == 144
    distill, train = space.split({})
    assert distill == {
        "tau_sd": 2.0,
        "sinkhorn_lambda": 0.1,
        "sinkhorn_iters": 20,
        "beta": 0.8,
        "sinkhorn_mass": "batch",
        "sinkhorn_scale": 0.001,
        "kl_tau_squared": False,
    }
    assert train == {"epochs": 20, "logit_space": "paper"}  # the released CoLA script; Sec. 5.4


@pytest.mark.parametrize("path", sorted(SEARCH_SPACES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_space_loads_for_every_task(path):
    for task in ("cola", "sst2", "mrpc", "qqp", "mnli", "qnli", "rte", "superglue-rte", "cb"):
        space = load_search_space(str(path), task=task)
        assert space.search and space.optuna_space().keys() == space.search.keys()


def test_default_space_searches_all_the_papers_knobs():
    space = load_search_space("default")
    assert {"lr", "alpha", "beta", "batch_size", "tau_kl", "tau_sd", "sinkhorn_lambda"} <= set(space.search)
    assert space.search["lr"].kind == "loguniform"
    assert 0.0 in space.search["gamma"].values  # the ranking term, with "off" reachable


def test_ranking_and_online_teacher_are_searchable(tmp_path):
    path = tmp_path / "related.yaml"
    path.write_text(
        "search:\n  gamma: {uniform: [0.0, 1.0]}\n  online_teacher: {choice: [false, true]}\n"
        "  online_lr: {loguniform: [1.0e-5, 1.0e-3]}\nfixed:\n  ranking_k: 3\n"
    )
    space = load_search_space(str(path))
    assert space.search["online_teacher"].values == (False, True)
    distill_fixed, _ = space.split({})
    assert distill_fixed["ranking_k"] == 3
    assert set(space.optuna_space()) == {"gamma", "online_teacher", "online_lr"}


def test_task_overrides_apply_only_to_their_task():
    assert load_search_space("paper_grid", task="rte").split({})[1] == {"epochs": 5, "logit_space": "paper"}
    assert load_search_space("paper_grid", task="cb").split({})[1] == {"logit_space": "paper"}


@pytest.mark.parametrize(
    "text, message",
    [
        ("search:\n  alhpa: {uniform: [0.1, 0.9]}\n", "unknown key 'alhpa' — known keys: alpha"),
        ("search:\n  alpha: {uniform: [0.9, 0.1]}\n", "key 'alpha': empty range [0.9, 0.1]"),
        ("search:\n  alpha: {uniform: [0.5, 1.5]}\n", "key 'alpha': alpha=1.5 is outside [0, 1]"),
        ("search:\n  lr: {loguniform: [0, 1.0e-4]}\n", "key 'lr': loguniform needs low > 0"),
        ("search:\n  alpha: {normal: [0, 1]}\n", "key 'alpha': expected one of {uniform, loguniform, int, choice"),
        ("search:\n  batch_size: {choice: []}\n", "key 'batch_size': choice needs a non-empty list"),
        ("search:\n  batch_size: {choice: [16, 1]}\n", "key 'batch_size': batch_size=1 is outside [2, inf)"),
        ("search:\n  sinkhorn_iters: {int: [5, 20.5]}\n", "key 'sinkhorn_iters': int needs integer bounds"),
        ("fixed:\n  tau_sd: hot\n", "key 'tau_sd': tau_sd='hot' must be a number"),
        ("fixed:\n  sinkhorn_variant: diagonal\n", "key 'sinkhorn_variant': sinkhorn_variant='diagonal' is not one of"),
        ("fixed:\n  epochs: 0\n", "key 'epochs': epochs=0 is outside [1, inf)"),
        ("fixed:\n  student: bert\n", "unknown key 'student'"),
        ("search:\n  beta: {uniform: [0, 1]}\nfixed:\n  beta: 0.8\n", "are both searched and fixed"),
        ("sampler: grid\nsearch:\n  lr: {loguniform: [1.0e-5, 1.0e-4]}\n", "sampler 'grid' needs 'choice' lists"),
        ("sampler: random\n", "sampler 'random' — use 'tpe' or 'grid'"),
        ("serach:\n  lr: {choice: [1.0e-5]}\n", "unknown top-level key(s) ['serach']"),
        ("- just a list\n", "expected a mapping"),
        ("search: {lr: [1\n", "not valid YAML"),
        ("tasks:\n  rte: {fixed: {alpha: 2.0}}\n", "tasks.rte fixed: key 'alpha': alpha=2.0 is outside [0, 1]"),
        ("search:\n  gamma: {uniform: [-1.0, 1.0]}\n", "key 'gamma': gamma=-1.0 is outside [0, inf)"),
        ("fixed:\n  online_teacher: maybe\n", "key 'online_teacher'"),
    ],
)
def test_bad_files_are_one_line_errors_naming_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SinkdError) as err:
        load_search_space(str(path))
    assert message in str(err.value)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_unknown_space_name_lists_the_shipped_ones():
    with pytest.raises(SinkdError, match="one of: default, demo, paper_grid"):
        load_search_space("papergrid")
