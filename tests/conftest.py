import jax

# Implicit rank promotion hides shape bugs (a (H,) carry silently broadcast against (B, H)),
# implicit dtype promotion hides precision bugs (a bfloat16 carry silently widened by a float32
# weight): make both errors in every test, as equinox does.
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

import ast  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import io  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402
from unittest import mock  # noqa: E402

import pytest  # noqa: E402
from tests.tiny import fast_compile_env  # noqa: E402

# Real model files (scanlab.decoder.formats.pretrained) are fetched once into the checkout's git-ignored
# .cache, hash-checked, and shared by every test, the tour's and the README's included.
CACHE = Path(__file__).resolve().parents[1] / ".cache"
os.environ.setdefault("SCANLAB_CACHE", str(CACHE))
# Compiled programs are shared through JAX's persistent cache: the tour, the README and the CLI
# tests run in their own processes and compile many of the same programs (training chunks, the
# real model's decoding) that other tests compile too. The environment reaches those processes.
# No size limit: with one, JAX's eviction reads an access-time file per entry and fails on entries
# written without (by a process without the limit). A run adds ~20 MB; `make clean` empties it.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(CACHE / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from scanlab.decoder.formats import pretrained

    return pretrained.fetch(pretrained.SMOLLM2)


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    from scanlab.decoder.formats import pretrained

    return pretrained.fetch(pretrained.GEMMA3_270M)


@pytest.fixture
def on_host_devices(tmp_path):
    """Runs a Python snippet in a fresh process whose CPU shows as `n` devices.

    The device count must be set before JAX's backend starts, so multi-device tests run apart
    from this process, which keeps one device. The snippet's stdout is returned.
    """

    def run(n: int, code: str) -> str:
        script = f"from scanlab import sharding\nsharding.host_devices({n})\n" + textwrap.dedent(
            code
        )
        result = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=600,
            env=fast_compile_env(),  # tiny models
        )
        assert result.returncode == 0, result.stderr[-4000:]
        return result.stdout

    return run


@pytest.fixture
def cli():
    """Runs `scanlab ARGS` in this process through its real entry point; returns
    (exit status, stderr, stdout)."""
    from scanlab.cli import main

    def invoke(args: list[str]) -> tuple[int, str, str]:
        err, out = io.StringIO(), io.StringIO()
        status = 0
        with (
            mock.patch.object(sys, "argv", ["scanlab", *args]),
            contextlib.redirect_stderr(err),
            contextlib.redirect_stdout(out),
        ):
            try:
                main()
            except SystemExit as exit_:
                status = int(exit_.code or 0)
        return status, err.getvalue(), out.getvalue()

    return invoke


# What the parity tests compare against: `make test-fast` (`--no-oracles`) leaves out every test
# module that imports one, itself or through a helper of the suite (e.g. tests/decoder/oracle.py),
# without importing it; `make test` runs them all.
ORACLES = ("torch", "transformers", "peft")
ROOT = Path(__file__).resolve().parents[1]


def pytest_addoption(parser):
    parser.addoption(
        "--no-oracles",
        action="store_true",
        help=f"skip test modules that import {', '.join(ORACLES)} (make test-fast)",
    )


@functools.cache
def imports_an_oracle(path: Path) -> bool:
    """Whether the module at `path` imports an oracle at its top, itself or through a module of
    tests/ (an import inside one test is that test's business)."""
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in ORACLES:
                return True
            helper = ROOT.joinpath(*name.split(".")).with_suffix(".py")
            if name.startswith("tests.") and helper.is_file() and imports_an_oracle(helper):
                return True
    return False


def pytest_ignore_collect(collection_path: Path, config):
    if config.getoption("no_oracles") and collection_path.suffix == ".py":
        return imports_an_oracle(collection_path) or None
    return None


# Fixtures that read a real model file (fetched on first use): their tests are `slow` or `e2e`,
# so `make test-fast` runs offline.
MODEL_FIXTURES = ("smollm2_path", "gemma3_path")


def pytest_collection_modifyitems(items):
    """Checks that every test reading a real model is marked slow or e2e; then sorts the end-to-end
    and slow files first: xdist hands files to workers in collection order, so the long ones start
    at once and the short ones fill in after (longest first balances the two workers; the order
    within each group stays as collected)."""
    for item in items:
        marked = item.get_closest_marker("slow") or item.get_closest_marker("e2e")
        used = [name for name in MODEL_FIXTURES if name in getattr(item, "fixturenames", ())]
        if used and not marked:
            raise pytest.UsageError(
                f"{item.nodeid} reads a real model ({used[0]}): mark it slow or e2e"
            )
    items.sort(
        key=lambda item: (
            item.get_closest_marker("e2e") is None,
            item.get_closest_marker("slow") is None,
        )
    )
