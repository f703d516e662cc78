"""Data loading (staged release files, fixtures, a fake hub), tokenisation, global batches and the loader."""

import collections
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from sinkd_ray import data as data_module
from sinkd_ray.data import GlobalBatchSampler, load_split, make_loader, tokenize_split
from sinkd_ray.errors import SinkdError
from sinkd_ray.tasks import TASKS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_data_dir_env(monkeypatch):
    """Tests choose their data source explicitly; a user's SINKD_DATA_DIR must not leak in."""
    monkeypatch.delenv("SINKD_DATA_DIR", raising=False)


# ------------------------------------------------------------------------------------------ staged real files
# (task, split, rows, {label id: count}) from the staged README (the canonical GLUE / SuperGLUE counts).
STAGED = [
    ("cola", "train", 8551, {1: 6023, 0: 2528}),
    ("cola", "dev", 1043, {1: 721, 0: 322}),
    ("sst2", "train", 67349, {1: 37569, 0: 29780}),
    ("sst2", "dev", 872, {1: 444, 0: 428}),
    ("rte", "train", 2490, {0: 1249, 1: 1241}),  # 0 entailment, 1 not_entailment
    ("rte", "dev", 277, {0: 146, 1: 131}),
    ("qnli", "dev", 5463, {0: 2702, 1: 2761}),
    ("superglue-rte", "train", 2490, {0: 1249, 1: 1241}),
    ("superglue-rte", "dev", 277, {0: 146, 1: 131}),
]


@pytest.mark.parametrize("task, split, rows, label_counts", STAGED, ids=[f"{t}-{s}" for t, s, *_ in STAGED])
def test_staged_files_load_with_canonical_counts(shared_data, task, split, rows, label_counts):
    ds = load_split(task, split, data_dir=shared_data)
    assert len(ds) == rows
    assert dict(collections.Counter(ds["label"])) == label_counts
    assert ds.column_names == [*TASKS[task].text_fields, "label", "idx"]
    assert ds["idx"] == list(range(rows))
    assert ds.features["label"].names == list(TASKS[task].label_names)
    assert all(isinstance(text, str) and text for field in TASKS[task].text_fields for text in ds[field])


def test_staged_mrpc_if_present(shared_data):
    # glue/MRPC is in the staged folder but not in its README; canonical MRPC is 3668 / 408 rows.
    if not (shared_data / "glue" / "MRPC" / "train.tsv").is_file():
        pytest.skip("no staged MRPC")
    train, dev = load_split("mrpc", "train", shared_data), load_split("mrpc", "dev", shared_data)
    assert (len(train), len(dev)) == (3668, 408)
    assert dict(collections.Counter(train["label"])) == {1: 2474, 0: 1194}
    assert dict(collections.Counter(dev["label"])) == {1: 279, 0: 129}
    assert train[0]["sentence1"].startswith("Amrozi accused his brother")


def test_staged_rows_are_read_verbatim(shared_data):
    cola = load_split("cola", "train", shared_data)
    assert cola[0] == {
        "sentence": "Our friends won't buy this analysis, let alone the next one we propose.",
        "label": 1,
        "idx": 0,
    }
    assert cola[3056]["sentence"] == 'Susan whispered "Shut up".'
    sst2 = load_split("sst2", "dev", shared_data)
    assert sst2[0]["sentence"].endswith(" ")  # PTB-tokenised with a trailing space, as released
    # RTE train row 427 holds an unbalanced `"`: with quoting on, it would swallow the following rows.
    rte = load_split("rte", "train", shared_data)
    assert rte[427]["sentence1"].count('"') % 2 == 1
    assert rte[427]["sentence1"].startswith("The 38-year-old actress")


def test_glue_and_superglue_rte_agree_row_for_row(shared_data):
    for split in ("train", "dev"):
        glue = load_split("rte", split, shared_data)
        superglue = load_split("superglue-rte", split, shared_data)
        assert glue["label"] == superglue["label"]

        # the same examples in the same order; SuperGLUE drops double quotes that wrap a field
        def unquoted(texts):
            return [t.replace('"', "").strip() for t in texts]

        assert unquoted(glue["sentence1"]) == unquoted(superglue["premise"])
        assert unquoted(glue["sentence2"]) == unquoted(superglue["hypothesis"])


def test_glue_dir_layouts_and_env_var(shared_data, monkeypatch):
    by_glue_subdir = load_split("rte", "dev", data_dir=shared_data)  # <dir>/glue/RTE/dev.tsv
    by_task_parent = load_split("rte", "dev", data_dir=shared_data / "glue")  # <dir>/RTE/dev.tsv
    by_task_dir = load_split("rte", "dev", data_dir=str(shared_data / "glue" / "RTE"))  # the folder itself
    monkeypatch.setenv("SINKD_DATA_DIR", str(shared_data))
    by_env = load_split("rte", "validation")
    assert by_glue_subdir["label"] == by_task_parent["label"] == by_task_dir["label"] == by_env["label"]


def test_staged_file_missing_names_the_path(shared_data):
    # QNLI train is not staged: the error names where it looked and what the folder should hold.
    with pytest.raises(SinkdError) as err:
        load_split("qnli", "train", shared_data)
    message = str(err.value)
    assert str(shared_data / "glue" / "QNLI" / "train.tsv") in message
    assert "QNLI/train.tsv" in message and "\n" not in message


# -------------------------------------------------------------------------------------------- own fixtures
def _write(path: Path, text: str, encoding="utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


MRPC_HEADER = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"


def test_mrpc_pair_tsv_with_bom_header(tmp_path):
    _write(
        tmp_path / "MRPC" / "train.tsv",
        MRPC_HEADER
        + '1\t702876\t702977\tHe said " the witness " .\tReferring to him as " the witness , he left .\n'
        + "0\t2108705\t2108831\tYucaipa owned Dominick 's .\tYucaipa bought Dominick 's in 1995 .\n",
    )
    ds = load_split("mrpc", "train", tmp_path)
    assert ds.column_names == ["sentence1", "sentence2", "label", "idx"]
    assert ds["label"] == [1, 0]
    assert ds[0]["sentence2"] == 'Referring to him as " the witness , he left .'  # unbalanced quote kept
    assert ds[1]["sentence1"] == "Yucaipa owned Dominick 's ."


CB_ROWS = [
    {
        "premise": "It was a complex language.",
        "hypothesis": "the language was peeled down",
        "label": "contradiction",
        "idx": 0,
    },
    {"premise": "Do you think he's coming?", "hypothesis": "he is coming", "label": "neutral", "idx": 1},
    {"premise": "She knew it was raining.", "hypothesis": "it was raining", "label": "entailment", "idx": 2},
    {"premise": 'He said "no.', "hypothesis": "he refused", "label": "entailment", "idx": 3},
]


@pytest.mark.parametrize("folder", ["superglue", "SuperGLUE"])
def test_cb_three_class_jsonl(tmp_path, folder):
    _write(tmp_path / folder / "CB" / "val.jsonl", "".join(json.dumps(r) + "\n" for r in CB_ROWS))
    ds = load_split("superglue-cb", "dev", tmp_path)
    assert ds.column_names == ["premise", "hypothesis", "label", "idx"]
    # hub order: entailment 0, contradiction 1, neutral 2
    assert ds["label"] == [1, 2, 0, 0]
    assert ds[3]["premise"] == 'He said "no.'


MNLI_HEADER = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
    "sentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n"
)


def _mnli_row(i, premise, hypothesis, gold):
    parses = "( x )\t( y )\t(ROOT x)\t(ROOT y)"
    return f"{i}\t{i}\t{i}e\tfiction\t{parses}\t{premise}\t{hypothesis}\t" + "\t".join([gold] * 6) + "\n"


def _write_mnli(root: Path) -> None:
    rows = [
        _mnli_row(0, "The cat sat.", "A cat sat.", "entailment"),
        _mnli_row(1, 'He said "go.', "He spoke.", "neutral"),
        _mnli_row(2, "It is day.", "It is night.", "contradiction"),
    ]
    for name in ("train.tsv", "dev_matched.tsv"):
        _write(root / "MNLI" / name, MNLI_HEADER + "".join(rows))
    _write(root / "MNLI" / "dev_mismatched.tsv", MNLI_HEADER + rows[2])


def test_mnli_fixture_matched_and_mismatched(tmp_path):
    _write_mnli(tmp_path / "glue")
    train = load_split("mnli", "train", tmp_path)
    assert train.column_names == ["premise", "hypothesis", "label", "idx"]
    assert train["label"] == [0, 1, 2]  # entailment, neutral, contradiction
    assert train[1]["premise"] == 'He said "go.'
    assert load_split("mnli", "dev", tmp_path)["label"] == [0, 1, 2]
    mismatched = load_split("mnli", "dev_mismatched", tmp_path)
    assert mismatched["label"] == [2] and mismatched[0]["hypothesis"] == "It is night."
    with pytest.raises(SinkdError, match="dev_mismatched"):
        load_split("rte", "dev_mismatched", tmp_path)


def test_qqp_fixture(tmp_path):
    _write(
        tmp_path / "QQP" / "dev.tsv",
        "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
        "201359\t303345\t303346\tWhy are African-Americans so beautiful?\tWhy are hispanics so beautiful?\t0\n"
        '263843\t69383\t380476\tI want to pursue PhD in Computer Science about "social network?\t'
        "How do I pursue a PhD?\t1\n",
    )
    ds = load_split("qqp", "dev", tmp_path)
    assert ds.column_names == ["question1", "question2", "label", "idx"]
    assert ds["label"] == [0, 1] and ds[1]["question1"].endswith('"social network?')


def test_cola_fixture_without_header_and_unbalanced_quotes(tmp_path):
    _write(
        tmp_path / "CoLA" / "train.tsv",
        'gj04\t1\t\tSusan whispered "Shut up.\ngj04\t0\t*\tThe more does Bill smoke.\ngj04\t1\t\tnull\n',
    )  # a sentence that must not become NaN / None
    ds = load_split("cola", "train", tmp_path)
    assert ds["sentence"] == ['Susan whispered "Shut up.', "The more does Bill smoke.", "null"]
    assert ds["label"] == [1, 0, 1] and ds["idx"] == [0, 1, 2]


def test_task_folder_capitalisation_is_forgiven(tmp_path):
    _write(tmp_path / "superglue" / "cb" / "train.jsonl", json.dumps(CB_ROWS[0]) + "\n")
    _write(tmp_path / "cola" / "train.tsv", "x\t1\t\tThe cat sat.\n")
    assert load_split("cb", "train", tmp_path)["label"] == [1]
    assert load_split("cola", "train", tmp_path)["sentence"] == ["The cat sat."]


def test_missing_fixture_file_explains_the_layout(tmp_path):
    with pytest.raises(SinkdError) as err:
        load_split("cb", "train", tmp_path)
    message = str(err.value)
    assert str(tmp_path / "superglue" / "CB" / "train.jsonl") in message
    assert "superglue/CB/train.jsonl" in message


def test_unknown_label_names_the_line(tmp_path):
    _write(tmp_path / "RTE" / "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tc\td\tmaybe\n")
    with pytest.raises(SinkdError, match=r"train.tsv:3 has label 'maybe'"):
        load_split("rte", "train", tmp_path)


def test_wrong_format_file_is_refused(tmp_path):
    _write(tmp_path / "RTE" / "dev.tsv", "a\tb\n1\t2\n")  # not RTE's header
    with pytest.raises(SinkdError, match="lacks a column"):
        load_split("rte", "dev", tmp_path)


# -------------------------------------------------------------------------------------------- the hub path
def _fake_hub(rows: list[dict], names: list[str]) -> datasets.Dataset:
    """A dataset shaped like the hub's: text columns, a ClassLabel `label`, an int32 `idx`."""
    columns = {key: [r[key] for r in rows] for key in rows[0]}
    features = {key: datasets.Value("string") for key in columns if key not in ("label", "idx")}
    features |= {"label": datasets.ClassLabel(names=names), "idx": datasets.Value("int32")}
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def test_hub_and_local_give_the_same_label_ids(tmp_path, monkeypatch):
    _write_mnli(tmp_path)
    local = load_split("mnli", "train", tmp_path)
    hub_rows = [
        {"premise": p, "hypothesis": h, "label": label, "idx": 100 + i}
        for i, (p, h, label) in enumerate(zip(local["premise"], local["hypothesis"], [0, 1, 2]))
    ]
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return _fake_hub(hub_rows, list(TASKS[name].label_names))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub = load_split("mnli", "train")
    assert calls == [("nyu-mll/glue", "mnli", "train")]
    assert hub.column_names == local.column_names
    assert hub["label"] == local["label"] and hub["premise"] == local["premise"]
    assert hub["idx"] == [0, 1, 2]  # row position, not the hub's own idx
    assert hub.features == local.features
    load_split("mnli", "dev_mismatched")
    load_split("cb", "dev")
    assert calls[1:] == [("nyu-mll/glue", "mnli", "validation_mismatched"), ("aps/super_glue", "cb", "validation")]


def test_hub_rte_matches_local_rte_strings(tmp_path, monkeypatch):
    _write(
        tmp_path / "RTE" / "dev.tsv",
        "index\tsentence1\tsentence2\tlabel\n"
        "0\tA man sleeps.\tA man rests.\tentailment\n1\tIt rains.\tIt is dry.\tnot_entailment\n",
    )
    local = load_split("rte", "dev", tmp_path)
    hub_rows = [
        {"sentence1": "A man sleeps.", "sentence2": "A man rests.", "label": 0, "idx": 0},
        {"sentence1": "It rains.", "sentence2": "It is dry.", "label": 1, "idx": 1},
    ]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: _fake_hub(hub_rows, ["entailment", "not_entailment"]))
    assert load_split("rte", "dev")["label"] == local["label"] == [0, 1]


def test_hub_with_another_label_order_is_refused(monkeypatch):
    rows = [{"premise": "p", "hypothesis": "h", "label": 0, "idx": 0}]
    monkeypatch.setattr(
        datasets, "load_dataset", lambda *a, **k: _fake_hub(rows, ["contradiction", "neutral", "entailment"])
    )
    with pytest.raises(SinkdError, match="labels"):
        load_split("mnli", "train")


def test_unreachable_hub_says_how_to_point_at_local_files(monkeypatch):
    def no_network(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")

    import sinkd_ray.data

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    monkeypatch.setattr(sinkd_ray.data, "hub_reachable", lambda: True)  # the hub answers, the dataset fails
    with pytest.raises(SinkdError) as err:
        load_split("cola", "train")
    message = str(err.value)
    assert "--data-dir" in message and "SINKD_DATA_DIR" in message and "ConnectionError" in message
    assert "\n" not in message
    assert isinstance(err.value.__cause__, ConnectionError)


def test_offline_hub_with_real_datasets_library(tmp_path):
    """The real `datasets.load_dataset` in offline mode, with an empty cache: one clear SinkdError."""
    env = {k: v for k, v in os.environ.items() if k != "SINKD_DATA_DIR"}
    env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    code = (
        "from sinkd_ray.data import load_split\nfrom sinkd_ray.errors import SinkdError\n"
        "try:\n    load_split('rte', 'train')\nexcept SinkdError as e:\n    print('SINKD', e)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("SINKD no network access to the Hugging Face hub to fetch rte train")
    assert "--data-dir" in result.stdout and "SINKD_DATA_DIR" in result.stdout


# ---------------------------------------------------------------------------------------------- tokenising
VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "it",
    "rains",
    "is",
    "dry",
    "man",
    "sleeps",
    "rests",
    ".",
    ",",
    ":",
    "?",
    '"',
    "premise",
    "hypothesis",
    "sentence",
    "does",
    "entail",
    "answer",
    "grammatically",
    "correct",
    "this",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A tiny BERT WordPiece tokenizer built offline from a vocab file (no hub)."""
    from transformers import BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return BertTokenizerFast.from_pretrained(folder)


@pytest.fixture
def rte_fixture(tmp_path):
    _write(
        tmp_path / "RTE" / "train.tsv",
        "index\tsentence1\tsentence2\tlabel\n"
        "0\tthe man sleeps .\tthe man rests .\tentailment\n"
        "1\tit rains .\tit is dry .\tnot_entailment\n"
        "2\tthe cat sat on the mat , the dog sat on the mat , the man sat on the mat .\tthe cat sat .\tentailment\n",
    )
    return load_split("rte", "train", tmp_path)


def test_tokenize_pair_task(rte_fixture, tokenizer):
    tok = tokenize_split(rte_fixture, "rte", tokenizer, max_length=12)
    assert set(tok.column_names) == {"input_ids", "attention_mask", "token_type_ids", "labels", "idx"}
    assert tok["labels"] == [0, 1, 0] and tok["idx"] == [0, 1, 2]
    ids = tok[0]["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "[CLS]",
        "the",
        "man",
        "sleeps",
        ".",
        "[SEP]",
        "the",
        "man",
        "rests",
        ".",
        "[SEP]",
    ]
    assert tok[0]["token_type_ids"] == [0] * 6 + [1] * 5
    long = tok[2]["input_ids"]
    assert len(long) == 12 and long.count(tokenizer.sep_token_id) == 2  # truncated, both segments kept


def test_tokenize_single_task(tmp_path, tokenizer):
    _write(tmp_path / "CoLA" / "dev.tsv", "x\t1\t\tthe cat sat .\nx\t0\t*\tthe sat cat mat mat mat mat mat mat mat .\n")
    tok = tokenize_split(load_split("cola", "dev", tmp_path), TASKS["cola"], tokenizer, max_length=8)
    assert tokenizer.convert_ids_to_tokens(tok[0]["input_ids"]) == ["[CLS]", "the", "cat", "sat", ".", "[SEP]"]
    assert len(tok[1]["input_ids"]) == 8 and tok[1]["input_ids"][-1] == tokenizer.sep_token_id
    assert tok["labels"] == [1, 0]


def test_tokenize_prompt_keeps_the_answer_slot(rte_fixture, tokenizer):
    full = tokenize_split(rte_fixture, "rte", tokenizer, max_length=128, prompt=True)
    tokens = tokenizer.convert_ids_to_tokens(full[0]["input_ids"])
    assert " ".join(tokens) == (
        "[CLS] premise : the man sleeps . hypothesis : the man rests . "
        "does the premise entail the hypothesis ? answer : [SEP]"
    )
    assert "token_type_ids" not in full.column_names or set(full[0]["token_type_ids"]) == {0}
    short = tokenize_split(rte_fixture, "rte", tokenizer, max_length=10, prompt=True)
    tokens = tokenizer.convert_ids_to_tokens(short[2]["input_ids"])
    assert len(tokens) == 10 and tokens[-3:] == ["answer", ":", "[SEP]"]  # the beginning was cut, not the end
    assert tokenizer.truncation_side == "right"  # restored


# ------------------------------------------------------------------------------------------ global batches
def _flat(lists) -> list[int]:
    return list(itertools.chain.from_iterable(lists))


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_rank_slices_union_to_the_single_worker_batch(world_size):
    n, b = 103, 8
    single = list(GlobalBatchSampler(n, b, seed=3))
    per_rank = [list(GlobalBatchSampler(n, b, rank=r, world_size=world_size, seed=3)) for r in range(world_size)]
    assert all(len(batches) == len(single) == n // b for batches in per_rank)
    for step, batch in enumerate(single):
        assert all(len(per_rank[r][step]) == b // world_size for r in range(world_size))
        assert _flat(per_rank[r][step] for r in range(world_size)) == batch  # in order, contiguous
    flat = _flat(single)
    assert len(set(flat)) == len(flat) == (n // b) * b  # no repeats within an epoch


def test_sampler_is_deterministic_per_seed_and_epoch():
    sampler = GlobalBatchSampler(50, 10, seed=7)
    first = list(sampler)
    assert list(GlobalBatchSampler(50, 10, seed=7)) == first
    assert list(GlobalBatchSampler(50, 10, seed=8)) != first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and sorted(_flat(second)) == list(range(50))
    other = GlobalBatchSampler(50, 10, rank=1, world_size=2, seed=7)
    other.set_epoch(1)
    assert list(other) == [batch[5:] for batch in second]


def test_eval_sampler_keeps_every_example_in_order():
    n, b, w = 23, 8, 4
    per_rank = [list(GlobalBatchSampler.for_eval(n, b, rank=r, world_size=w)) for r in range(w)]
    assert {len(batches) for batches in per_rank} == {3}  # same number of forward passes on every rank
    steps = [_flat(per_rank[r][t] for r in range(w)) for t in range(3)]
    assert steps[:2] == [list(range(8)), list(range(8, 16))]
    # last batch 16..22 (7 examples) padded to 8 with its first index: de-duplicate by idx
    assert steps[2] == [16, 17, 18, 19, 20, 21, 22, 16]
    assert sorted(set(_flat(steps))) == list(range(n))
    assert list(GlobalBatchSampler.for_eval(n, b)) == [list(range(8)), list(range(8, 16)), list(range(16, 23))]
    assert len(GlobalBatchSampler.for_eval(n, b)) == 3


def _padded_tokens(batches, lengths) -> int:
    """What a batch padded to its longest costs: max length × batch size, summed."""
    return sum(int(lengths[batch].max()) * len(batch) for batch in batches)


def test_batches_grouped_by_length_pad_little_and_stay_global_batches():
    n, b, w = 1030, 8, 2
    lengths = np.random.default_rng(0).integers(3, 48, size=n)  # CoLA-like: 3..47 tokens
    grouped = GlobalBatchSampler(n, b, seed=3, lengths=lengths)
    epoch0 = [np.asarray(batch) for batch in grouped]
    flat = np.concatenate(epoch0)
    assert len(epoch0) == n // b and len(set(flat.tolist())) == len(flat) == (n // b) * b  # each once, ≤ b-1 dropped
    real = int(lengths[flat].sum())
    uniform = [np.asarray(batch) for batch in GlobalBatchSampler(n, b, seed=3)]
    assert _padded_tokens(uniform, lengths) > 1.4 * real  # random batches: ~1.6× their real tokens here
    assert _padded_tokens(epoch0, lengths) < 1.1 * real
    # the batches' order is shuffled: not longest first (the first window alone would give the epoch's start)
    maxima = [int(lengths[batch].max()) for batch in epoch0]
    assert maxima != sorted(maxima, reverse=True) and maxima[0] != max(maxima)
    # deterministic per (seed, epoch), another epoch another grouping; ranks slice the same global batches
    assert [list(x) for x in GlobalBatchSampler(n, b, seed=3, lengths=lengths)] == [x.tolist() for x in epoch0]
    grouped.set_epoch(1)
    epoch1 = list(grouped)
    assert epoch1 != [x.tolist() for x in epoch0]
    for r in range(w):
        ranked = GlobalBatchSampler(n, b, rank=r, world_size=w, seed=3, lengths=lengths)
        ranked.set_epoch(1)
        assert list(ranked) == [batch[r * b // w : (r + 1) * b // w] for batch in epoch1]


def test_eval_batches_grouped_by_length_run_longest_first_with_ties_in_split_order():
    lengths = np.array([3, 5, 5, 1, 4])
    assert list(GlobalBatchSampler.for_eval(5, 2, lengths=lengths)) == [[1, 2], [4, 0], [3]]
    per_rank = [list(GlobalBatchSampler.for_eval(5, 2, rank=r, world_size=2, lengths=lengths)) for r in range(2)]
    assert per_rank == [[[1], [4], [3]], [[2], [0], [3]]]  # the last batch padded with its first example


def test_token_lengths_follow_a_selected_dataset(tmp_path, tokenizer):
    from conftest import write_cola_fixture

    from sinkd_ray.data import token_lengths

    cola = TASKS["cola"]
    tok = tokenize_split(load_split(cola, "train", write_cola_fixture(tmp_path)), cola, tokenizer, 32)
    rows = [9, 2, 40, 2]
    assert token_lengths(tok.select(rows)).tolist() == [len(tok[i]["input_ids"]) for i in rows]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_examples": 100, "global_batch_size": 10, "world_size": 4}, "not a positive multiple"),
        ({"num_examples": 100, "global_batch_size": 0}, "not a positive multiple"),
        ({"num_examples": 100, "global_batch_size": 8, "rank": 2, "world_size": 2}, "rank 2"),
        ({"num_examples": 5, "global_batch_size": 8}, "exceeds the 5 examples"),
    ],
)
def test_sampler_refuses_impossible_settings(kwargs, match):
    with pytest.raises(SinkdError, match=match):
        GlobalBatchSampler(**kwargs)


# ------------------------------------------------------------------------------------------------- loader
def test_loader_pads_per_batch_and_carries_labels_and_idx(rte_fixture, tokenizer):
    tok = tokenize_split(rte_fixture, "rte", tokenizer, max_length=64)
    loader = make_loader(tok, tokenizer, GlobalBatchSampler.for_eval(len(tok), 2))
    batches = list(loader)
    assert len(batches) == 2
    first, last = batches
    assert first["input_ids"].shape == (2, 11)  # longest of rows 0 and 1, not max_length
    assert first["input_ids"][1, -1].item() == tokenizer.pad_token_id
    assert first["attention_mask"].sum(dim=1).tolist() == [11, 10]
    assert first["labels"].tolist() == [0, 1] and first["idx"].tolist() == [0, 1]
    assert last["idx"].tolist() == [2] and last["labels"].dtype == torch.int64
    assert first["token_type_ids"].shape == first["input_ids"].shape


def test_loader_with_two_ranks_splits_each_global_batch(rte_fixture, tokenizer):
    tok = tokenize_split(rte_fixture, "rte", tokenizer, max_length=64)
    idx = [
        [batch["idx"].tolist() for batch in make_loader(tok, tokenizer, GlobalBatchSampler(3, 2, r, 2, seed=1))]
        for r in range(2)
    ]
    single = list(GlobalBatchSampler(3, 2, seed=1))
    assert [idx[0][0] + idx[1][0]] == single


def test_loader_needs_a_pad_token(rte_fixture, tokenizer):
    tok = tokenize_split(rte_fixture, "rte", tokenizer, max_length=64)

    class NoPad:
        pad_token = None

    with pytest.raises(SinkdError, match="no pad token"):
        make_loader(tok, NoPad(), GlobalBatchSampler.for_eval(len(tok), 2))


def test_module_exports():
    assert data_module.DATA_DIR_ENV == "SINKD_DATA_DIR"
