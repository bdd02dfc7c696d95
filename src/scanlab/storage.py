"""Where scanlab keeps what it fetches or builds (model files, the compiled kernel), and how it
writes what it makes: whole or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

CACHE_ENV = "SCANLAB_CACHE"


def default_cache() -> Path:
    """$SCANLAB_CACHE, else ~/.cache/scanlab."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "scanlab")


def digest(path: Path) -> str:
    """The SHA-256 of a file, or of a directory's files (their names and contents, in order)."""
    many = path.is_dir()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if many else [path]
    hashed = hashlib.sha256()
    for file in files:
        if many:
            hashed.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as content:
            hashlib.file_digest(content, lambda: hashed)
    return hashed.hexdigest()


@contextlib.contextmanager
def staged_file(path: Path) -> Iterator[Path]:
    """A file to write that becomes `path` (replacing it) when the block ends; removed if the
    block raises, so `path` is never half-written. It gets the permissions a plain `open` would
    (the umask's), not the temporary file's private ones."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(descriptor)
    staging = Path(name)
    try:
        yield staging
        staging.chmod(0o666 & ~_umask())
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def staged_directory(path: Path) -> Iterator[Path]:
    """An empty directory to fill that becomes `path` (replacing it) when the block ends;
    removed if the block raises. It and what it holds get the umask's permissions, as `mkdir`
    and `open` give, whatever their writers used (safetensors' are private)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield staging
        mask = _umask()
        for written in staging.rglob("*"):
            written.chmod((0o777 if written.is_dir() else 0o666) & ~mask)
        staging.chmod(0o777 & ~mask)
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # reading it means setting it: put it straight back
    os.umask(mask)
    return mask
