"""llama.cpp's own sources, as the `llama-cpp-python` sdist vendors them: its converter (the GGUF
reference of the converter tests) and `llama-server` (W16's peer), built here with CMake.

The sdist is fetched once with `pip download --no-binary`, checked against its SHA-256 and
cached; the parts are extracted under names that say their version, complete or not at all.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from scanlab.storage import default_cache

SDIST = "llama-cpp-python==0.3.36"
SDIST_FILE = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VENDORED = "llama_cpp_python-0.3.36/vendor/llama.cpp/"


def sources(parts: tuple[str, ...], target: Path, cache: Path | None = None) -> Path:
    """`target`, holding the vendored llama.cpp files whose paths start with one of `parts`
    (extracted once from the hash-checked sdist in `cache`, default scanlab's)."""
    if target.is_dir():
        return target
    cache = default_cache() if cache is None else cache
    archive = cache / SDIST_FILE
    if not archive.is_file():
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*command, "--dest", str(cache), SDIST], check=True, capture_output=True)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise OSError(f"{archive} has SHA-256 {digest}, expected {SDIST_SHA256}: delete it")
    with tarfile.open(archive) as sdist:
        members = [
            member.replace(name=member.name.removeprefix(VENDORED))
            for member in sdist.getmembers()
            if member.name.removeprefix(VENDORED).startswith(parts)
        ]
        staging = target.with_suffix(".partial")
        shutil.rmtree(staging, ignore_errors=True)
        sdist.extractall(staging, members=members, filter="data")
    staging.rename(target)
    return target


def llama_server(cache: Path | None = None) -> Path | None:
    """The `llama-server` binary built from the vendored sources (once: a few minutes), or None
    where CMake or a C++ compiler is missing."""
    cache = default_cache() if cache is None else cache
    tree = cache / "llama.cpp-0.3.36"
    build = tree / "build"
    binary = build / "bin" / "llama-server"
    if binary.is_file():
        return binary
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        return None
    sources(("",), tree, cache)
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF"]
    flags += ["-DLLAMA_OPENSSL=OFF"]
    flags += ["-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON"]
    configure = ["cmake", "-S", str(tree), "-B", str(build), *flags]
    subprocess.run(configure, check=True, capture_output=True)
    command = ["cmake", "--build", str(build), "--target", "llama-server", "-j"]
    subprocess.run(command, check=True, capture_output=True)
    return binary
