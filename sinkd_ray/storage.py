"""Every path a run or a study writes, in one object.

    <root>/                          --storage-path: a local folder, or a pyarrow URI (s3://, gs://, file://)
      <study>/                       Ray Tune's experiment (tuner.pkl, trial results)
      <study>-train/trial_<id>/      one Ray Train run per trial (checkpoints)
      <run name>/                    a single `python -m sinkd_ray.train` run
      mlflow.db, mlartifacts/        the embedded MLflow store (local roots only)
    <work>/                          the driver's own disk: <root> when it is local, else $SINKD_CACHE_DIR
      teachers/<task>-<key>/         fine-tuned teachers (save_pretrained)
      teacher_cache/                 teacher logits (safetensors, one file per key)
      <study>/best_student/          the exported best student of a study; <study>/summary/ its leaderboard
      <run name>-best/               the exported best student of a single run

This is the layout earlier versions wrote too (studies written by them resume unchanged).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sinkd_ray.errors import SinkdError
from sinkd_ray.pretrained import cache_root

TUNER_STATE = "tuner.pkl"


def is_remote(storage: str) -> bool:
    """s3://, gs://, file://, … (a pyarrow URI): what Ray reaches through pyarrow, shared by every node."""
    return "://" in storage


@dataclass(frozen=True)
class StorageLayout:
    root: str  # an absolute local path or a URI

    @classmethod
    def at(cls, storage_path: str) -> StorageLayout:
        """The layout under ``--storage-path``: a URI as given, a local path made absolute and checked usable."""
        if is_remote(storage_path):
            return cls(storage_path.rstrip("/"))
        path = Path(storage_path).expanduser().resolve()
        if path.exists() and not path.is_dir():
            raise SinkdError(f"--storage-path {storage_path} is a file — give a folder (it is created if missing)")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SinkdError(
                f"--storage-path {storage_path} cannot be created ({err.strerror}) — choose a writable folder"
            ) from None
        if not os.access(path, os.W_OK | os.X_OK):
            raise SinkdError(f"--storage-path {storage_path} is not writable — choose a writable folder")
        return cls(str(path))

    @property
    def remote(self) -> bool:
        return is_remote(self.root)

    # ----------------------------------------------------------------------------------- on the storage
    def run_dir(self, name: str) -> str:
        """A Ray Train run (a single run, or a trial's run under ``trials_root``)."""
        return f"{self.root}/{name}"

    def study_dir(self, study: str) -> str:
        return f"{self.root}/{study}"

    def trials_root(self, study: str) -> str:
        """Where the trials' Ray Train runs live (the storage_path given to each trial's trainer)."""
        return f"{self.root}/{study}-train"

    @staticmethod
    def trial_run_name(trial_id: str) -> str:
        # fixed per trial: when a resumed study restarts a trial, Ray Train resumes its last checkpoint
        return f"trial_{trial_id}"

    def trial_run_dir(self, study: str, trial_id: str) -> str:
        return f"{self.trials_root(study)}/{self.trial_run_name(trial_id)}"

    def study_exists(self, study: str) -> bool:
        if self.remote:
            from ray import tune

            return tune.Tuner.can_restore(self.study_dir(study))
        return Path(self.study_dir(study), TUNER_STATE).exists()

    def latest_study(self, task: str) -> str | None:
        """The most recently written study of ``task`` (local roots only: remote ones are not listed)."""
        if self.remote:
            return None
        studies = sorted(Path(self.root).glob(f"{task}-*/{TUNER_STATE}"), key=lambda p: p.stat().st_mtime)
        return studies[-1].parent.name if studies else None

    # ----------------------------------------------------------------------------- on the driver's disk
    @property
    def work_dir(self) -> Path:
        """Fine-tuned teachers, teacher-logit caches, exported students: the storage folder when it is local,
        else $SINKD_CACHE_DIR (default ~/.cache/sinkd_ray) on the driver."""
        return cache_root() if self.remote else Path(self.root)

    def teacher_dir(self, task: str, key: str) -> Path:
        return self.work_dir / "teachers" / f"{task}-{key}"

    @property
    def teacher_cache_dir(self) -> Path:
        return self.work_dir / "teacher_cache"

    def run_export_dir(self, name: str) -> Path:
        return self.work_dir / f"{name}-best"

    def study_export_dir(self, study: str) -> Path:
        return self.work_dir / study / "best_student"

    def study_summary_dir(self, study: str) -> Path:
        return self.work_dir / study / "summary"

    def lock_study(self, study: str):
        """Hold the study for this process (an flock the kernel releases when the process ends, however it ends):
        a second command with the same --name at the same time is refused instead of writing over the first's
        trials. On a cluster every study's driver runs on the head, whose disk holds the lock. Keep the returned
        file open for as long as the study runs."""
        import fcntl

        path = self.work_dir / f".{study}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise SinkdError(
                f"study '{study}' is running in another command right now (pid {holder}) — wait for it to end, or "
                "give this one another --name"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        return handle

    # -------------------------------------------------------------------------------------------- MLflow
    def default_tracking_uri(self) -> str | None:
        """The embedded MLflow store: a SQLite file in a local root (a remote root needs a tracking server)."""
        return None if self.remote else f"sqlite:///{Path(self.root) / 'mlflow.db'}"

    def artifact_location(self, tracking_uri: str | None = None) -> str | None:
        """Where a new MLflow experiment keeps its artifacts: beside the runs; None (the server's own, proxied
        artifact root) when the runs live in a bucket and an MLflow server tracks them. A bucket tracked by a
        database (sqlite, postgresql…) gets the bucket: MLflow would otherwise write to ./mlruns in whatever
        folder the driver was started from."""
        if not self.remote:
            return Path(self.root, "mlartifacts").as_uri()
        if tracking_uri and not tracking_uri.startswith(("http://", "https://", "databricks")):
            return f"{self.root.rstrip('/')}/mlartifacts"
        return None


# ------------------------------------------------------------------------------------------- disk space
def free_bytes(path: str | Path) -> int:
    """Free bytes on the filesystem holding ``path`` (its nearest existing parent)."""
    import shutil

    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n / 2**10:,.0f} KiB"


# ----------------------------------------------------------------------------- inputs for other nodes
INPUTS = "_inputs"  # on remote storage: local inputs (a student folder, a GLUE copy) uploaded for the workers


def _tree_digest(folder: Path) -> str:
    """Names, sizes and modification times of every file: changes when the folder does, without reading it."""
    import hashlib

    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(folder)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def ship(folder: Path, layout: StorageLayout) -> str:
    """Upload a driver-local folder to ``<root>/_inputs/<digest>/<name>`` once and return that URI: workers on
    other nodes have no copy of the driver's disk, but they all reach the storage (`localize` fetches it)."""
    import pyarrow.fs

    uri = f"{layout.root}/{INPUTS}/{_tree_digest(folder)}/{folder.name}"
    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    if fs.get_file_info(f"{path}/.complete").type == pyarrow.fs.FileType.NotFound:
        fs.create_dir(path, recursive=True)
        pyarrow.fs.copy_files(str(folder), path, destination_filesystem=fs)
        with fs.open_output_stream(f"{path}/.complete") as out:
            out.write(b"")
    return uri


def localize(path_or_uri: str | None) -> str | None:
    """A URI written by `ship` → a node-local copy (downloaded once into $SINKD_CACHE_DIR/inputs); anything else
    (a local path, a hub id, an ``offline:`` name, None) unchanged."""
    if not path_or_uri or not is_remote(path_or_uri):
        return path_or_uri
    import hashlib
    import shutil
    import tempfile

    import pyarrow.fs

    dest = (
        cache_root() / "inputs" / hashlib.sha256(path_or_uri.encode()).hexdigest()[:16] / path_or_uri.rsplit("/", 1)[-1]
    )
    if not (dest.parent / ".complete").exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=dest.parent))
        try:
            source_fs, source = pyarrow.fs.FileSystem.from_uri(path_or_uri)
            (staging / dest.name).mkdir()
            pyarrow.fs.copy_files(
                source,
                str(staging / dest.name),
                source_filesystem=source_fs,
                destination_filesystem=pyarrow.fs.LocalFileSystem(),
            )
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(staging / dest.name, dest)  # atomic: concurrent workers on one node see all or nothing
            (dest.parent / ".complete").touch()
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return str(dest)
