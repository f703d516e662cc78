"""Tasks of the user's own (sinkd_ray/task_files.py): every file format, string or integer labels, pairs, four
classes, a dev split held out of train, each rule a one-line error; the GLUE entries unchanged; a study end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sinkd_ray.data import load_split
from sinkd_ray.errors import SinkdError
from sinkd_ray.tasks import compute_metrics, get_task

REPO = Path(__file__).resolve().parents[1]
WORDS = {"billing": "invoice charge refund payment", "tech": "crash error bug login", "sales": "price quote buy demo"}
WORDS["other"] = "hello thanks question weather"


def _tickets(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(text, queue): the queue is the one whose words the ticket uses — a rule a tiny model learns."""
    import random

    rng = random.Random(seed)
    queues = list(WORDS)
    rows = []
    for i in range(n):
        queue = queues[i % 4]
        rows.append((" ".join(rng.sample(WORDS[queue].split(), 3)) + " please", queue))
    return rows


def write_task(folder: Path, kind: str = "csv", header: bool = True, dev: bool = True, extra: str = "") -> Path:
    """A 4-class ticket task in ``kind`` format; its task file."""
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 96), ("dev", 32)) if dev else (("train", 96),):
        frame = pd.DataFrame(_tickets(n, seed=len(split)), columns=["text", "queue"])
        path = folder / f"{split}.{kind}"
        if kind == "csv":
            frame.to_csv(path, index=False, header=header)
        elif kind == "tsv":
            frame.to_csv(path, index=False, sep="\t", header=header)
        elif kind == "jsonl":
            frame.to_json(path, orient="records", lines=True)
        elif kind == "json":
            frame.to_json(path, orient="records")
        else:
            frame.to_parquet(path)
    columns = "text: text\nlabel: queue\n" if header else "text: '0'\nlabel: '1'\nheader: false\n"
    task = folder / "task.yaml"
    task.write_text(f"name: tickets\ntrain: train.{kind}\n" + (f"dev: dev.{kind}\n" if dev else "") + columns + extra)
    return task


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl", "json", "parquet"])
def test_every_format_reads_to_the_same_examples_with_string_labels(tmp_path, kind):
    task = get_task(str(write_task(tmp_path / kind, kind)))
    assert task.name == "tickets" and task.label_names == ("billing", "other", "sales", "tech")  # train's, sorted
    train, dev = load_split(task, "train"), load_split(task, "dev")
    assert (len(train), len(dev)) == (96, 32) and train.column_names == ["text", "label", "idx"]
    first_text, first_queue = _tickets(96, seed=5)[0]
    assert train[0]["text"] == first_text and task.label_names[train[0]["label"]] == first_queue
    assert list(train["idx"]) == list(range(96))


def test_a_csv_without_a_header_names_its_columns_by_position(tmp_path):
    task = get_task(str(write_task(tmp_path, "csv", header=False)))
    assert task.text_fields == ("0",) and len(load_split(task, "train")) == 96


def test_integer_labels_sort_as_numbers_and_given_names_fix_the_order(tmp_path):
    folder = tmp_path / "ints"
    folder.mkdir()
    (folder / "train.csv").write_text("q1,q2,y\n" + "".join(f"a{i},b{i},{[2, 10, 1][i % 3]}\n" for i in range(30)))
    (folder / "task.yaml").write_text("name: pairs\ntrain: train.csv\ntext: [q1, q2]\nlabel: y\n")
    task = get_task(str(folder / "task.yaml"))
    assert task.label_names == ("1", "2", "10") and task.is_pair  # 2 < 10 as numbers
    (folder / "named.yaml").write_text("train: train.csv\ntext: [q1, q2]\nlabel: y\nlabel_names: [10, 2, 1]\n")
    named = get_task(str(folder / "named.yaml"))
    assert named.name == "named" and named.label_names == ("10", "2", "1")
    assert load_split(named, "train")[0]["label"] == 1  # the first row's label 2 is class 1 of [10, 2, 1]


def test_without_a_dev_file_a_seeded_stratified_tenth_of_train_is_dev_and_said_once(tmp_path, capsys):
    task = get_task(str(write_task(tmp_path, "csv", dev=False)))
    train, dev = load_split(task, "train"), load_split(task, "dev")
    assert (len(train), len(dev)) == (86, 10)
    assert sorted(set(dev["label"])) == [0, 1, 2, 3]  # stratified: every class in dev
    assert not set(train["text"]) & set(dev["text"]) or len(set(train["text"])) < 86  # disjoint rows
    again = load_split(task, "dev")
    assert list(again["text"]) == list(dev["text"])  # fixed seed: the same every time
    assert capsys.readouterr().out.count("no dev file") == 1


def test_the_metric_is_the_tasks_setting(tmp_path):
    task = get_task(str(write_task(tmp_path, "csv", extra="metric: macro_f1\n")))
    metrics = compute_metrics(task, [0, 1, 2, 3, 0], [0, 1, 2, 3, 1])
    assert task.metric == "macro_f1" and set(metrics) == {"accuracy", "macro_f1"}


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda d: (d / "task.yaml").write_text("train: train.csv\ntext: body\nlabel: queue\n"),
            "no column 'body' — its columns: text, queue",
        ),
        (lambda d: (d / "train.csv").write_text("text,queue\n"), "holds no examples"),
        (lambda d: (d / "train.csv").write_bytes(b"text,queue\n\xff\xfe\x00bad,1\n"), "is not UTF-8 text"),
        (
            lambda d: (d / "train.csv").write_text("text,queue\na,billing\nb,\nc,tech\n"),
            "1 row(s) have no label (first at row 2)",
        ),
        (
            lambda d: (d / "dev.csv").write_text("text,queue\na,billing\nb,refunds\n"),
            "dev split has label(s) ['refunds'] that train lacks",
        ),
        (lambda d: (d / "train.csv").write_text("text,queue\na,billing\nb,billing\n"), "one class only ('billing')"),
        (lambda d: (d / "task.yaml").write_text("train: nope.csv\ntext: text\nlabel: queue\n"), "nope.csv not found"),
        (
            lambda d: (d / "task.yaml").write_text("train: train.csv\ntext: text\nlabel: queue\nmetric: auc\n"),
            "metric 'auc'",
        ),
        (
            lambda d: (d / "task.yaml").write_text("train: train.csv\ntext: text\nlabel: queue\nlabels: [a]\n"),
            "unknown key(s) ['labels']",
        ),
        (
            lambda d: (d / "task.yaml").write_text("name: cola\ntrain: train.csv\ntext: text\nlabel: queue\n"),
            "a built-in task's",
        ),
    ],
)
def test_each_rule_is_a_one_line_error_that_says_what_to_do(tmp_path, change, message):
    folder = tmp_path / "t"
    write_task(folder, "csv")
    change(folder)
    with pytest.raises(
        SinkdError,
        match="^task file .*" + message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]"),
    ) as info:
        get_task(str(folder / "task.yaml"))
    assert "\n" not in str(info.value)


def test_a_class_too_small_for_the_held_out_dev_split_is_refused(tmp_path):
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "train.csv").write_text("text,queue\n" + "".join(f"t{i},a\nu{i},b\n" for i in range(10)) + "v,c\n")
    (folder / "task.yaml").write_text("train: train.csv\ntext: text\nlabel: queue\n")
    with pytest.raises(SinkdError, match=r"class\(es\) \['c'\] have fewer than 2 train examples"):
        get_task(str(folder / "task.yaml"))


def test_label_names_that_are_not_one_word_need_a_verbalizer_for_a_generative_student(tmp_path, tiny_gptneo_dir):
    from sinkd_ray.models import load_student

    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "train.csv").write_text(
        "text,y\n" + "".join(f"the dog {i},not_good\nthe cat {i},good\n" for i in range(8))
    )
    (folder / "task.yaml").write_text("train: train.csv\ntext: text\nlabel: y\n")
    task = get_task(str(folder / "task.yaml"))
    with pytest.raises(SinkdError, match=r"label\(s\) \['not_good'\] are not one word .* verbalizer"):
        load_student(str(tiny_gptneo_dir), task)
    (folder / "task.yaml").write_text(
        "train: train.csv\ntext: text\nlabel: y\nverbalizer: {not_good: bad, good: good}\n"
    )
    student = load_student(str(tiny_gptneo_dir), get_task(str(folder / "task.yaml")))
    assert student.label_words == ("good", "bad")  # class order: good, not_good (sorted)


def test_the_glue_entries_give_the_examples_they_always_gave(shared_data):
    """Row counts and first examples of the staged GLUE / SuperGLUE files (shared/data/README.md), read through the
    task entries that now carry their release formats."""
    expected = {
        ("cola", "train"): (8551, "Our friends won't buy this analysis, let alone the next one we propose.", 1),
        ("cola", "dev"): (1043, "The sailors rode the breeze clear of the rocks.", 1),
        ("sst2", "dev"): (872, "it 's a charming and often affecting journey . ", 1),
        ("rte", "dev"): (277, "Dana Reeve, the widow of the actor Christopher Reeve, has died", 1),
        ("superglue-rte", "train"): (2490, None, None),
        ("qnli", "dev"): (5463, "What came into force after the new constitution was herald?", 0),
    }
    for (name, split), (rows, first, label) in expected.items():
        data = load_split(name, split, shared_data)
        assert len(data) == rows, (name, split)
        if first is not None:
            task = get_task(name)
            text = data[0][task.text_fields[0]]
            assert text.startswith(first) and data[0]["label"] == label, (name, split)


@pytest.mark.ray
def test_a_study_on_a_four_class_csv_registers_a_student_that_answers_with_the_label_names(
    tmp_path, ray_runtime, tiny_bert_dir
):
    """The task file through the real CLI: the teacher fine-tuned on it, the study, the registry entry named after
    the task; the registered student's pipeline answers with the queue names."""
    task = write_task(tmp_path / "tickets", "csv", extra="metric: macro_f1\n")
    space = tmp_path / "space.yaml"
    space.write_text("sampler: grid\nsearch:\n  lr: {choice: [1.0e-2]}\nfixed:\n  batch_size: 16\n  epochs: 2\n")
    argv = [
        "--task",
        str(task),
        "--teacher-base",
        str(tiny_bert_dir),
        "--teacher-epochs",
        "2",
        "--teacher-lr",
        "1e-2",
        "--student",
        str(tiny_bert_dir),
        "--student-layers",
        "2",
        "--search-space",
        str(space),
        "--max-length",
        "32",
        "--no-bf16",
        "--seed",
        "0",
        "--storage-path",
        str(tmp_path / "runs"),
        "--name",
        "own",
    ]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(
        [sys.executable, "-m", "sinkd_ray.tune", *argv],
        cwd=REPO,
        env={**env, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "registered model: sinkd-tickets-student version 1" in proc.stdout and "dev macro_f1" in proc.stdout
    from transformers import pipeline

    exported = pipeline("text-classification", model=str(tmp_path / "runs" / "own" / "best_student"))
    assert exported("refund payment invoice please")[0]["label"] in WORDS
    code = (
        "import json, mlflow; pipe = mlflow.transformers.load_model('models:/sinkd-tickets-student@best'); "
        "print(json.dumps([pipe('crash login bug please')[0]['label'], sorted(pipe.model.config.id2label.values())]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}", "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    label, names = json.loads(out.stdout.strip().splitlines()[-1])
    assert label in WORDS and names == sorted(WORDS)
