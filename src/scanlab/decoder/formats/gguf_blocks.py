"""GGUF's quantized blocks -> int8 values with per-block scales and mins, losslessly.

Every block format kept here dequantizes as `value * scale + min` over blocks of 16 or 32
consecutive inputs: Q8_0, Q4_0, Q5_0 (symmetric: min 0) and Q4_1, Q5_1 (a min per block), the
K-quants Q4_K and Q5_K (super-blocks of 256: 8 sub-blocks of 32, whose 6-bit scale and min are
multiplied by the super-block's f16 factors) and Q6_K (16 sub-blocks of 16, int8 scales). The
integers are unpacked into int8 (4- to 6-bit values fit), the scales kept in f16 where the file
has one f16 scale per block and in f32 where they are products (the K-quants): the f32 products
are the ones `gguf.quants.dequantize` computes, so `values * scale + min` in f32 reproduces its
output bit for bit.

The gguf package dequantizes but does not expose the integers; the unpacking below mirrors its
byte layouts (`gguf.quants`) and was written by hand for that reason. Tests check each format
against `gguf.quants.dequantize`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf.quants import Q4_K

SUPER = 256  # values per K-quant super-block


class Blocks(NamedTuple):
    """A tensor (rows, N) as int8 values, scales and mins (rows, N / block); mins may be None."""

    values: np.ndarray
    scales: np.ndarray
    mins: np.ndarray | None

    @property
    def block(self) -> int:
        return self.values.shape[-1] // self.scales.shape[-1]


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16)[..., 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Bytes (n, m) -> (n, 2m) uint8: every byte's low nibbles, then its high ones."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1's 4 bytes of high bits -> (n, 32) uint8 of 0/1, bit i for value i."""
    bits = np.ascontiguousarray(qh).view(np.uint32)
    return ((bits >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _q8_0(b):
    return b[:, 2:].view(np.int8), _f16(b[:, :2]), None


def _q4_0(b):
    return _nibbles(b[:, 2:]).astype(np.int8) - 8, _f16(b[:, :2]), None


def _q4_1(b):
    return _nibbles(b[:, 4:]).astype(np.int8), _f16(b[:, :2]), _f16(b[:, 2:4])


def _q5_0(b):
    values = _nibbles(b[:, 6:]) | (_fifth_bits(b[:, 2:6]) << 4)
    return values.astype(np.int8) - 16, _f16(b[:, :2]), None


def _q5_1(b):
    values = _nibbles(b[:, 8:]) | (_fifth_bits(b[:, 4:8]) << 4)
    return values.astype(np.int8), _f16(b[:, :2]), _f16(b[:, 2:4])


def _k_factors(b):
    """Q4_K/Q5_K: each sub-block's scale d * sc and min -(dmin * m), f32 (n, 8)."""
    d = _f16(b[:, :2]).astype(np.float32)[:, None]
    dmin = _f16(b[:, 2:4]).astype(np.float32)[:, None]
    sc, m = Q4_K.get_scale_min(b[:, 4 : 4 + Q4_K.K_SCALE_SIZE])
    return d * sc.astype(np.float32), -(dmin * m.astype(np.float32))


def _q4_k(b):
    scales, mins = _k_factors(b)
    # Four 32-byte groups, each two sub-blocks: (n, 4, 64), sub-blocks 2i and 2i + 1.
    values = _nibbles(b[:, 16:].reshape(-1, 4, 32))
    return values.reshape(-1, SUPER).astype(np.int8), scales, mins


def _q5_k(b):
    scales, mins = _k_factors(b)
    qh = b[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    low = _nibbles(b[:, 48:].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    values = low | ((qh & 1) << 4)
    return values.reshape(-1, SUPER).astype(np.int8), scales, mins


def _q6_k(b):
    ql = _nibbles(b[:, :128].reshape(-1, 2, 64)).reshape(-1, 8, 32)
    qh = b[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    qh = (qh & 0x03).reshape(-1, 8, 32)
    values = (ql | (qh << 4)).astype(np.int8) - 32
    d = _f16(b[:, 208:210]).astype(np.float32)[:, None]
    scales = d * b[:, 192:208].view(np.int8).astype(np.float32)  # (n, 16)
    return values.reshape(-1, SUPER), scales, None


# type -> (values per block of bytes, bytes per block, the unpacker of (n, bytes) blocks)
_FORMATS: dict[Q, tuple[int, int, Callable]] = {
    Q.Q8_0: (32, 34, _q8_0),
    Q.Q4_0: (32, 18, _q4_0),
    Q.Q4_1: (32, 20, _q4_1),
    Q.Q5_0: (32, 22, _q5_0),
    Q.Q5_1: (32, 24, _q5_1),
    Q.Q4_K: (SUPER, 144, _q4_k),
    Q.Q5_K: (SUPER, 176, _q5_k),
    Q.Q6_K: (SUPER, 210, _q6_k),
}
KEPT = frozenset(_FORMATS)


def block_size(tensor_type: Q) -> int:
    """Inputs per scale: 16 for Q6_K, 32 for the others."""
    return 16 if tensor_type == Q.Q6_K else 32


def unpack(data: np.ndarray, tensor_type: Q) -> Blocks:
    """A tensor's raw bytes (rows, bytes per row), as the reader maps them, -> Blocks."""
    per_block, nbytes, unpacker = _FORMATS[tensor_type]
    rows = data.shape[0]
    raw = np.asarray(data, np.uint8).reshape(-1, nbytes)
    values, scales, mins = unpacker(raw)
    width = raw.shape[0] * per_block // rows
    scales = scales.reshape(rows, -1)
    return Blocks(
        values.reshape(rows, width),
        scales,
        None if mins is None else mins.reshape(rows, -1),
    )


def common_layout(parts: list[Blocks]) -> list[Blocks]:
    """The same tensors in one layout: the smallest block, f32 scales unless all are f16, mins
    wherever one has them (zeros elsewhere). Exact: scales repeat over split blocks, f16 -> f32
    is exact, and adding a zero min changes nothing."""
    block = min(part.block for part in parts)
    dtypes = {part.scales.dtype for part in parts}
    dtype = dtypes.pop() if len(dtypes) == 1 else np.dtype(np.float32)
    with_mins = any(part.mins is not None for part in parts)

    def refined(per_block: np.ndarray, part: Blocks) -> np.ndarray:
        return np.repeat(per_block, part.block // block, axis=-1).astype(dtype)

    return [
        Blocks(
            part.values,
            refined(part.scales, part),
            refined(part.mins if part.mins is not None else np.zeros_like(part.scales), part)
            if with_mins
            else None,
        )
        for part in parts
    ]
