"""The driver side of a run: the one path `train`, `tune` and `benchmarks/reproduce.py` all take.

    prepared = prepare_run(spec, layout, runtime)   # preflight → Ray runtime + resources → teacher → its logits
    result = fit_run(prepared, name)                # one Ray Train run (a TorchTrainer of `worker.ray_worker`)
    export_best(result, output_dir)                 # the best kept checkpoint → a save_pretrained folder

Everything that can be checked before minutes of work is checked in `preflight`, in the driver, with one line.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ray.train import UserCallback

from sinkd_ray import checkpoints
from sinkd_ray.config import TEACHER_BATCH_SIZE, DistillConfig, RunSpec, RuntimeConfig, TrainConfig, parse_resources
from sinkd_ray.data import load_split, local_split_path
from sinkd_ray.errors import SinkdError
from sinkd_ray.models import check_weights, has_task_head, layer_count, load_config, model_fingerprint
from sinkd_ray.storage import StorageLayout, ship
from sinkd_ray.tasks import Task, get_task
from sinkd_ray.teacher_cache import CachedTeacherLogits, LogitsRequest, cached_teacher_logits
from sinkd_ray.worker import FAILURE_FILE, ray_worker


@dataclass(frozen=True)
class PreparedRun:
    """A run ready to fit: its settings as the workers see them (local paths absolute, or shipped to the storage
    for other nodes), where it writes, how its workers get the teacher's logits (None: live teacher, or no
    teacher), and ``driver_spec``: the same settings with this machine's own paths (None: the same as ``spec``)."""

    spec: RunSpec
    layout: StorageLayout
    teacher_logits: CachedTeacherLogits | None
    driver_spec: RunSpec | None = None
    # how long each start of the run's worker group may wait for its resources (`worker_start_timeout`)
    start_timeout_s: int = 86_400

    @property
    def local_spec(self) -> RunSpec:
        return self.driver_spec or self.spec


# ------------------------------------------------------------------------------------------------ preflight
def _absolute_if_local(path: str | None) -> str | None:
    """Workers run in another directory: a relative local path must travel as an absolute one."""
    return str(Path(path).expanduser().resolve()) if path and Path(path).expanduser().exists() else path


def preflight(spec: RunSpec, *, max_batch_size: int | None = None, teacher_pending: bool = False) -> RunSpec:
    """Check what workers would otherwise fail on minutes later (and retry): models, data, layer counts, enough
    examples for one step (at the largest batch size a study may use). ``teacher_pending``: the teacher is yet to
    be fine-tuned. Returns the spec with local paths absolute. Reads only configs and the data files."""
    tcfg = spec.train
    tcfg = replace(
        tcfg,
        student=_absolute_if_local(tcfg.student),
        teacher=_absolute_if_local(tcfg.teacher),
        data_dir=_absolute_if_local(tcfg.data_dir),
    )
    task = get_task(tcfg.task)
    if tcfg.student is None:
        raise SinkdError("--student is required (a checkpoint, or a pretrained model with --student-layers K)")
    if tcfg.teacher is None and spec.distill.uses_teacher and not teacher_pending:
        raise SinkdError("no --teacher given: pass a fine-tuned teacher, or --alpha 0 --beta 0 for CE only")
    student_config = load_config(tcfg.student)
    check_weights(tcfg.student)
    available = layer_count(student_config)
    if tcfg.student_layers and available is not None and tcfg.student_layers > available:
        raise SinkdError(
            f"--student-layers {tcfg.student_layers}, but {tcfg.student} has only {available} layers "
            f"— choose K ≤ {available}"
        )
    if tcfg.teacher is not None:
        _check_teacher_head(load_config(tcfg.teacher), tcfg, task)
        check_weights(tcfg.teacher)
    train = load_split(task, "train", tcfg.data_dir)
    load_split(task, "dev", tcfg.data_dir)
    usable = min(len(train), tcfg.max_train_examples or len(train))
    step = (max_batch_size or spec.distill.batch_size) * tcfg.grad_accum_steps
    if usable < step:
        raise SinkdError(
            f"{usable} training examples give no full step of {step} (batch size × grad_accum_steps) "
            "— use more examples (--max-train-examples) or a smaller batch"
        )
    classes = set(train.select(range(usable))["label"])
    if len(classes) < 2:
        only = task.label_names[next(iter(classes))] if classes else "none"
        raise SinkdError(
            f"the {usable} training examples used hold one class only ({only!r}) — a classifier cannot learn from "
            "them: check the train file (or use more of it: --max-train-examples)"
        )
    return RunSpec(tcfg, spec.distill)


def _check_teacher_head(config, tcfg: TrainConfig, task: Task) -> None:
    if not has_task_head(config, tcfg.family, task):
        raise SinkdError(
            f"teacher '{tcfg.teacher}' is not a {task.name} classifier (architectures="
            f"{config.architectures}, num_labels={config.num_labels}) — fine-tune it first with "
            f"`python -m sinkd_ray.train --stage teacher --model {tcfg.teacher}`, or give it to "
            f"`python -m sinkd_ray.tune` as --teacher-base"
        )


# ------------------------------------------------------------------------------------------ the run's parts
def prepare_run(
    spec: RunSpec,
    layout: StorageLayout,
    runtime: RuntimeConfig,
    *,
    teacher_base: str | None = None,
    teacher_train: TrainConfig | None = None,
    teacher_batch_size: int = TEACHER_BATCH_SIZE,
    max_batch_size: int | None = None,
    trial_cpu: float = 0.0,
) -> PreparedRun:
    """preflight → Ray runtime and resources → teacher (fine-tuned once from ``teacher_base`` when the spec has
    none; ``teacher_train`` and ``teacher_batch_size``: its training settings) → its cached logits, shipped where
    workers read them.
    ``trial_cpu``: what a study's trial reserves beside its workers (Tune's trial actor)."""
    from sinkd_ray.runtime import check_resources, connect, worker_bundle

    finetune = spec.train.teacher is None and teacher_base is not None
    if finetune:
        load_config(teacher_base)  # exists and is readable (or one line), before anything starts
        check_weights(teacher_base)
    spec = preflight(spec, max_batch_size=max_batch_size, teacher_pending=finetune)
    _, started = connect(runtime.address)
    tcfg = spec.train
    wait = runtime.resources_wait if runtime.resources_wait is not None else (0.0 if started else ATTACHED_WAIT_S)
    check_resources(
        worker_bundle(tcfg.cpus_per_worker, tcfg.gpus_per_worker, parse_resources(tcfg.worker_resources)),
        tcfg.workers,
        wait_s=wait,
        extra_cpu=trial_cpu,
    )
    if finetune:
        teacher_cfg = teacher_train or replace(tcfg, workers=1)
        teacher = finetune_teacher(teacher_base, teacher_cfg, layout, runtime, batch_size=teacher_batch_size)
        spec = RunSpec(replace(tcfg, teacher=str(teacher)), spec.distill)
    # Inputs go to the storage before anything runs on another node: the teacher's logits are computed on a
    # worker node when the workers need resources the head lacks, and that node has no copy of this disk.
    teacher_elsewhere = spec.train.teacher is not None and (
        not uses_cached_logits(spec) or logits_on_a_worker_node(spec.train)
    )
    shipped = _ship_inputs(spec, layout, teacher_elsewhere)
    logits = prepare_teacher_logits(spec, layout, shipped=shipped)
    driver_spec = spec if shipped is not spec else None
    return PreparedRun(shipped, layout, logits, driver_spec, worker_start_timeout(runtime, started))


# A cluster this command attaches to may add nodes (autoscaling, a late join): how long a run waits for them.
ATTACHED_WAIT_S = 1800.0
LOCAL_START_TIMEOUT_S = 86_400  # the local runtime was checked to fit the run: only other trials can hold it up


def worker_start_timeout(runtime: RuntimeConfig, started_locally: bool) -> int:
    """Seconds each start (and restart) of a run's worker group waits for its resources before the run fails:
    ``--resources-wait``, or its default. Ray Train V2 gives up after 60 s and counts that as a controller
    failure, so with a limit of 2 a cold cluster failed its first trials after ~3 minutes. A whole number (Ray's
    wait takes int64 seconds: inf overflows and fails at once)."""
    if runtime.resources_wait is not None:
        return max(1, int(runtime.resources_wait))
    return LOCAL_START_TIMEOUT_S if started_locally else int(ATTACHED_WAIT_S)


def uses_cached_logits(spec: RunSpec) -> bool:
    """The workers read the teacher's cached logits (not a live teacher, no online modules, a teacher at all)."""
    tcfg = spec.train
    return tcfg.teacher is not None and tcfg.teacher_source == "cache" and not spec.distill.online_teacher


def logits_on_a_worker_node(tcfg: TrainConfig) -> bool:
    """Where the teacher's forward passes run: on a node like the run's workers' (a Ray task with one worker's
    resources) when they need GPUs or custom resources — a cluster's head usually has neither —, else here."""
    return bool(tcfg.gpus_per_worker or parse_resources(tcfg.worker_resources))


def prepare_teacher_logits(
    spec: RunSpec, layout: StorageLayout, *, shipped: RunSpec | None = None
) -> CachedTeacherLogits | None:
    """The teacher's train-split logits, computed once per key (on a worker node when the run's workers need
    resources the head lacks: `logits_on_a_worker_node`) and reused; None when the run has no teacher, runs it
    live, or trains online modules on it. ``spec`` has this machine's paths (the key hashes the local teacher's
    weights); ``shipped``, the same settings as other nodes reach them (`_ship_inputs`), is what a worker node
    computes from."""
    tcfg = spec.train
    if not uses_cached_logits(spec):
        return None
    path, computed = cached_teacher_logits(
        logits_request(spec, "train"), layout.teacher_cache_dir, compute=_logits_on_a_worker(shipped or spec)
    )
    print(
        f"teacher logits for {get_task(tcfg.task).name}/train: {'computed' if computed else 'reused'} ({path.name})",
        flush=True,
    )
    if layout.remote:  # workers on other nodes cannot read the driver's disk: a few MB through the object store
        import ray

        from sinkd_ray.teacher_cache import load_teacher_logits

        return CachedTeacherLogits(object_ref=ray.put(load_teacher_logits(path)))
    return CachedTeacherLogits(path=str(path))


def logits_request(spec: RunSpec, split: str) -> LogitsRequest:
    """The cache request for ``split``: computed where the run computes (a GPU worker when it uses GPUs), at the
    precision that device resolves ``--bf16`` to, the teacher in ``teacher_dtype``."""
    import torch

    from sinkd_ray.hardware import resolve_bf16

    tcfg = spec.train
    bf16 = (
        _worker_resolves_bf16(tcfg) if logits_on_a_worker_node(tcfg) else resolve_bf16(tcfg.bf16, torch.device("cpu"))
    )
    dtype = {"auto": "bfloat16" if bf16 else "float32"}.get(tcfg.teacher_dtype, tcfg.teacher_dtype)
    return LogitsRequest(
        teacher=tcfg.teacher,
        task=tcfg.task,
        split=split,
        data_dir=tcfg.data_dir,
        max_length=tcfg.max_length,
        logit_space=tcfg.logit_space,
        quantization=tcfg.teacher_quantization,
        bf16=bf16,
        family=tcfg.family,
        dtype=dtype,
        max_examples=tcfg.max_train_examples if split == "train" else None,
    )


def teacher_dev_score(prepared: PreparedRun) -> float:
    """The teacher's dev metric from its (cached) dev logits: class logits, or the label words' columns of
    vocabulary logits (what the model would answer). Computed where the train logits were (`prepare_run`)."""
    from transformers import AutoTokenizer

    from sinkd_ray.models import detect_family, label_token_ids, resolve_logit_space
    from sinkd_ray.tasks import compute_metrics
    from sinkd_ray.teacher_cache import load_teacher_logits

    spec, layout = prepared.local_spec, prepared.layout
    tcfg, task = spec.train, get_task(spec.train.task)
    path, _ = cached_teacher_logits(
        logits_request(spec, "dev"), layout.teacher_cache_dir, compute=_logits_on_a_worker(prepared.spec)
    )
    logits = load_teacher_logits(path)
    family = detect_family(load_config(tcfg.teacher), tcfg.family)
    if resolve_logit_space(tcfg.logit_space, family) == "vocab":
        tokenizer = AutoTokenizer.from_pretrained(str(_resolve_model(tcfg.teacher)))
        logits = logits[:, label_token_ids(tokenizer, task.verbalizer, family, task.template)]
    labels = load_split(task, "dev", tcfg.data_dir)["label"]
    return compute_metrics(task, logits.argmax(-1)[: len(labels)], labels)[task.metric]


def _resolve_model(path_or_name: str) -> str:
    from sinkd_ray.models import resolve_source

    return resolve_source(path_or_name)


def _worker_task(tcfg: TrainConfig):
    """A Ray task with one worker's resources: it runs on a node of the kind the run's workers run on."""
    import ray

    return ray.remote(
        num_gpus=min(1.0, tcfg.gpus_per_worker),
        num_cpus=tcfg.cpus_per_worker,
        resources=parse_resources(tcfg.worker_resources) or None,
    )


def _worker_device(tcfg: TrainConfig):
    import torch

    return torch.device("cuda" if tcfg.gpus_per_worker else "cpu")


def _worker_resolves_bf16(tcfg: TrainConfig) -> bool:
    """``--bf16`` as given, or auto as a worker node of this run resolves it (the driver may have no GPU)."""
    if tcfg.bf16 is not None:
        return tcfg.bf16

    def probe(device) -> bool:
        from sinkd_ray.hardware import resolve_bf16

        return resolve_bf16(None, device)

    import ray

    return ray.get(_worker_task(tcfg)(probe).remote(_worker_device(tcfg)))


def _logits_on_a_worker(shipped: RunSpec):
    """``compute`` for `cached_teacher_logits`: None (here, on the CPU) unless the run's workers need resources the
    head lacks; then a Ray task on such a node, given the request with the inputs as that node reaches them
    (``shipped``: storage URIs, `storage.localize` fetches them there)."""
    tcfg = shipped.train
    if not logits_on_a_worker_node(tcfg):
        return None

    def compute(request: LogitsRequest):
        import ray

        def on_worker(request: LogitsRequest, device, threads: int):
            import torch

            torch.set_num_threads(threads)
            # Ray prints this with the node's address: where the teacher ran
            print(f"teacher logits for {request.task}/{request.split}: computing on this worker node ({device})")
            return request.compute(device)

        remote = replace(request, teacher=tcfg.teacher, data_dir=tcfg.data_dir, task=tcfg.task)
        threads = max(1, round(tcfg.cpus_per_worker))
        return ray.get(_worker_task(tcfg)(on_worker).remote(remote, _worker_device(tcfg), threads))

    return compute


def _ship_inputs(spec: RunSpec, layout: StorageLayout, teacher_elsewhere: bool) -> RunSpec:
    """With remote storage the workers may run on other nodes: local folders read there (the student, a GLUE copy,
    the teacher when it runs live or computes its logits on a worker node) are uploaded to the storage once and
    passed as URIs (`storage.localize` on that node). Returns ``spec`` itself when nothing travels."""
    if not layout.remote:
        return spec
    tcfg = spec.train
    changes = {}
    if tcfg.student and Path(tcfg.student).is_dir():
        changes["student"] = ship(Path(tcfg.student), layout)
    if teacher_elsewhere and tcfg.teacher and Path(tcfg.teacher).is_dir():
        changes["teacher"] = ship(Path(tcfg.teacher), layout)
    task = get_task(tcfg.task)
    if task.files is not None and task.files.hub is None:  # a task of the user's own: its file and its data
        changes["task"] = f"{ship(_own_task_folder(task), layout)}/task.yaml"
    elif tcfg.data_dir and Path(tcfg.data_dir).is_dir():
        changes["data_dir"] = ship(_task_files(tcfg), layout)
    return RunSpec(replace(tcfg, **changes), spec.distill) if changes else spec


def _own_task_folder(task: Task) -> Path:
    """A task file of the user's own with its data files beside it, named as the copy's task file says."""
    import yaml

    folder = Path(tempfile.mkdtemp(prefix="sinkd-task-")) / f"{task.name}-task"
    folder.mkdir()
    raw = yaml.safe_load(Path(task.files.path).read_text(encoding="utf-8"))
    for split in ("train", "dev"):
        source = getattr(task.files, split)
        if source:
            target = f"{split}{Path(source).suffix}"
            shutil.copy2(source, folder / target)
            raw[split] = target
    (folder / "task.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return folder


def _task_files(tcfg: TrainConfig) -> Path:
    """Only the task's own split files, in the release layout (a GLUE copy can be gigabytes)."""
    task = get_task(tcfg.task)
    folder = Path(tempfile.mkdtemp(prefix="sinkd-data-")) / f"{task.name}-data"
    for split in ("train", "dev"):
        source = local_split_path(task, split, tcfg.data_dir)
        target = folder / ("superglue" if task.benchmark == "super_glue" else "glue") / source.parent.name / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    return folder


# --------------------------------------------------------------------------------------------------- fitting
def build_trainer(prepared: PreparedRun, *, storage_path: str, name: str, callbacks: list | None = None):
    """A ``TorchTrainer`` for one run (used directly by `fit_run` and once per trial by a study)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    tcfg = prepared.spec.train
    resources = {"CPU": tcfg.cpus_per_worker, **parse_resources(tcfg.worker_resources)}
    if tcfg.gpus_per_worker:
        resources["GPU"] = tcfg.gpus_per_worker
    return TorchTrainer(
        ray_worker,
        train_loop_config={
            "spec": prepared.spec.to_dict(),
            "teacher_logits": prepared.teacher_logits,
            # 1.99 CPUs (room for a study's 0.01-CPU trial on a 2-core machine) still runs 2 threads
            "threads": max(1, round(tcfg.cpus_per_worker)),
        },
        scaling_config=ScalingConfig(
            num_workers=tcfg.workers, use_gpu=tcfg.gpus_per_worker > 0, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=callbacks,
            # Each start of the worker group waits up to start_timeout_s for its resources (`fit` sets it); a timed-out
            # start counts against controller_failure_limit: the first start and one per restart after a crash.
            failure_config=FailureConfig(
                max_failures=tcfg.max_failures, controller_failure_limit=tcfg.max_failures + 1
            ),
            checkpoint_config=CheckpointConfig(
                num_to_keep=tcfg.checkpoints_to_keep,
                checkpoint_score_attribute="dev_metric",
                checkpoint_score_order="max",
            ),
        ),
    )


START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # read by Train V2's controller at every start


def fit(trainer, run_dir: str, start_timeout_s: int = LOCAL_START_TIMEOUT_S):
    """``trainer.fit()``; a run whose workers recorded a failure that retrying cannot fix raises it as one line.
    ``start_timeout_s``: how long each start of the worker group waits for nodes (Train V2 reads it from this
    process's environment and hands it to the run's controller)."""
    import os

    from ray.exceptions import NodeDiedError, RayActorError, RaySystemError
    from ray.train import TrainingFailedError

    os.environ[START_TIMEOUT_ENV] = str(int(start_timeout_s))
    # Train V2's print patch sends a worker's print to its logger and also to the wrapped stdout: every line a
    # worker printed (progress, precision) reached the driver twice. Read by Train where fit() is called.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    _remove(run_dir, FAILURE_FILE)  # from an earlier attempt of a run with this name
    try:
        result = trainer.fit()
    except TrainingFailedError as exc:
        raise SinkdError(
            f"run {run_dir.rsplit('/', 1)[-1]} failed: {first_error_line(exc)} — worker logs under "
            f"{run_dir} and /tmp/ray/session_latest/logs; rerun the same command to resume from its "
            "last checkpoint"
        ) from exc
    except (RayActorError, NodeDiedError, RaySystemError) as exc:  # the run's controller, its node or Ray itself
        raise SinkdError(
            f"run {run_dir.rsplit('/', 1)[-1]}: the Ray runtime under it went away ({type(exc).__name__}: "
            f"{first_error_line(exc)[:160]}) — was `ray stop` run, or the head lost? Start Ray again and rerun "
            "the same command: the run resumes from its last checkpoint"
        ) from None
    failure = _read(run_dir, FAILURE_FILE)
    if failure is not None:
        raise SinkdError(json.loads(failure)["message"])
    return result


def fit_run(prepared: PreparedRun, name: str, callbacks: list | None = None):
    """Fit one run named ``name`` under the storage root (an existing name resumes that run)."""
    return fit(
        build_trainer(prepared, storage_path=prepared.layout.root, name=name, callbacks=callbacks),
        prepared.layout.run_dir(name),
        prepared.start_timeout_s,
    )


def first_error_line(exc: BaseException) -> str:
    """The most specific line of a (possibly nested) worker error."""
    lines = [
        ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.strip().startswith(("File", "^", "..."))
    ]
    errors = [ln for ln in lines if "Error:" in ln or "Error(" in ln]
    return (errors[-1] if errors else lines[-1] if lines else type(exc).__name__)[:300]


def _fs(uri_or_path: str):
    import pyarrow.fs

    return (
        pyarrow.fs.FileSystem.from_uri(uri_or_path)
        if "://" in uri_or_path
        else (pyarrow.fs.LocalFileSystem(), uri_or_path)
    )


def _read(folder: str, name: str) -> str | None:
    import pyarrow.fs

    fs, path = _fs(folder)
    if fs.get_file_info(f"{path}/{name}").type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_stream(f"{path}/{name}") as handle:
        return handle.read().decode()


def _remove(folder: str, name: str) -> None:
    import pyarrow.fs

    fs, path = _fs(folder)
    if fs.get_file_info(f"{path}/{name}").type != pyarrow.fs.FileType.NotFound:
        fs.delete_file(f"{path}/{name}")


# ---------------------------------------------------------------------------------------------------- export
def _on_local_disk(item) -> bool:
    """A Ray Checkpoint / Result on the local filesystem (objects without a filesystem count as local)."""
    import pyarrow.fs

    return isinstance(getattr(item, "filesystem", None) or pyarrow.fs.LocalFileSystem(), pyarrow.fs.LocalFileSystem)


def best_checkpoint_dir(result, download_to: Path | None = None) -> Path:
    """The kept checkpoint with the best dev metric (``num_to_keep`` deletes the others), as a local folder:
    a checkpoint on remote storage is downloaded (into ``download_to``, else a new temporary folder)."""
    ranked = sorted(
        ((metrics.get("dev_metric", float("-inf")), ckpt) for ckpt, metrics in result.best_checkpoints),
        key=lambda pair: pair[0],
        reverse=True,
    )
    for _, ckpt in ranked:
        local = (
            Path(ckpt.path)
            if _on_local_disk(ckpt)
            else Path(ckpt.to_directory(str(download_to) if download_to else None))
        )
        if (local / checkpoints.METRICS_FILE).is_file():  # a listed checkpoint whose files are gone is skipped
            return local
    raise SinkdError(f"the run under {result.path} left no checkpoint — see its worker logs")


def export_best(result, output_dir: Path) -> dict:
    """Write the best checkpoint's student into ``output_dir`` (save_pretrained) and return its metrics.
    Nothing is deleted: files of the same name are overwritten, others stay."""
    run_dir, out = Path(result.path).resolve(), output_dir.resolve()
    if _on_local_disk(result) and (out == run_dir or run_dir in out.parents):
        raise SinkdError(f"--output-dir {output_dir} overlaps the run's own folder {run_dir} — choose another")
    return checkpoints.export_student(best_checkpoint_dir(result), output_dir)


# ---------------------------------------------------------------------------------------------- the teacher
def teacher_run_spec(base: str, train: TrainConfig, batch_size: int = TEACHER_BATCH_SIZE) -> RunSpec:
    """CE fine-tuning of ``base`` with the run's data, length and precision settings (one worker)."""
    return RunSpec(
        replace(train, student=base, student_layers=None, teacher=None, fault_at_step=None),
        DistillConfig(alpha=0.0, beta=0.0, batch_size=batch_size),
    )


def finetune_teacher(
    base: str,
    train: TrainConfig,
    layout: StorageLayout,
    runtime: RuntimeConfig,
    output_dir: Path | None = None,
    batch_size: int = TEACHER_BATCH_SIZE,
) -> Path:
    """Fine-tune ``base`` on the task with CE only, once: a finished teacher with the same inputs is reused.

    The folder name carries the base model's fingerprint and the training settings, so changing either
    trains a new teacher rather than silently reusing a stale one.
    """
    spec = teacher_run_spec(base, train, batch_size)
    settings = {k: v for k, v in spec.train.to_dict().items() if k != "fault_at_step"}
    settings = json.dumps({**settings, "batch_size": batch_size}, sort_keys=True)
    key = hashlib.sha256((model_fingerprint(base) + settings).encode()).hexdigest()[:12]
    task = get_task(spec.train.task)
    output_dir = output_dir or layout.teacher_dir(task.name, key)
    if (output_dir / "dev_metrics.json").exists():
        metrics = json.loads((output_dir / "dev_metrics.json").read_text())
        print(f"teacher: reusing {output_dir} (dev {metrics['dev_metric']:.4f})")
        return output_dir
    print(f"teacher: fine-tuning {base} on {task.name} ({spec.train.epochs} epochs, CE only) -> {output_dir}")
    t0 = time.time()
    prepared = prepare_run(spec, layout, runtime)
    result = fit_run(prepared, f"teacher-{task.name}-{key}", callbacks=[PrintProgress()])
    metrics = export_best(result, output_dir)
    print(f"teacher: dev {get_task(spec.train.task).metric}={metrics['dev_metric']:.4f} in {time.time() - t0:.0f}s")
    return output_dir


class PrintProgress(UserCallback):
    """One line per evaluation. Runs in the Ray Train controller; Ray forwards its output to the driver."""

    def after_report(self, run_context, metrics, checkpoint):
        print_progress(metrics[0])


def print_progress(metrics: dict) -> None:
    comps = " ".join(f"{k[6:]}={v:.4f}" for k, v in metrics.items() if k.startswith("train_"))
    shares = " ".join(f"{k[11:]}={v:.3f}" for k, v in metrics.items() if k.startswith("grad_share_"))
    held = f" holdout_metric={metrics['holdout_metric']:.4f}" if "holdout_metric" in metrics else ""
    print(
        f"epoch {metrics['epoch']:.2f} step {metrics['step']}: dev_metric={metrics['dev_metric']:.4f}{held} "
        f"{comps}{f' grad shares {shares}' if shares else ''} examples/s={metrics['examples_per_s']:.1f}",
        flush=True,
    )
