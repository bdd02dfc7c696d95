"""GGUF tensors straight into the CPU kernel's layout (`qmatvec.PackedArray`), at the file's size.

A GGUF weight is stored as transformers lays it out: rows of output features, each row blocks of
32 inputs. The kernel reads the same thing, rows of blocks, in scanlab's order of the axes: so a
leaf's tensors become a PackedArray by moving whole blocks (the permutation is computed once per
leaf, on block indices, by the same `from_hf` that lays out a dense tensor) and splitting each
block's scale (and min) from its integers. Q8_0, Q4_0 and Q4_1 blocks are copied as they are (the
kernel's 4-bit order is GGUF's); the other formats of `gguf_blocks` are unpacked and packed again.

Memory stays at the file's size: each tensor is read from the file (not through the reader's
memory map, whose pages would stay resident) into a temporary — a chunk of rows at a time where
its blocks keep their order (the embedding, the largest tensor), else whole — its blocks written
into the stacked arrays, and the stacked arrays, allocated aligned, become JAX arrays without a
copy.
"""

from __future__ import annotations

import math
import mmap
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
from gguf import GGMLQuantizationType as Q

from scanlab.decoder import spec
from scanlab.decoder.config import DecoderConfig
from scanlab.decoder.families import Leaf
from scanlab.decoder.formats import gguf_blocks
from scanlab.decoder.formats.base import CheckpointError, from_hf, hf_shape
from scanlab.decoder.qmatvec import BLOCK, PackedArray, nibble_bytes

# How the kernel keeps each 32-wide format: 4-bit integers (else int8), a min per block (4-bit
# ones without: Q4_0's offset of 8), and the scales' dtype (f32 where they are products).
_KEPT_AS = {
    Q.Q8_0: (False, False, np.float16),
    Q.Q4_0: (True, False, np.float16),
    Q.Q4_1: (True, True, np.float16),
    Q.Q5_0: (False, False, np.float16),
    Q.Q5_1: (False, True, np.float16),
    Q.Q4_K: (True, True, np.float32),
    Q.Q5_K: (False, True, np.float32),
}
# The formats whose blocks the kernel reads as stored: a block's scale d, min m and integers qs.
_AS_STORED = {
    Q.Q8_0: np.dtype([("d", "<f2"), ("qs", "u1", 32)]),
    Q.Q4_0: np.dtype([("d", "<f2"), ("qs", "u1", 16)]),
    Q.Q4_1: np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)]),
}
# A tensor whose blocks keep their order is read in chunks of about this many bytes.
_CHUNK_BYTES = 8 * 2**20
# XLA:CPU takes a host buffer without copying it when it is aligned to this many bytes.
_ALIGNMENT = 64


def packed(
    leaf: Leaf, tensors: list, config: DecoderConfig, path: Path, *, stacked: bool, embedding: bool
) -> PackedArray | None:
    """The tensors of one leaf (every layer's, or the one of a leaf outside the layers) as one
    PackedArray, or None where the kernel cannot take them: formats of other block widths, or
    layers stored in different formats. `embedding`: the leaf is a (V, D) embedding, whose rows
    the kernel reads as a tied head's."""
    kinds = {tensor.tensor_type for tensor in tensors}
    kind = kinds.pop()
    if kinds or kind not in _KEPT_AS:
        return None
    nibbles, with_mins, scale_dtype = _KEPT_AS[kind]
    order, in_shape, out_shape = _kernel_order(leaf, config, embedding)
    rows, blocks = order.shape
    lead = (len(tensors),) if stacked else ()
    quants = _aligned((*lead, rows, blocks * (BLOCK // 2 if nibbles else BLOCK)), np.uint8)
    scales = _aligned((*lead, rows, blocks), scale_dtype)
    mins = _aligned((*lead, rows, blocks), scale_dtype) if with_mins else None
    flat_order = order.ravel()
    if np.array_equal(flat_order, np.arange(order.size, dtype=flat_order.dtype)):
        flat_order = None
    file_rows = hf_shape(leaf, config)[0]
    with path.open("rb") as file:
        for i, tensor in enumerate(tensors):
            at = (i,) if stacked else ()
            row_bytes = _checked_row_bytes(tensor, leaf, config, path)
            slots = [
                part[at].reshape(order.size, -1)
                for part in (quants, scales, mins)
                if part is not None
            ]
            # Blocks in the file's order are read a chunk of rows at a time; a reordered
            # tensor whole, one at a time.
            step = max(1, _CHUNK_BYTES // row_bytes) if flat_order is None else file_rows
            per_row = order.size // file_rows
            for start in range(0, file_rows, step):
                stop = min(start + step, file_rows)
                raw = _read_rows(file, tensor, start, stop, row_bytes, path)
                _fill(
                    raw,
                    kind,
                    flat_order,
                    *(slot[start * per_row : stop * per_row] for slot in slots),
                )
                del raw
    for name, part in (("scales", scales), ("mins", mins)):
        if part is not None and not np.isfinite(part).all():
            what = f"{path}: tensor {tensors[0].name}"
            raise CheckpointError(f"{what}'s {name} hold NaN or Inf values")
    return PackedArray(
        jnp.from_dlpack(quants if nibbles else quants.view(np.int8)),
        jnp.from_dlpack(scales),
        None if mins is None else jnp.from_dlpack(mins),
        None,
        in_shape=in_shape,
        out_shape=out_shape,
        transposed=embedding,
    )


def _kernel_order(leaf: Leaf, config: DecoderConfig, embedding: bool):
    """(N, K / 32) indices of the file's blocks, numbered row by row, in the kernel's order;
    the in and out shapes."""
    file_rows, file_width = hf_shape(leaf, config)
    numbered = np.arange(file_rows * file_width // BLOCK, dtype=np.int32).reshape(file_rows, -1)
    in_scanlab = np.asarray(from_hf(leaf, numbered, config, BLOCK))
    letters = leaf.shape.split()
    if leaf.gguf_interleaved:  # llama.cpp's rotary pairs, along an output axis (Dh)
        in_scanlab = _halves_from_pairs(in_scanlab, letters.index("Dh"))
    sizes = spec.sizes(config)
    at = len(letters) + leaf.blocked_axis
    if embedding:  # (V, D): its rows are the tied head's output rows
        return in_scanlab, (sizes[letters[1]],), (sizes[letters[0]],)
    in_shape = tuple(sizes[letter] for letter in letters[: at + 1])
    out_shape = tuple(sizes[letter] for letter in letters[at + 1 :])
    order = in_scanlab.reshape(-1, math.prod(out_shape)).T
    return order, in_shape, out_shape


def _halves_from_pairs(array: np.ndarray, axis: int) -> np.ndarray:
    """An axis of interleaved pairs (x0 y0 x1 y1 ...) reordered to halves (x.. y..)."""
    moved = np.moveaxis(array, axis, -1)
    pairs = moved.reshape(*moved.shape[:-1], -1, 2)
    return np.moveaxis(pairs.swapaxes(-1, -2).reshape(moved.shape), -1, axis)


def _checked_row_bytes(tensor, leaf: Leaf, config: DecoderConfig, path: Path) -> int:
    """The bytes of each of the tensor's rows, its shape checked against the leaf's."""
    rows, width = hf_shape(leaf, config)
    per_block, block_bytes = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
    expected = (rows, width // per_block * block_bytes)
    if tuple(tensor.data.shape) != expected:
        raise CheckpointError(
            f"{path}: tensor {tensor.name} has {tuple(tensor.data.shape)} bytes, expected "
            f"{expected} for shape {(rows, width)} in {tensor.tensor_type.name}"
        )
    return expected[1]


def _read_rows(file, tensor, start: int, stop: int, row_bytes: int, path: Path) -> np.ndarray:
    """Rows start..stop of the tensor's bytes, (stop - start, row_bytes)."""
    file.seek(tensor.data_offset + start * row_bytes)
    raw = np.fromfile(file, np.uint8, (stop - start) * row_bytes)
    if raw.size != (stop - start) * row_bytes:
        raise CheckpointError(f"{path}: tensor {tensor.name} is cut short")
    return raw.reshape(stop - start, row_bytes)


def _fill(raw, kind, flat_order, quants, scales, mins=None) -> None:
    """Rows of a tensor's blocks, reordered by `flat_order` (None: as they are), into their
    slots: quants (blocks, bytes per block), scales and mins (blocks, 1)."""

    def in_kernel_order(array: np.ndarray) -> np.ndarray:  # (blocks, per block), moved whole
        blocks = array.reshape(len(scales), -1)
        return blocks if flat_order is None else blocks[flat_order]

    if kind in _AS_STORED:  # each field copied once, from the blocks' strided views
        blocks = in_kernel_order(raw).view(_AS_STORED[kind])
        scales[...] = blocks["d"]
        if mins is not None:
            mins[...] = blocks["m"]
        quants[...] = blocks["qs"][:, 0]
        return
    unpacked = gguf_blocks.unpack(raw, kind)
    scales[...] = in_kernel_order(unpacked.scales)
    if mins is not None and unpacked.mins is not None:
        mins[...] = in_kernel_order(unpacked.mins)
    values = in_kernel_order(unpacked.values)
    nibbles = _KEPT_AS[kind][0]
    quants[...] = nibble_bytes(values) if nibbles else values.view(np.uint8)


def _aligned(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised array whose data starts at an `_ALIGNMENT`-byte boundary.

    Where the OS maps pages on request (Linux's MAP_POPULATE), the array is an anonymous
    mapping populated in one call: repacking a model writes all of it, and a page fault per
    4 KiB as it goes costs more than reading the file."""
    size = math.prod(shape) * np.dtype(dtype).itemsize
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if populate and size:  # page-aligned
        pages = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
        return np.frombuffer(pages, np.uint8).view(dtype).reshape(shape)
    buffer = np.empty(size + _ALIGNMENT, np.uint8)
    start = -buffer.ctypes.data % _ALIGNMENT
    return buffer[start : start + size].view(dtype).reshape(shape)
