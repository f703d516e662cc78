"""The task registry: GLUE and SuperGLUE classification tasks as SinKD sees them.

A :class:`Task` says where a task lives on the Hugging Face hub, which text columns form an input, what its
labels are (in the hub's label-id order, which is what makes hub and local copies agree), which metric the
paper reports, and how a generative model (encoder-decoder or decoder-only) is prompted for it.

The paper's seven GLUE tasks (CoLA, SST-2, MRPC, QQP, MNLI, QNLI, RTE) plus SuperGLUE RTE and CB are here.
STS-B is deliberately absent: it is regression, and SinKD distils distributions over classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from sinkd_ray.errors import SinkdError

GLUE_HUB_ID = "nyu-mll/glue"
# The parquet copy of SuperGLUE; the old script-based `super_glue` id no longer loads with datasets >= 4.
SUPER_GLUE_HUB_ID = "aps/super_glue"
METRICS = ("accuracy", "mcc", "f1", "macro_f1")  # what `compute_metrics` computes; a task picks by name


@dataclass(frozen=True)
class ReleaseFormat:
    """How a benchmark task is laid out in its original release, read by `data.read_local_split` from
    ``--data-dir``: ``folder`` (``CoLA``, ``SST-2``, …), ``files`` (our split → file name), ``columns`` (text field →
    column name, or position for header-less files), ``label_column``, ``label_is_name`` (class names, else ids),
    ``has_header``, ``jsonl`` (JSON lines instead of tab-separated)."""

    folder: str
    files: tuple[tuple[str, str], ...]
    columns: tuple[tuple[str, str | int], ...]
    label_column: str | int
    label_is_name: bool
    has_header: bool = True
    jsonl: bool = False


_GLUE_FILES = (("train", "train.tsv"), ("dev", "dev.tsv"))
_SUPERGLUE_FILES = (("train", "train.jsonl"), ("dev", "val.jsonl"))


@dataclass(frozen=True)
class Task:
    """One classification task.

    Attributes:
        name: registry name (``cola``, ``sst2``, ``mrpc``, ``qqp``, ``mnli``, ``qnli``, ``rte``,
            ``superglue-rte``, ``cb``).
        benchmark: ``"glue"`` or ``"super_glue"``.
        hub_id, hub_config: arguments of ``datasets.load_dataset(hub_id, hub_config)``.
        text_fields: the hub's column names of the input: one (single sentence) or two (a pair).
        label_names: class names in the hub's label-id order: ``label_names[i]`` is class id ``i``.
        metric: key of the primary metric in :func:`compute_metrics`'s result (``mcc``, ``f1``, ``accuracy``).
        metric_mode: ``"max"``: every primary metric here is better when larger.
        dev_splits: our names of the evaluation splits; the first is the one model selection uses
            (MNLI: ``("dev", "dev_mismatched")``, "dev" being the matched set).
        hub_splits: our split name -> the hub's split name.
        template: prompt for generative models, ``str.format``-ed with the text fields; it ends where the
            answer word goes (no trailing space: the verbalizer word is scored with a leading space).
        verbalizer: one single, common English word per class, in label-id order.
        also_report: metrics reported beside the primary one (QQP: F1 beside the paper's accuracy).
        release: the local release format read from ``--data-dir`` (benchmarks).
        files: a task of the user's own (`sinkd_ray.task_files`): its files, columns and label mapping.
    """

    name: str
    benchmark: str
    hub_id: str | None
    hub_config: str | None
    text_fields: tuple[str, ...]
    label_names: tuple[str, ...]
    metric: str
    template: str
    verbalizer: tuple[str, ...]
    dev_splits: tuple[str, ...] = ("dev",)
    hub_splits: tuple[tuple[str, str], ...] = (("train", "train"), ("dev", "validation"))
    metric_mode: str = "max"
    also_report: tuple[str, ...] = ()
    positive_label: int = 1  # the class whose F1 "f1" reports
    release: ReleaseFormat | None = None
    files: Any = None  # task_files.TaskFiles for a task of the user's own
    verbalizer_given: bool = True  # False: the label names stand in (checked to be one token each)

    def __post_init__(self) -> None:
        # Registry consistency; a wrong entry here would silently mislabel every example.
        assert self.benchmark in ("glue", "super_glue", "custom"), self.benchmark
        assert 1 <= len(self.text_fields) <= 2, self.text_fields
        assert len(self.verbalizer) == len(self.label_names), (self.verbalizer, self.label_names)
        assert len(set(self.verbalizer)) == len(self.verbalizer), self.verbalizer
        assert all(w == w.strip() and w for w in self.verbalizer), self.verbalizer
        assert self.metric in METRICS and set(self.also_report) <= set(METRICS), (self.metric, self.also_report)
        assert self.dev_splits[0] == "dev" and {s for s, _ in self.hub_splits} >= {"train", *self.dev_splits}

    @property
    def key(self) -> str:
        """What identifies the task's examples in caches: the name, and for a task of the user's own the digest of
        its definition and files (an edited file gets new teacher logits)."""
        return self.name if self.files is None else f"{self.name}-{self.files.digest}"

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def is_pair(self) -> bool:
        return len(self.text_fields) == 2

    @property
    def splits(self) -> tuple[str, ...]:
        """Our split names for this task: ``train`` plus the dev split(s)."""
        return ("train", *self.dev_splits)

    def hub_split(self, split: str) -> str:
        """The hub's name of our split ``split`` (e.g. ``dev`` -> ``validation``)."""
        return dict(self.hub_splits)[split]

    def render_prompt(self, example: dict) -> str:
        """The prompt for one example: ``template.format(**{field: example[field]})``."""
        return self.template.format(**{field: example[field] for field in self.text_fields})


_BINARY_NLI = ("entailment", "not_entailment")

_TASKS = (
    Task(
        name="cola",
        benchmark="glue",
        hub_id=GLUE_HUB_ID,
        hub_config="cola",
        text_fields=("sentence",),
        label_names=("unacceptable", "acceptable"),
        metric="mcc",
        template="Sentence: {sentence}\nIs this sentence grammatically correct? Answer:",
        verbalizer=("no", "yes"),
        release=ReleaseFormat("CoLA", _GLUE_FILES, (("sentence", 3),), 1, label_is_name=False, has_header=False),
    ),
    Task(
        name="sst2",
        benchmark="glue",
        hub_id=GLUE_HUB_ID,
        hub_config="sst2",
        text_fields=("sentence",),
        label_names=("negative", "positive"),
        metric="accuracy",
        template="Review: {sentence}\nIs this review positive? Answer:",
        verbalizer=("no", "yes"),
        release=ReleaseFormat("SST-2", _GLUE_FILES, (("sentence", "sentence"),), "label", label_is_name=False),
    ),
    Task(
        name="mrpc",
        benchmark="glue",
        hub_id=GLUE_HUB_ID,
        hub_config="mrpc",
        text_fields=("sentence1", "sentence2"),
        label_names=("not_equivalent", "equivalent"),
        metric="f1",
        also_report=("accuracy",),
        template="Sentence 1: {sentence1}\nSentence 2: {sentence2}\nDo both sentences mean the same thing? Answer:",
        verbalizer=("no", "yes"),
        release=ReleaseFormat(
            "MRPC",
            _GLUE_FILES,
            (("sentence1", "#1 String"), ("sentence2", "#2 String")),
            "Quality",
            label_is_name=False,
        ),
    ),
    Task(
        name="qqp",
        benchmark="glue",
        hub_id=GLUE_HUB_ID,
        hub_config="qqp",
        text_fields=("question1", "question2"),
        label_names=("not_duplicate", "duplicate"),
        metric="accuracy",  # the paper's (Table 1 reports accuracy and F1); F1 reported beside it
        also_report=("f1",),
        template="Question 1: {question1}\nQuestion 2: {question2}\nDo both questions ask the same thing? Answer:",
        verbalizer=("no", "yes"),
        release=ReleaseFormat(
            "QQP",
            _GLUE_FILES,
            (("question1", "question1"), ("question2", "question2")),
            "is_duplicate",
            label_is_name=False,
        ),
    ),
    Task(
        name="mnli",
        benchmark="glue",
        hub_id=GLUE_HUB_ID,
        hub_config="mnli",
        text_fields=("premise", "hypothesis"),
        label_names=("entailment", "neutral", "contradiction"),
        metric="accuracy",
        template="Premise: {premise}\nHypothesis: {hypothesis}\nDoes the premise entail the hypothesis? Answer:",
        verbalizer=("yes", "maybe", "no"),
        dev_splits=("dev", "dev_mismatched"),
        hub_splits=(("train", "train"), ("dev", "validation_matched"), ("dev_mismatched", "validation_mismatched")),
        release=ReleaseFormat(
            "MNLI",
            (("train", "train.tsv"), ("dev", "dev_matched.tsv"), ("dev_mismatched", "dev_mismatched.tsv")),
            (("premise", "sentence1"), ("hypothesis", "sentence2")),
            "gold_label",
            label_is_name=True,
        ),
    ),
    Task(
        name="qnli",
        benchmark="glue",
        hub_id=GLUE_HUB_ID,
        hub_config="qnli",
        text_fields=("question", "sentence"),
        label_names=_BINARY_NLI,
        metric="accuracy",
        template="Question: {question}\nSentence: {sentence}\nDoes the sentence answer the question? Answer:",
        verbalizer=("yes", "no"),
        release=ReleaseFormat(
            "QNLI", _GLUE_FILES, (("question", "question"), ("sentence", "sentence")), "label", label_is_name=True
        ),
    ),
    Task(
        name="rte",
        benchmark="glue",
        hub_id=GLUE_HUB_ID,
        hub_config="rte",
        text_fields=("sentence1", "sentence2"),
        label_names=_BINARY_NLI,
        metric="accuracy",
        template="Premise: {sentence1}\nHypothesis: {sentence2}\nDoes the premise entail the hypothesis? Answer:",
        verbalizer=("yes", "no"),
        release=ReleaseFormat(
            "RTE", _GLUE_FILES, (("sentence1", "sentence1"), ("sentence2", "sentence2")), "label", label_is_name=True
        ),
    ),
    Task(
        name="superglue-rte",
        benchmark="super_glue",
        hub_id=SUPER_GLUE_HUB_ID,
        hub_config="rte",
        text_fields=("premise", "hypothesis"),
        label_names=_BINARY_NLI,
        metric="accuracy",
        template="Premise: {premise}\nHypothesis: {hypothesis}\nDoes the premise entail the hypothesis? Answer:",
        verbalizer=("yes", "no"),
        release=ReleaseFormat(
            "RTE",
            _SUPERGLUE_FILES,
            (("premise", "premise"), ("hypothesis", "hypothesis")),
            "label",
            label_is_name=True,
            jsonl=True,
        ),
    ),
    Task(
        name="cb",
        benchmark="super_glue",
        hub_id=SUPER_GLUE_HUB_ID,
        hub_config="cb",
        text_fields=("premise", "hypothesis"),
        label_names=("entailment", "contradiction", "neutral"),
        metric="accuracy",
        also_report=("macro_f1",),
        template="Premise: {premise}\nHypothesis: {hypothesis}\nDoes the premise entail the hypothesis? Answer:",
        verbalizer=("yes", "no", "maybe"),
        release=ReleaseFormat(
            "CB",
            _SUPERGLUE_FILES,
            (("premise", "premise"), ("hypothesis", "hypothesis")),
            "label",
            label_is_name=True,
            jsonl=True,
        ),
    ),
)

TASKS: dict[str, Task] = {task.name: task for task in _TASKS}

# Spellings users type (after lower-casing and mapping "_" / " " to "-").
_ALIASES = {
    "sst-2": "sst2",
    "glue-rte": "rte",
    "super-glue-rte": "superglue-rte",
    "superglue-rte": "superglue-rte",
    "rte-superglue": "superglue-rte",
    "superglue-cb": "cb",
    "super-glue-cb": "cb",
    "commitmentbank": "cb",
    "mnli-m": "mnli",
    "mnli-matched": "mnli",
    "qnli-v2": "qnli",
}
_REGRESSION = {"stsb", "sts-b"}


def get_task(name: str | Task) -> Task:
    """The registered task called ``name`` (case-insensitive; ``sst-2``, ``superglue-cb``, … accepted)."""
    if isinstance(name, Task):
        return name
    if str(name).endswith((".yaml", ".yml")):  # a task of the user's own (a local path, or shipped to the storage)
        from sinkd_ray.task_files import load_task_file

        return Task(**load_task_file(str(name), METRICS, frozenset(TASKS)))
    key = str(name).strip().lower().replace("_", "-").replace(" ", "-")
    key = _ALIASES.get(key, key)
    if key in TASKS:
        return TASKS[key]
    if key in _REGRESSION:
        raise SinkdError(
            f"task {name!r} is STS-B, a regression task — SinKD here distils class distributions; "
            f"choose one of {', '.join(TASKS)}"
        )
    raise SinkdError(
        f"unknown task {name!r} — choose one of {', '.join(TASKS)}, or give a task file of your own (task.yaml: "
        "README, 'Your own data')"
    )


def compute_metrics(task: Task | str, predictions, labels) -> dict[str, float]:
    """Task metrics from predicted classes (shape n) or class scores/logits (shape n × d) and gold ids (n).

    Always ``accuracy``, then the task's primary metric (``task.metric``) and those it reports beside it
    (``task.also_report``): ``mcc`` (Matthews correlation), ``f1`` (binary, positive class ``task.positive_label``),
    ``macro_f1`` (mean F1 over all classes). Chosen by the task's settings, never by its name.
    """
    task = get_task(task)
    predictions, labels = (
        x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)  # torch tensors
        for x in (predictions, labels)
    )
    labels = labels.reshape(-1)
    if predictions.ndim == 2:
        predictions = predictions.argmax(axis=-1)
    predictions = predictions.reshape(-1)
    if predictions.shape != labels.shape or labels.size == 0:
        raise SinkdError(
            f"compute_metrics got {predictions.size} predictions for {labels.size} labels — pass one "
            f"prediction per labelled example"
        )
    # imported here: scikit-learn (with SciPy) costs seconds in every Ray process that imports this module, and
    # most of them (trial actors, Train controllers, the CLI) never compute a metric
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    metrics = {"accuracy": float(accuracy_score(labels, predictions))}
    for name in (task.metric, *task.also_report):
        if name == "mcc":
            metrics["mcc"] = float(matthews_corrcoef(labels, predictions))
        elif name == "f1":
            metrics["f1"] = float(
                f1_score(labels, predictions, pos_label=task.positive_label, average="binary", zero_division=0)
            )
        elif name == "macro_f1":
            metrics["macro_f1"] = float(
                f1_score(labels, predictions, labels=list(range(task.num_labels)), average="macro", zero_division=0)
            )
    return metrics
