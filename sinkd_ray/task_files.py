"""Tasks of the user's own: a labelled text-classification dataset described by a small YAML file.

    # task.yaml                     (paths relative to this file)
    name: tickets                   # the task's name (registry model: sinkd-tickets-student); default: file name
    train: data/train.csv           # CSV, TSV, JSON, JSONL or Parquet, by extension
    dev: data/dev.csv               # optional: without it, a seeded stratified 10 % of train (said in one line)
    header: true                    # CSV / TSV: the first row names the columns (false: columns are 0, 1, …)
    text: [subject, body]           # one text column, or two (a pair)
    label: queue                    # the label column: strings or integers
    label_names: [billing, tech]    # optional: the classes and their order (default: train's labels, sorted)
    metric: macro_f1                # accuracy (default), macro_f1, mcc, or f1 (with positive_label: <class>)
    verbalizer: {billing: bill}     # generative students: a word per class (default: the label names)
    template: "Ticket: {subject}\n{body}\nQueue:"   # generative students' prompt (a default for one text / a pair)
    # instead of train / dev files:  hub: {id: org/dataset, config: null, train_split: train, dev_split: test}

Every rule is checked when the task is read, before any work, each a one-line error that says what to do: a
missing or empty file, a file that is not UTF-8, a column that does not exist (the ones that do are named), a
label column with missing values, a label in dev that train lacks, one class only, a class too small for the
dev split. The result becomes a `tasks.Task` like the GLUE entries (`tasks.get_task` builds it from the fields read
here): the same data, cache, study and registry paths.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa

from sinkd_ray.errors import SinkdError

FORMATS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".parquet": "parquet"}
KEYS = {"name", "train", "dev", "header", "text", "label", "label_names", "metric", "positive_label"}
KEYS |= {"verbalizer", "template", "dev_fraction", "hub", "description"}
DEV_SEED = 0
_said: set[str] = set()


@dataclass(frozen=True)
class TaskFiles:
    """Where a task of the user's own comes from, as its task file says (paths resolved)."""

    path: str  # the task file
    train: str | None
    dev: str | None
    header: bool
    label_column: str
    raw_labels: tuple[str, ...]  # each class's label as written in the files, in class-id order
    dev_fraction: float
    hub: tuple | None  # (id, config, train split, dev split)
    digest: str


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _fail(path: str, message: str) -> None:
    raise SinkdError(f"task file {path}: {message}")


def _read_table(file: Path, header: bool, where: str):
    """A data file as a table of strings (pandas), by its extension; one line when it cannot be read."""
    import pandas as pd

    kind = FORMATS.get(file.suffix.lower())
    if kind is None:
        _fail(where, f"{file.name}: unknown format — use one of {', '.join(FORMATS)}")
    if not file.is_file():
        _fail(where, f"data file {file} not found")
    try:
        if kind in ("csv", "tsv"):
            # strings kept as written; an empty field stays missing (a missing label is refused below)
            frame = pd.read_csv(
                file, sep="," if kind == "csv" else "\t", header=0 if header else None, dtype=str, encoding="utf-8"
            )
        elif kind == "parquet":
            frame = pd.read_parquet(file)
        else:
            frame = pd.read_json(file, lines=kind == "jsonl", dtype=False)
    except UnicodeDecodeError as err:
        _fail(where, f"{file} is not UTF-8 text (byte {err.start}: {err.reason}) — save it as UTF-8")
    except pd.errors.EmptyDataError:
        _fail(where, f"{file} is empty — it should hold the examples")
    except (ValueError, pd.errors.ParserError, OSError, pa.ArrowInvalid) as err:
        _fail(where, f"{file} cannot be read as {kind} ({str(err).splitlines()[0][:120]})")
    if not header and kind in ("csv", "tsv"):
        frame.columns = [str(c) for c in frame.columns]
    if len(frame) == 0:
        _fail(where, f"{file} holds no examples")
    return frame


def _columns(frame, file: Path, text: list, label: str, where: str) -> None:
    names = [str(c) for c in frame.columns]
    frame.columns = names
    for column in [*text, label]:
        if column not in names:
            _fail(where, f"{file.name} has no column {column!r} — its columns: {', '.join(names)}")
    missing = frame[label].isna() | (frame[label].astype(str).str.strip() == "")
    if missing.any():
        first = int(np.argmax(missing.values)) + 1
        _fail(
            where, f"{file.name}: {int(missing.sum())} row(s) have no label (first at row {first}) — fill or drop them"
        )


def _label_order(values: list[str]) -> list[str]:
    """Train's labels, sorted (as numbers when they all are)."""
    unique = sorted(set(values))
    try:
        return sorted(unique, key=float)
    except ValueError:
        return unique


def _raw(value) -> str:
    """A label as text: 1, 1.0 and "1" are one class (a Parquet or JSON file may hold numbers)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


@lru_cache(maxsize=32)
def _load(path: str, mtime_ns: int, metrics: tuple[str, ...], builtin: frozenset) -> dict:
    # Not split: one pass down the file's keys in the order a user reads them, each checked with its own one-line
    # error; pieces would each need the raw mapping, the path and what earlier keys decided (text, names).
    import yaml

    file = Path(path)
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        _fail(path, f"not valid YAML ({str(err).splitlines()[0]})")
    if not isinstance(raw, dict):
        _fail(path, "expected a mapping (train:, text:, label:, …)")
    unknown = sorted(set(raw) - KEYS)
    if unknown:
        _fail(path, f"unknown key(s) {unknown} — known: {', '.join(sorted(KEYS))}")
    name = _slug(str(raw.get("name") or file.stem))
    if not name or name in builtin:
        _fail(path, f"name {name!r} is empty or a built-in task's — give the task its own name")
    text = raw.get("text")
    text = [text] if isinstance(text, str) else text
    if not isinstance(text, list) or not 1 <= len(text) <= 2 or not all(isinstance(t, (str, int)) for t in text):
        _fail(path, "text: one column name, or a list of two (a pair)")
    text = [str(t) for t in text]
    label = raw.get("label")
    if label is None:
        _fail(path, "label: the name of the label column is required")
    label = str(label)
    header = raw.get("header", True)
    hub = raw.get("hub")
    if hub is not None and ("train" in raw or "dev" in raw):
        _fail(path, "give either train / dev files or hub:, not both")
    if hub is None and not raw.get("train"):
        _fail(path, "train: the training file is required (or hub: {id: …})")
    dev_fraction = float(raw.get("dev_fraction", 0.1))
    if not 0 < dev_fraction < 0.5:
        _fail(path, f"dev_fraction={dev_fraction} must be in (0, 0.5)")
    base = file.parent
    frames, digest = {}, hashlib.sha256(file.read_bytes())
    if hub is None:
        for split in ("train", "dev"):
            if raw.get(split):
                data = (base / str(raw[split])).resolve()
                frames[split] = _read_table(data, bool(header), path)
                _columns(frames[split], data, text, label, path)
                digest.update(hashlib.sha256(data.read_bytes()).digest())
    else:
        if not isinstance(hub, dict) or not hub.get("id"):
            _fail(path, "hub: {id: <dataset id>, config: <name or null>, train_split: train, dev_split: <split>}")
        hub = (str(hub["id"]), hub.get("config"), hub.get("train_split", "train"), hub.get("dev_split"))
        for split, hub_split in (("train", hub[2]), ("dev", hub[3])):
            if hub_split:
                frames[split] = _hub_frame(hub, hub_split, path)
                _columns(frames[split], Path(f"{hub[0]}:{hub_split}"), text, label, path)
        digest.update(json.dumps(hub).encode())
    train_labels = [_raw(v) for v in frames["train"][label]]
    given = raw.get("label_names")
    names = [_raw(v) for v in given] if given else _label_order(train_labels)
    if len(set(names)) < 2:
        _fail(
            path,
            f"the train split holds one class only ({names[0] if names else 'none'!r}) — a classifier "
            "needs at least two",
        )
    for split, frame in frames.items():
        unseen = sorted({_raw(v) for v in frame[label]} - set(names))
        if unseen:
            lacks = "train lacks" if not given else "label_names lacks"
            _fail(path, f"the {split} split has label(s) {unseen[:5]} that {lacks} — fix the file or list every class")
    if "dev" not in frames:
        counts = {n: train_labels.count(n) for n in names}
        small = [n for n, c in counts.items() if c < 2]
        if small:
            _fail(
                path,
                f"class(es) {small} have fewer than 2 train examples: too few for the dev split held out of "
                "train — add examples, or give a dev file",
            )
    metric = str(raw.get("metric", "accuracy"))
    if metric not in metrics:
        _fail(path, f"metric {metric!r} — use one of {', '.join(metrics)}")
    positive = raw.get("positive_label")
    if metric == "f1" and (positive is None or _raw(positive) not in names) and len(names) != 2:
        _fail(path, f"metric f1 needs positive_label: one of {names}")
    positive_id = names.index(_raw(positive)) if positive is not None and _raw(positive) in names else 1
    words = raw.get("verbalizer")
    if words is not None:
        if not isinstance(words, dict) or {_raw(k) for k in words} != set(names):
            _fail(path, f"verbalizer: a word for each class, {{{', '.join(f'{n}: …' for n in names)}}}")
        verbalizer = tuple(str(words[k]).strip() for k in sorted(words, key=lambda k: names.index(_raw(k))))
    else:
        verbalizer = tuple(names)
    if len(set(verbalizer)) != len(verbalizer):
        _fail(path, f"verbalizer words must differ, got {list(verbalizer)}")
    default = (
        f"Text: {{{text[0]}}}\nAnswer:" if len(text) == 1 else f"Text 1: {{{text[0]}}}\nText 2: {{{text[1]}}}\nAnswer:"
    )
    template = str(raw.get("template", default))
    fields = set(re.findall(r"{(\w+)}", template))
    if fields - set(text) or template != template.rstrip():
        _fail(
            path,
            f"template: its fields must be the text columns {text} and it must end where the answer goes "
            "(no trailing space)",
        )
    files = TaskFiles(
        path=str(file),
        train=str((base / str(raw["train"])).resolve()) if raw.get("train") else None,
        dev=str((base / str(raw["dev"])).resolve()) if raw.get("dev") else None,
        header=bool(header),
        label_column=label,
        raw_labels=tuple(names),
        dev_fraction=dev_fraction,
        hub=hub,
        digest=digest.hexdigest()[:12],
    )
    return dict(
        name=name,
        benchmark="custom",
        hub_id=hub[0] if hub else None,
        hub_config=hub[1] if hub else None,
        text_fields=tuple(text),
        label_names=tuple(names),
        metric=metric,
        template=template,
        verbalizer=verbalizer,
        positive_label=positive_id,
        files=files,
        verbalizer_given=words is not None,
    )


def _hub_frame(hub: tuple, split: str, where: str):
    from sinkd_ray.hub import hub_reachable, no_network_message

    try:
        dataset = datasets.load_dataset(hub[0], hub[1], split=split)
    except Exception as err:  # network, auth, a wrong id or split: one line whatever the cause
        reason = no_network_message(f"dataset {hub[0]}") if not hub_reachable() else str(err).splitlines()[0][:160]
        _fail(where, f"hub dataset {hub[0]} ({hub[1]}, split {split}) could not be loaded: {reason}")
    return dataset.to_pandas()


def load_task_file(path: str, metrics: tuple[str, ...], builtin: frozenset) -> dict:
    """The `tasks.Task` fields a task file describes (read and checked once per version of the file), given the
    metrics there are and the built-in task names it may not take. A task file shipped to remote storage
    (`driver._ship_inputs`) is fetched to this node first."""
    from sinkd_ray.storage import localize

    if "://" in path:
        folder, name = path.rsplit("/", 1)
        path = str(Path(localize(folder)) / name)
    file = Path(path).expanduser()
    if not file.is_file():
        raise SinkdError(f"task file {path} not found — give the path of a task.yaml (README, 'Your own data')")
    return _load(str(file.resolve()), file.stat().st_mtime_ns, tuple(metrics), frozenset(builtin))


def read_split(task, split: str) -> datasets.Dataset:
    """``split`` ("train" / "dev") of a task of the user's own: text columns, ``label`` (class id) and ``idx``."""
    files: TaskFiles = task.files
    if files.hub is None:
        frames = {"train": _read_table(Path(files.train), files.header, files.path)}
        if files.dev:
            frames["dev"] = _read_table(Path(files.dev), files.header, files.path)
    else:
        frames = {"train": _hub_frame(files.hub, files.hub[2], files.path)}
        if files.hub[3]:
            frames["dev"] = _hub_frame(files.hub, files.hub[3], files.path)
    for frame in frames.values():
        frame.columns = [str(c) for c in frame.columns]
    ids = {name: i for i, name in enumerate(files.raw_labels)}
    frame = frames[split] if "dev" in frames else None
    if frame is None:  # no dev file: a fixed stratified slice of train, the rest trains
        from sklearn.model_selection import train_test_split

        train = frames["train"]
        labels = [ids[_raw(v)] for v in train[files.label_column]]
        keep, held = train_test_split(
            np.arange(len(train)), test_size=files.dev_fraction, random_state=DEV_SEED, stratify=labels
        )
        if files.path not in _said:
            _said.add(files.path)
            print(
                f"{task.name}: no dev file, so {len(held)} train examples ({files.dev_fraction:.0%}, stratified, "
                f"seed {DEV_SEED}) are the dev split and {len(keep)} train"
            )
        frame = train.iloc[np.sort(held if split == "dev" else keep)]
    text = {f: [("" if v is None or v != v else str(v)) for v in frame[f]] for f in task.text_fields}
    labels = [ids[_raw(v)] for v in frame[files.label_column]]
    features = datasets.Features(
        {
            **{f: datasets.Value("string") for f in task.text_fields},
            "label": datasets.ClassLabel(names=list(task.label_names)),
            "idx": datasets.Value("int64"),
        }
    )
    table = pa.Table.from_pydict(
        {**text, "label": labels, "idx": list(range(len(labels)))}, schema=features.arrow_schema
    )
    fingerprint = hashlib.sha256(f"{task.key}/{split}".encode()).hexdigest()[:16]
    return datasets.Dataset(
        datasets.table.InMemoryTable(table), info=datasets.DatasetInfo(features=features), fingerprint=fingerprint
    )
