"""The quantized matmul kernel (`csrc/qmatvec.cc`) through jax.ffi, and the weights it reads.

A `PackedArray` is a weight matrix in the kernel's layout: per output row, blocks of 32 inputs,
as int8 (`q8`) or as two 4-bit values per byte (`q4`), with a scale (and optionally a min) per
block. `matvec(x, w)` never writes a dequantized copy of the weights; its arithmetic is the
array's `activations`: "f32" (the default) widens each weight block to f32 in registers, the
pure-JAX path's numbers up to the order of the sums; "int8" quantizes x's rows to 8-bit blocks
and takes integer dot products, llama.cpp's CPU arithmetic (fewer instructions; the rounding of
x moves the logits, and near-tied tokens flip as they do in llama.cpp).

The kernel is C++ compiled on first use with the machine's C++ compiler against the headers
jaxlib ships (`jax.ffi.include_dir()`; nothing is linked against jaxlib), cached under the model
cache keyed by the source's and the headers' hash, and registered with XLA:CPU. Where it cannot
be built (no compiler), where the backend is not a CPU, or with SCANLAB_KERNEL=off, `available()`
is False and the decoder keeps its pure-JAX quantized path; `describe()` says which path runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from scanlab.decoder.weights import WeightForm
from scanlab.errors import ArgumentError, ArgumentTypeError
from scanlab.storage import default_cache

SOURCE = Path(__file__).parent / "csrc" / "qmatvec.cc"
TARGET = "scanlab_qmatvec"
KERNEL_ENV = "SCANLAB_KERNEL"  # "off": the pure-JAX path, whatever the machine offers
BLOCK = 32
ACTIVATIONS = ("f32", "int8")
# The kernel's, by the instructions each needs; VNNI serves the int8 arithmetic only.
PATHS = ("portable", "AVX2", "AVX-512", "AVX-512 VNNI")
COMPILE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-DNDEBUG")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedArray(WeightForm):
    """A weight matrix (in_shape..., out_shape...) in the kernel's layout, optionally stacked.

    Attributes:
      quants: int8 ([L,] N, K) or, two values 0..15 per byte, uint8 ([L,] N, K / 2); N and K
        are the products of out_shape and in_shape.
      scales: float16 or float32 ([L,] N, K / 32).
      mins: like scales (dense = quants * scale + min), or None: int8 quants as they are,
        4-bit ones less 8 (GGUF's Q4_0, dense = (quants - 8) * scale).
      layer: int32 scalar, which of the stacked L matrices this is (set by the layer scan, which
        then hands the kernel the whole stack), or None for an unstacked or sliced one.
      in_shape, out_shape: the dense matrix's input and output axes.
      transposed: the dense layout is (out_shape..., in_shape...) instead (an embedding (V, D),
        whose rows the kernel reads as the output head's).
      activations: the kernel's arithmetic, one of ACTIVATIONS.
    """

    quants: jax.Array
    scales: jax.Array
    mins: jax.Array | None
    layer: jax.Array | None
    in_shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    out_shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    transposed: bool = dataclasses.field(default=False, metadata={"static": True})
    activations: str = dataclasses.field(default="f32", metadata={"static": True})

    @property
    def nibbles(self) -> bool:
        return self.quants.dtype == jnp.uint8

    @property
    def shape(self) -> tuple[int, ...]:
        """The dense shape, with the stacking axis when stacked and not yet indexed."""
        stacked = self.quants.ndim == 3 and self.layer is None
        axes = (
            (*self.out_shape, *self.in_shape)
            if self.transposed
            else (*self.in_shape, *self.out_shape)
        )
        return (*self.quants.shape[:1], *axes)[0 if stacked else 1 :]

    @property
    def dtype(self):
        return jnp.dtype(jnp.float32)

    @property
    def read_in_place(self) -> bool:
        return True

    @property
    def differentiable(self) -> bool:
        return False

    def project(self, x, x_axes, w_axes):
        """By the kernel, for any number of rows of x (its inputs are x's last axes)."""
        inputs = tuple(range(x.ndim - len(self.in_shape), x.ndim))
        if tuple(x_axes) != inputs or tuple(w_axes) != self.input_axes:
            raise ArgumentError(
                f"a PackedArray multiplies x's last axes by its inputs {self.in_shape}: got "
                f"x axes {tuple(x_axes)} and weight axes {tuple(w_axes)}"
            )
        return matvec(x, self).astype(x.dtype)

    @property
    def input_axes(self) -> tuple[int, ...]:
        """The dense shape's input axes (past a stacking axis)."""
        first = len(self.shape) - len(self.in_shape) - len(self.out_shape)
        if self.transposed:
            first += len(self.out_shape)
        return tuple(range(first, first + len(self.in_shape)))

    def dense(self, dtype=None):
        return unpack(self).astype(dtype or jnp.float32)

    def rows(self, tokens):
        """An embedding's rows (`transposed`: its rows are the tokens')."""
        mins = None if self.mins is None else self.mins[tokens]
        return dense_rows(self.quants[tokens], self.scales[tokens], mins)

    def as_head(self):
        return dataclasses.replace(self, transposed=False)  # the same rows serve both

    def at_layer(self, layer):
        return dataclasses.replace(self, layer=layer)

    def placements(self, spec: PartitionSpec):
        raise ArgumentTypeError(
            "shard_params takes dense or QuantArray weights, got the kernel's PackedArray "
            "(one device): load with kernel=False to shard a quantized model"
        )

    def check(self, name, shape, inputs):
        check_packed(self, name)


def unpack(array: PackedArray) -> jax.Array:
    """The dense f32 matrix in its layout (`PackedArray.shape`)."""
    if array.layer is None:
        n_k = dense_rows(array.quants, array.scales, array.mins)  # ([L,] N, K)
    else:
        mins = None if array.mins is None else array.mins[array.layer]
        n_k = dense_rows(array.quants[array.layer], array.scales[array.layer], mins)
    lead = n_k.shape[:-2]
    if array.transposed:
        return n_k.reshape(*lead, *array.out_shape, *array.in_shape)
    return jnp.swapaxes(n_k, -1, -2).reshape(*lead, *array.in_shape, *array.out_shape)


def dense_rows(quants: jax.Array, scales: jax.Array, mins: jax.Array | None) -> jax.Array:
    """Rows (..., bytes) of a PackedArray's leaves -> their f32 values (..., K)."""
    if quants.dtype == jnp.uint8:  # byte j of a block: value j low, value j + 16 high
        split = quants.reshape(*quants.shape[:-1], -1, BLOCK // 2)
        values = jnp.concatenate([split & 0x0F, split >> 4], axis=-1).astype(jnp.float32)
        if mins is None:  # Q4_0: values 0..15 stand for -8..7
            values = values - 8
    else:
        values = quants.reshape(*quants.shape[:-1], -1, BLOCK).astype(jnp.float32)
    dense = values * scales.astype(jnp.float32)[..., None]
    if mins is not None:
        dense = dense + mins.astype(jnp.float32)[..., None]
    return dense.reshape(*dense.shape[:-2], -1)


def pack_rows(values, scales, mins, in_shape, out_shape, transposed=False) -> PackedArray:
    """A PackedArray from integer rows ([L,] N, K) (int8), their scales and mins ([L,] N, K/32).

    Values within 0..15 with mins, or within -8..7 without (stored shifted by 8, as GGUF's
    Q4_0 stores them), are packed two per byte; others stay int8.
    """
    values, scales = np.asarray(values), np.asarray(scales)
    mins = None if mins is None else np.asarray(mins)
    low, high = (-8, 7) if mins is None else (0, 15)
    if values.size and values.min() >= low and values.max() <= high:
        quants = nibble_bytes(values - low)
    else:
        quants = values.astype(np.int8)
    return PackedArray(
        jnp.asarray(quants),
        jnp.asarray(scales),
        None if mins is None else jnp.asarray(mins),
        None,
        in_shape=tuple(in_shape),
        out_shape=tuple(out_shape),
        transposed=transposed,
    )


def nibble_bytes(values) -> np.ndarray:
    """Values 0..15 (..., K) -> uint8 (..., K / 2), two per byte in the kernel's (GGUF's) order:
    byte j of a block holds value j in its low nibble and value j + 16 in its high one."""
    blocks = np.asarray(values).astype(np.uint8).reshape(*np.shape(values)[:-1], -1, BLOCK)
    low, high = blocks[..., : BLOCK // 2], blocks[..., BLOCK // 2 :]
    return (low | (high << 4)).reshape(*np.shape(values)[:-1], -1)


def check_packed(array: PackedArray, name: str) -> None:
    """Its scales and mins one per block of 32 of each row, the quants' width K or K / 2."""
    inputs = int(np.prod(array.in_shape))
    rows = tuple(array.quants.shape[:-1])
    width = inputs // 2 if array.nibbles else inputs
    if inputs % BLOCK or array.quants.shape[-1] != width:
        raise ArgumentError(
            f"{name}.quants has shape {tuple(array.quants.shape)}: expected rows of {width} "
            f"bytes for inputs {array.in_shape} (a multiple of {BLOCK})"
        )
    for part in ("scales", "mins"):
        leaf = getattr(array, part)
        if leaf is not None and tuple(leaf.shape) != (*rows, inputs // BLOCK):
            raise ArgumentError(
                f"{name}.{part} has shape {tuple(leaf.shape)}, expected {(*rows, inputs // BLOCK)}"
            )


def matvec(x: jax.Array, weight: PackedArray) -> jax.Array:
    """x (..., in_shape...) @ weight -> (..., out_shape...) f32, by the kernel.

    Inference only: differentiating it raises.
    """
    inputs, outputs = int(np.prod(weight.in_shape)), int(np.prod(weight.out_shape))
    lead = x.shape[: x.ndim - len(weight.in_shape)]
    x_MxK = x.reshape(-1, inputs).astype(jnp.float32)
    quants, scales, mins = weight.quants, weight.scales, weight.mins
    layer = weight.layer
    if quants.ndim == 3 and layer is None:
        raise ArgumentError(
            f"a stacked PackedArray ({quants.shape[0]} layers) needs its layer index to multiply "
            "by: the layer scan sets it (weights.at_layer), or index one layer's leaves"
        )
    if quants.ndim == 2:  # one matrix: a stack of one
        quants, scales = quants[None], scales[None]
        mins = None if mins is None else mins[None]
        layer = None
    layer = jnp.zeros((), jnp.int32) if layer is None else jnp.asarray(layer, jnp.int32)
    empty = jnp.zeros((0,), scales.dtype)
    mins = empty if mins is None else mins
    int8 = weight.activations == "int8"
    y_MxN = _kernel(x_MxK, quants, scales, mins, layer, outputs, int8)
    return y_MxN.reshape(*lead, *weight.out_shape)


@functools.partial(jax.custom_jvp, nondiff_argnums=(5, 6))
def _kernel(x_MxK, quants, scales, mins, layer, outputs, int8_activations):
    _register()
    return jax.ffi.ffi_call(
        TARGET,
        jax.ShapeDtypeStruct((x_MxK.shape[0], outputs), jnp.float32),
        vmap_method="sequential",
    )(x_MxK, quants, scales, mins, layer, int8_activations=int8_activations)


@_kernel.defjvp
def _no_derivative(outputs, int8_activations, primals, tangents):
    raise ArgumentError(
        "the quantized matmul kernel is for inference only: to differentiate, load the model "
        "with weights='float32' (or kernel=False to keep the pure-JAX quantized path)"
    )


@functools.cache
def _loaded() -> tuple[ctypes.CDLL | None, str]:
    """(the compiled kernel, built on first use, or None; why not, when None)."""
    if os.environ.get(KERNEL_ENV, "").lower() == "off":
        return None, f"{KERNEL_ENV}=off"
    if jax.default_backend() != "cpu":
        return None, f"the kernel is for CPUs; the backend is {jax.default_backend()}"
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        return None, "no C++ compiler found ($CXX, else c++)"
    path, failure = _build(compiler)
    return (None, failure) if path is None else (ctypes.CDLL(str(path)), "")


def _build(compiler: str) -> tuple[Path | None, str]:
    """Compiles the kernel into the cache (once per source, header and compiler): (its path, or
    None and why)."""
    include = Path(jax.ffi.include_dir())
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update((include / "xla" / "ffi" / "api" / "c_api.h").read_bytes())
    digest.update(compiler.encode())
    target = default_cache() / "kernels" / f"qmatvec-{digest.hexdigest()[:16]}.so"
    if target.is_file():
        return target, ""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as staging:
            built = Path(staging) / target.name
            done = subprocess.run(
                [compiler, *COMPILE_FLAGS, f"-I{include}", "-o", str(built), str(SOURCE)],
                capture_output=True,
                text=True,
            )
            if done.returncode:
                last = (done.stderr.strip().splitlines() or ["no message"])[-1]
                return None, f"{compiler} could not compile the kernel: {last[:200]}"
            os.replace(built, target)  # whole or not at all: another process may race us
    except OSError as error:
        return None, f"the kernel cannot be written to {target.parent}: {error}"
    return target, ""


@functools.cache
def _register() -> None:
    library, _ = _loaded()
    if library is None:
        raise ArgumentError("the quantized matmul kernel is not available here: " + describe())
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.ScanlabQMatVec), platform="cpu")


def available() -> bool:
    """Whether the kernel runs here (built, on a CPU backend, not switched off)."""
    return _loaded()[0] is not None


def describe() -> str:
    """Which quantized path runs, in a few words (for `--verbose` and the benchmark record)."""
    library, why_not = _loaded()
    if library is None:
        return f"pure JAX ({why_not})"
    return "jax.ffi kernel, " + PATHS[library.scanlab_qmatvec_path()]


def paths() -> tuple[str, ...]:
    """The kernel's paths this CPU can run (a subsequence of PATHS), its best last."""
    library, _ = _loaded()
    return () if library is None else PATHS[: library.scanlab_qmatvec_best_path() + 1]


@contextlib.contextmanager
def limited_to(path: str) -> Iterator[None]:
    """Runs the kernel's `path` (one of `paths()`) instead of the CPU's best, within the block
    (for tests: every path is checked on a CPU that has a better one)."""
    if path not in paths():
        raise ArgumentError(f"path must be one of {list(paths())}, got {path!r}")
    library, _ = _loaded()
    assert library is not None  # paths() is empty without it
    library.scanlab_qmatvec_limit_path(PATHS.index(path))
    try:
        yield
    finally:
        library.scanlab_qmatvec_limit_path(len(PATHS) - 1)
