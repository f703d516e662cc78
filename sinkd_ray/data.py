"""Data: load a task split (hub or local release files), tokenise it, and batch it for W workers.

Sources, in order of precedence:

1. a local copy in the original release formats, when ``data_dir`` (``--data-dir``) or ``SINKD_DATA_DIR`` is set:
   GLUE as ``<dir>/CoLA/train.tsv`` (the ``download_glue_data.py`` layout) or ``<dir>/glue/CoLA/train.tsv``;
   SuperGLUE as ``<dir>/superglue/RTE/train.jsonl`` (or ``SuperGLUE/``), CB in ``.../CB/``;
2. otherwise the Hugging Face hub through ``datasets.load_dataset``.

Both give the same columns: the task's text fields (hub column names), ``label`` (the hub's class id) and
``idx`` (0..n-1, the row position: the key under which teacher logits are cached).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from sinkd_ray.errors import SinkdError
from sinkd_ray.hub import hub_reachable
from sinkd_ray.tasks import ReleaseFormat, Task, get_task

if TYPE_CHECKING:
    import datasets

DATA_DIR_ENV = "SINKD_DATA_DIR"
_POINT_AT_LOCAL = (
    f"point --data-dir or {DATA_DIR_ENV} at a local copy in the GLUE/SuperGLUE release layout "
    f"(e.g. <dir>/CoLA/train.tsv, <dir>/glue/RTE/dev.tsv, <dir>/superglue/CB/val.jsonl)"
)


# ----------------------------------------------------------------------------------------------- local formats
# Each benchmark task's release format is its own (`tasks.ReleaseFormat`, the task's ``release``).
# Where users keep each benchmark below the data dir (the bare dir last: a GLUE `RTE/` there must not be
# taken for SuperGLUE's unless it holds the .jsonl files, which the file check ensures).
_BENCHMARK_DIRS = {
    "glue": ("", "glue", "GLUE", "glue_data"),
    "super_glue": ("superglue", "SuperGLUE", "super_glue", "super-glue", ""),
}


def _release(task: Task) -> ReleaseFormat:
    if task.release is None:
        raise SinkdError(
            f"task {task.name} has no release format to read from --data-dir — give its files in its task file"
        )
    return task.release


def _features(task: Task) -> datasets.Features:
    import datasets

    return datasets.Features(
        {
            **{field: datasets.Value("string") for field in task.text_fields},
            "label": datasets.ClassLabel(names=list(task.label_names)),
            "idx": datasets.Value("int64"),
        }
    )


def _canonical_split(task: Task, split: str) -> str:
    aliases = {
        "validation": "dev",
        "val": "dev",
        "dev_matched": "dev",
        "validation_matched": "dev",
        "validation_mismatched": "dev_mismatched",
    }
    name = aliases.get(split, split)
    if name not in task.splits:
        raise SinkdError(f"unknown split {split!r} for task {task.name} — choose one of {', '.join(task.splits)}")
    return name


def local_split_path(task: Task | str, split: str, data_dir: str | os.PathLike) -> Path:
    """The release file holding ``split`` of ``task`` under ``data_dir``; SinkdError naming the paths tried."""
    task = get_task(task)
    split = _canonical_split(task, split)
    fmt = _release(task)
    root = Path(data_dir).expanduser()
    file_name = dict(fmt.files)[split]
    candidates = [root / sub / fmt.folder / file_name for sub in _BENCHMARK_DIRS[task.benchmark]]
    if root.name.lower() == fmt.folder.lower():  # data_dir is the task folder itself
        candidates.append(root / file_name)
    for path in candidates:
        if path.is_file():
            return path
    for path in candidates:  # the same layout with other capitalisation (e.g. `cola/`, `superglue/cb/`)
        parent = path.parent.parent
        if parent.is_dir():
            for folder in parent.iterdir():
                if folder.name.lower() == fmt.folder.lower() and (folder / file_name).is_file():
                    return folder / file_name
    expected = f"{fmt.folder}/{file_name}" if task.benchmark == "glue" else f"superglue/{fmt.folder}/{file_name}"
    contents = ", ".join(dict(fmt.files).values())
    raise SinkdError(
        f"no local {task.name} {split} file under {root}: looked for {', '.join(str(p) for p in candidates)} — "
        f"the data dir should contain {expected} (the {fmt.folder}/ folder of the original "
        f"{'GLUE' if task.benchmark == 'glue' else 'SuperGLUE'} release, with {contents}), or unset "
        f"--data-dir/{DATA_DIR_ENV} to load from the Hugging Face hub"
    )


def _read_rows(path: Path, fmt: ReleaseFormat) -> Iterator[tuple[int, dict | list]]:
    """(line number, row) pairs: dicts for headed TSV / JSONL, lists for header-less TSV."""
    # Hand-rolled instead of pandas: GLUE TSVs must be read with quoting off (sentences hold unbalanced `"`),
    # and csv with QUOTE_NONE is how GLUE's own and the hub's loaders read them; utf-8-sig drops MRPC's BOM.
    with open(path, encoding="utf-8-sig", newline="") as f:
        if fmt.jsonl:
            for line_no, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        yield line_no, json.loads(line)
                    except json.JSONDecodeError as err:
                        raise SinkdError(
                            f"{path}:{line_no} is not valid JSON ({err}) — is this a .jsonl file?"
                        ) from err
            return
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if not fmt.has_header:
            for row in reader:
                if row:
                    yield reader.line_num, row
            return
        header = next(reader, None)
        if header is None:
            raise SinkdError(f"{path} is empty — expected a tab-separated file with a header row")
        for row in reader:
            if row:
                yield reader.line_num, dict(zip(header, row))


def _read_rows_checked(path: Path, fmt: ReleaseFormat) -> Iterator[tuple[int, dict | list]]:
    """`_read_rows`, with a binary or non-UTF-8 file reported as one line."""
    try:
        yield from _read_rows(path, fmt)
    except UnicodeDecodeError as err:
        raise SinkdError(
            f"{path} is not UTF-8 text (byte {err.start}: {err.reason}) — is it the original {fmt.folder} release file?"
        ) from None
    except csv.Error as err:
        raise SinkdError(
            f"{path} is not a readable tab-separated file ({err}) — is it the original {fmt.folder} release file?"
        ) from None


def _label_parser(task: Task, fmt: ReleaseFormat, path: Path) -> Callable[[object, int], int]:
    ids = {name: i for i, name in enumerate(task.label_names)}

    def parse(raw: object, line_no: int) -> int:
        value = str(raw).strip()
        label = ids.get(value) if fmt.label_is_name else (int(value) if value.isdigit() else None)
        if label is None or not 0 <= label < task.num_labels:
            allowed = list(task.label_names) if fmt.label_is_name else list(range(task.num_labels))
            raise SinkdError(f"{path}:{line_no} has label {raw!r} — {task.name} labels are {allowed}")
        return label

    return parse


def read_local_split(task: Task | str, split: str, data_dir: str | os.PathLike) -> datasets.Dataset:
    """``split`` of ``task`` read from its original release file under ``data_dir`` (see module doc)."""
    task = get_task(task)
    split = _canonical_split(task, split)
    fmt = _release(task)
    path = local_split_path(task, split, data_dir)
    parse_label = _label_parser(task, fmt, path)
    columns = {field: [] for field in task.text_fields}
    labels = []
    for line_no, row in _read_rows_checked(path, fmt):
        try:
            values = {field: row[col] for field, col in fmt.columns}
            raw_label = row[fmt.label_column]
        except (KeyError, IndexError):
            wanted = [*dict(fmt.columns).values(), fmt.label_column]
            raise SinkdError(
                f"{path}:{line_no} lacks a column among {wanted} — is this the original {fmt.folder} release file?"
            ) from None
        if any(v is None for v in values.values()) or raw_label is None:
            raise SinkdError(f"{path}:{line_no} has too few tab-separated fields — the row is damaged")
        for field, value in values.items():
            columns[field].append(value)
        labels.append(parse_label(raw_label, line_no))
    if not labels:
        raise SinkdError(f"{path} holds no examples — expected the {task.name} {split} split")
    # Built with an explicit fingerprint (the file's bytes): `from_dict` would hash the whole table through
    # dill, which is slow and, inside Ray workers, prints bytecode into the logs.
    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    features = _features(task)
    table = pa.Table.from_pydict(
        {**columns, "label": labels, "idx": list(range(len(labels)))}, schema=features.arrow_schema
    )
    key = json.dumps([task.name, split, hashlib.sha256(path.read_bytes()).hexdigest()])
    return datasets.Dataset(
        InMemoryTable(table),
        info=datasets.DatasetInfo(features=features),
        fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16],
    )


# ------------------------------------------------------------------------------------------------------- hub
def read_hub_split(task: Task | str, split: str) -> datasets.Dataset:
    """``split`` of ``task`` from the Hugging Face hub, with the same columns and label ids as a local copy."""
    import datasets

    task = get_task(task)
    split = _canonical_split(task, split)
    hub_split = task.hub_split(split)
    if not hub_reachable():
        try:  # a copy in the datasets cache works offline
            dataset = datasets.load_dataset(
                task.hub_id, task.hub_config, split=hub_split, download_mode="reuse_cache_if_exists"
            )
        except Exception:
            raise SinkdError(
                f"no network access to the Hugging Face hub to fetch {task.name} {split} ({task.hub_id})"
                f" — {_POINT_AT_LOCAL}"
            ) from None
        return _check_hub_split(task, dataset)
    try:
        dataset = datasets.load_dataset(task.hub_id, task.hub_config, split=hub_split)
    except Exception as err:  # network, auth, offline mode, missing dataset: all end the same way for the user
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise SinkdError(
            f"could not load {task.name} {split} from the Hugging Face hub ({task.hub_id}, {task.hub_config}, "
            f"split {hub_split}): {type(err).__name__}: {detail} — without network access, {_POINT_AT_LOCAL}"
        ) from err
    return _check_hub_split(task, dataset)


def _check_hub_split(task: Task, dataset: datasets.Dataset) -> datasets.Dataset:
    label_feature = dataset.features.get("label")
    hub_names = tuple(getattr(label_feature, "names", ()) or ())
    if hub_names and hub_names != task.label_names:
        # The label-id order is the contract between hub and local copies: refuse rather than mislabel.
        raise SinkdError(
            f"hub dataset {task.hub_id}/{task.hub_config} has labels {list(hub_names)}, expected "
            f"{list(task.label_names)} — the hub copy changed; use a local copy via --data-dir"
        )
    missing = [c for c in (*task.text_fields, "label") if c not in dataset.column_names]
    if missing:
        raise SinkdError(
            f"hub dataset {task.hub_id}/{task.hub_config} lacks columns {missing} — use a local copy via --data-dir"
        )
    dataset = dataset.select_columns([*task.text_fields, "label"])
    dataset = dataset.add_column("idx", list(range(len(dataset))))
    return dataset.cast(_features(task))


def load_split(task: Task | str, split: str, data_dir: str | os.PathLike | None = None) -> datasets.Dataset:
    """One split of ``task`` as a ``datasets.Dataset`` with columns ``text_fields + ["label", "idx"]``.

    split: ``"train"`` or ``"dev"`` (MNLI: ``"dev"`` is matched, ``"dev_mismatched"`` the other).
    data_dir: a local release copy (see module doc); default ``$SINKD_DATA_DIR``, else the hub.
    label: int, the hub's class id (``task.label_names[label]``); idx: int, row position 0..n-1.
    """
    task = get_task(task)
    if task.files is not None:  # a task of the user's own: its own files or hub dataset
        from sinkd_ray.task_files import read_split

        return read_split(task, _canonical_split(task, split))
    data_dir = data_dir if data_dir not in (None, "") else os.environ.get(DATA_DIR_ENV) or None
    if data_dir is not None:
        return read_local_split(task, split, data_dir)
    return read_hub_split(task, split)


def first_examples(dataset: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    """The first ``limit`` examples (``--max-train-examples`` / ``--max-eval-examples``), or all for None: the
    rows a run trains on, and the rows its cached teacher logits cover."""
    return dataset.select(range(min(limit, len(dataset)))) if limit else dataset


HOLDOUT_SEED = 0  # the held-out slice is the same for every run (rows, seeds) of a comparison


def holdout_split(dataset: datasets.Dataset, fraction: float) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(train, held-out): a fixed stratified split of ``fraction`` of the rows (seed ``HOLDOUT_SEED``, whatever the
    run's seed), in row order; ``idx`` is kept, so cached teacher logits still line up. fraction 0: (all, None).
    Without two examples of every class the split is not stratified."""
    if not fraction:
        return dataset, None
    from sklearn.model_selection import train_test_split

    labels = np.asarray(dataset["labels" if "labels" in dataset.column_names else "label"])
    stratify = labels if np.unique(labels, return_counts=True)[1].min() >= 2 else None
    try:
        train, held = train_test_split(
            np.arange(len(dataset)), test_size=fraction, random_state=HOLDOUT_SEED, stratify=stratify
        )
    except ValueError as err:  # too few rows for the fraction
        raise SinkdError(f"holdout_fraction={fraction} of {len(dataset)} examples: {err} — use more data") from None
    return dataset.select(np.sort(train)), dataset.select(np.sort(held))


# ------------------------------------------------------------------------------------------------ tokenising
def tokenize_split(
    dataset: datasets.Dataset, task: Task | str, tokenizer, max_length: int, prompt: bool = False
) -> datasets.Dataset:
    """Token ids for every example: columns ``input_ids``, ``attention_mask`` (plus ``token_type_ids``
    when the tokenizer makes them), ``labels`` and ``idx``; no padding (that happens per batch).

    prompt=False: the text fields as one sequence or a sequence pair, each truncated to ``max_length``
    tokens together (longest first). prompt=True: ``task.template`` rendered into one string, for
    encoder-decoder and decoder-only models; truncated from the left, because the answer slot is at the end.
    """
    task = get_task(task)
    if max_length < 8:
        raise SinkdError(f"max_length={max_length} is too short for any task input — use at least 8 (e.g. 128)")

    def encode(batch: dict) -> dict:
        if prompt:
            texts = [
                task.template.format(**dict(zip(task.text_fields, values)))
                for values in zip(*(batch[f] for f in task.text_fields))
            ]
            return tokenizer(texts, truncation=True, max_length=max_length)
        return tokenizer(*(batch[f] for f in task.text_fields), truncation=True, max_length=max_length)

    previous_side = tokenizer.truncation_side
    if prompt:
        tokenizer.truncation_side = "left"
    try:
        # An explicit fingerprint: otherwise `datasets` hashes the `encode` closure (tokenizer included)
        # through dill, which is slow and, inside Ray workers, prints the closure's bytecode.
        key = json.dumps(
            [
                dataset._fingerprint,
                task.name,
                getattr(tokenizer, "name_or_path", ""),
                len(tokenizer),
                max_length,
                prompt,
                task.template if prompt else "",
            ]
        )
        tokenized = dataset.map(
            encode,
            batched=True,
            remove_columns=list(task.text_fields),
            desc=f"tokenizing {task.name}",
            new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16],
        )
    finally:
        tokenizer.truncation_side = previous_side
    tokenized = tokenized.rename_column("label", "labels")
    keep = [
        c for c in ("input_ids", "attention_mask", "token_type_ids", "labels", "idx") if c in tokenized.column_names
    ]
    return tokenized.select_columns(keep)


def token_lengths(tokenized: datasets.Dataset) -> np.ndarray:
    """Tokens of each example (``input_ids`` lengths), read from the Arrow column without building Python lists."""
    import pyarrow.compute as pc

    return np.asarray(pc.list_value_length(tokenized.with_format("arrow")["input_ids"]), dtype=np.int64)


# ------------------------------------------------------------------------------------------------- batching
class GlobalBatchSampler(Sampler[list[int]]):
    """Global batches of ``b`` examples split across ``W`` data-parallel workers, ``b / W`` each.

    Every rank draws the same permutation of 0..n-1 for an epoch (seeded by ``(seed, epoch)``), cuts it
    into consecutive global batches of ``b``, and yields its contiguous slice ``[r·b/W, (r+1)·b/W)`` of each.
    So the union over ranks of step ``t``'s batches is exactly the batch one worker with ``b`` sees at step
    ``t`` — what global-batch Sinkhorn needs for ``W × b/W`` to equal ``1 × b``.

    drop_last=True drops the final incomplete global batch (training). drop_last=False keeps it and pads it
    to a multiple of W by repeating its first indices (as torch's DistributedSampler pads), so every rank
    runs the same number of forward passes (FSDP's collectives need that); de-duplicate results by ``idx``.
    ``len()`` is the number of steps per epoch, equal on every rank.

    ``lengths`` (tokens per example) groups examples of similar length into a batch, which pads each to its
    longest: random CoLA batches of 32 hold ~2× their real tokens, grouped ones ~1.04×. Shuffled, each window of
    ``GROUP_BATCHES`` global batches of the epoch's permutation is sorted by length and cut, and the batches are
    then shuffled (transformers' ``group_by_length``, which works per rank and so cannot give the global batches
    the global-batch Sinkhorn needs); in order (evaluation), longest first.
    """

    GROUP_BATCHES = 50

    def __init__(
        self,
        num_examples: int,
        global_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        lengths: np.ndarray | None = None,
    ) -> None:
        if lengths is not None and len(lengths) != num_examples:
            raise ValueError(f"{len(lengths)} lengths for {num_examples} examples")
        if world_size < 1 or not 0 <= rank < world_size:
            raise SinkdError(f"rank {rank} of world size {world_size} is impossible — need 0 <= rank < world_size")
        if global_batch_size < 1 or global_batch_size % world_size:
            raise SinkdError(
                f"global batch size {global_batch_size} is not a positive multiple of the {world_size} workers — "
                f"choose b divisible by the number of workers"
            )
        if num_examples < 1 or (drop_last and num_examples < global_batch_size):
            raise SinkdError(
                f"global batch size {global_batch_size} exceeds the {num_examples} examples, leaving no full "
                f"batch — choose a smaller batch size"
            )
        self.num_examples, self.global_batch_size = num_examples, global_batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.epoch = 0

    @classmethod
    def for_eval(
        cls,
        num_examples: int,
        global_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        lengths: np.ndarray | None = None,
    ) -> GlobalBatchSampler:
        """In order (longest first with ``lengths``), nothing dropped (the last batch padded to a multiple of W;
        see the class doc)."""
        return cls(num_examples, global_batch_size, rank, world_size, shuffle=False, drop_last=False, lengths=lengths)

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.world_size

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation; call before iterating each epoch, with the same value on every rank."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_examples // self.global_batch_size
        return math.ceil(self.num_examples / self.global_batch_size)

    def global_batches(self) -> list[np.ndarray]:
        """This epoch's global batches (the same on every rank), before splitting across ranks."""
        b = self.global_batch_size
        rng = np.random.default_rng((self.seed, self.epoch))
        if self.shuffle:
            order = rng.permutation(self.num_examples)
        else:
            order = np.arange(self.num_examples)
        if self.lengths is not None:
            window = self.GROUP_BATCHES * b if self.shuffle else len(order)
            # a stable sort, longest first: ties keep the permutation's (or the split's) order
            windows = np.split(order, range(window, len(order), window))
            order = np.concatenate([w[np.argsort(-self.lengths[w], kind="stable")] for w in windows])
        batches = [order[i : i + b] for i in range(0, len(order), b)]
        if batches and len(batches[-1]) < b:
            if self.drop_last:
                batches.pop()
            elif len(batches[-1]) % self.world_size:
                last = batches[-1]
                pad = -len(last) % self.world_size
                batches[-1] = np.concatenate([last, np.resize(last, pad)])
        if self.lengths is not None and self.shuffle:  # else every epoch would start with its longest batch
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            share = len(batch) // self.world_size
            yield batch[self.rank * share : (self.rank + 1) * share].tolist()


def make_loader(
    tokenized: datasets.Dataset, tokenizer, batch_sampler: Sampler[list[int]], num_workers: int = 0
) -> DataLoader:
    """A DataLoader over ``tokenized`` that pads each batch to its longest sequence.

    Each batch: ``input_ids``, ``attention_mask`` (b/W × L, L the longest in the batch), ``labels`` (b/W),
    ``idx`` (b/W), as int64 tensors (plus ``token_type_ids`` when present).
    """
    from transformers import DataCollatorWithPadding

    if tokenizer.pad_token is None:
        raise SinkdError(
            f"tokenizer {type(tokenizer).__name__} has no pad token — set one (e.g. tokenizer.pad_token = "
            f"tokenizer.eos_token) before building the loader"
        )
    collator = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    # Its own generator: a DataLoader iterator otherwise draws a base seed from torch's global generator, which
    # would shift the dropout stream of a run resumed from a checkpoint against the uninterrupted run.
    return DataLoader(
        tokenized,
        batch_sampler=batch_sampler,
        collate_fn=collator,
        num_workers=num_workers,
        generator=torch.Generator(),
    )
