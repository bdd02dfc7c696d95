"""Weights kept quantized in memory: int8 blocks, and their layouts for decoding.

A `QuantArray` is a weight matrix as integers in blocks: int8 values of the dense array's shape,
one scale per block of `block` consecutive values along one axis (the matrix's input axis, as in
GGUF files) and, for asymmetric formats, one min per block: `dense = values * scale + min`. It
is a pytree: stacked over the layer axis it scans like a dense leaf, and `jax.lax.scan` hands the
body one layer's QuantArray.

Both forms here implement `weights.WeightForm`, the protocol every weight use goes through.
Quantized weights are dequantized right before their dot, inside the layer scan: XLA:CPU fuses
the slice of the stacked integers and the convert into one pass that writes the layer's f32
matrix, small enough to stay in cache, so a decoding step reads a quarter of the bytes of f32
weights. Two layouts make that fusion fast on a CPU: blocks along the input axis with the output
axes last (a dot whose dequantized operand is transposed is several times slower), and, for the
vocabulary-sized head, `VocabChunks`: the head as C column chunks scanned one at a time, so no V
x D f32 temporary is written (the benchmark report, W7, has the figures). Nothing here assumes a
CPU: on a GPU the same dequantize-then-dot is the form XLA fuses into the dot.

On a CPU, `for_kernel` lays the weights out for the jax.ffi kernel instead (`qmatvec`,
`PackedArray`: per output row, blocks of 32, 4-bit values two per byte), which never writes a
dequantized copy; the layer scan hands it the whole stack and a layer index rather than a
copied slice (`weights.hold_stacked`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from scanlab.decoder import qmatvec
from scanlab.decoder.params import DecoderParams
from scanlab.decoder.qmatvec import PackedArray
from scanlab.decoder.weights import WeightForm, dot, is_form
from scanlab.errors import ArgumentError, ArgumentTypeError

# The activations' dtype of quantized weights: XLA:CPU converts bf16 slowly.
COMPUTE_DTYPE = jnp.float32

# Columns per chunk of a quantized output head: wide enough that the scan's per-chunk cost is
# small, narrow enough that the chunk's f32 temporary stays in cache.
HEAD_CHUNK_COLUMNS = 4096


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantArray(WeightForm):
    """int8 values in blocks along one axis, with a scale (and optionally a min) per block.

    Attributes:
      values: int8, the dense array's shape (..., N, ...).
      scales: float16 or float32, values' shape with N divided by the block size.
      mins: like scales, or None for symmetric formats (dense = values * scale).
      axis: the blocked axis, counted from the end (stacking adds leading axes).
    """

    values: jax.Array
    scales: jax.Array
    mins: jax.Array | None
    axis: int = dataclasses.field(metadata={"static": True})

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(np.shape(self.values))

    @property
    def dtype(self):
        """The dtype it dequantizes to (what the activations run in)."""
        return jnp.dtype(COMPUTE_DTYPE)

    @property
    def block(self) -> int:
        return self.shape[self.axis] // np.shape(self.scales)[self.axis]

    def project(self, x, x_axes, w_axes):
        return dot(x, dequantize(self, x.dtype), x_axes, w_axes)

    def dense(self, dtype=None):
        return dequantize(self, dtype or COMPUTE_DTYPE)

    def rows(self, tokens):
        return dequantize(jax.tree.map(lambda leaf: leaf[tokens], self))

    def placements(self, spec: PartitionSpec):
        """The values shard as the dense twin; scales and mins too, except along the blocked
        axis (fewer entries, not always divisible), which they replicate."""
        per_block = list(spec) + [None] * (self.ndim - len(spec))
        per_block[self.axis] = None
        per_block_spec = PartitionSpec(*per_block)
        return jax.tree_util.tree_map_with_path(
            lambda path, _: spec if path[0].name == "values" else per_block_spec, self
        )

    def check(self, name, shape, inputs):
        check_quant_array(self, name, shape)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VocabChunks(WeightForm):
    """A quantized vocabulary matrix (embedding or head) laid out for the logits' dot.

    `chunks` holds C chunks of W columns, (C, D, W) blocked along D, C * W >= V (the last chunk
    padded with zeros); `head_logits` scans them, `embed_rows` gathers a token's column.

    Attributes:
      chunks: a QuantArray, values (C, D, W).
      vocab_size: V.
      vocab_first: the logical shape is (V, D) (an embedding) rather than (D, V) (a head).
    """

    chunks: QuantArray
    vocab_size: int = dataclasses.field(metadata={"static": True})
    vocab_first: bool = dataclasses.field(metadata={"static": True})

    @property
    def shape(self) -> tuple[int, ...]:
        d_model = self.chunks.shape[-2]
        return (self.vocab_size, d_model) if self.vocab_first else (d_model, self.vocab_size)

    @property
    def dtype(self):
        return self.chunks.dtype

    def project(self, x, x_axes, w_axes):
        """Over D, the chunks dequantized one per scan step (no V x D temporary)."""
        if x_axes != (x.ndim - 1,) or w_axes != ((1,) if self.vocab_first else (0,)):
            return dot(x, self.dense(x.dtype), x_axes, w_axes)

        def chunk_product(_, chunk: QuantArray):
            return None, jnp.matmul(x, dequantize(chunk, x.dtype))

        _, product_CxXxW = jax.lax.scan(chunk_product, None, self.chunks)
        product = jnp.moveaxis(product_CxXxW, 0, -2).reshape(*x.shape[:-1], -1)
        return product[..., : self.vocab_size]

    def dense(self, dtype=None):
        chunks = dequantize(self.chunks, dtype or COMPUTE_DTYPE)  # (C, D, W)
        head_DxV = jnp.moveaxis(chunks, 0, 1).reshape(chunks.shape[1], -1)[:, : self.vocab_size]
        return head_DxV.T if self.vocab_first else head_DxV

    def rows(self, tokens):
        width = self.chunks.shape[-1]
        chunk, column = tokens // width, tokens % width
        return dequantize(
            QuantArray(
                self.chunks.values[chunk, :, column],
                self.chunks.scales[chunk, :, column],
                None if self.chunks.mins is None else self.chunks.mins[chunk, :, column],
                axis=-1,
            )
        )

    def as_head(self):
        return dataclasses.replace(self, vocab_first=False)  # the same chunks serve both

    def placements(self, spec: PartitionSpec):
        return jax.tree.map(lambda _: PartitionSpec(), self)  # replicated

    def check(self, name, shape, inputs):
        check_quant_array(self.chunks, name + ".chunks", tuple(self.chunks.shape))


def is_quantized(node) -> bool:
    """A weight held in integers (int8 blocks, packed or not)."""
    return isinstance(node, QuantArray | VocabChunks | PackedArray)


def dequantize(array: QuantArray, dtype=COMPUTE_DTYPE) -> jax.Array:
    """The dense array: values * scale (+ min), each block's scale and min broadcast over it.

    The products are the file's own arithmetic (an f32 multiply, then an add), so dequantizing a
    GGUF tensor kept here gives exactly what `gguf.quants.dequantize` gives.
    """
    shape, block = array.shape, array.block
    at = len(shape) + array.axis
    split = (*shape[:at], shape[at] // block, block, *shape[at + 1 :])
    values = array.values.reshape(split).astype(jnp.float32)
    dense = values * _per_value(array.scales, at)
    if array.mins is not None:
        dense = dense + _per_value(array.mins, at)
    return dense.reshape(shape).astype(dtype)


def _per_value(per_block: jax.Array, at: int) -> jax.Array:
    """Scales (..., N / block, ...) -> f32 (..., N / block, 1, ...), against the split values."""
    return jnp.expand_dims(per_block, at + 1).astype(jnp.float32)


def quantize_blocks(dense, axis: int, block: int = 32) -> QuantArray:
    """Symmetric int8 blocks of `block` along `axis` (negative), float16 scales: GGUF's Q8_0.

    Each block's scale is its largest magnitude / 127, rounded to float16 as Q8_0 stores it; the
    values are the nearest integers of dense / scale.
    """
    dense = np.asarray(dense, np.float32)
    check_block(dense.shape, axis, block, "dense")
    size = dense.shape[axis]
    last = np.moveaxis(dense, axis, -1)
    moved = last.reshape(*last.shape[:-1], -1, block)
    scales = (np.abs(moved).max(axis=-1) / 127).astype(np.float16)
    divisor = scales.astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.where(divisor > 0, np.rint(moved / divisor), 0).clip(-127, 127)
    values = values.reshape(*moved.shape[:-2], size).astype(np.int8)
    return QuantArray(
        jnp.asarray(np.moveaxis(values, -1, axis)),
        jnp.asarray(np.moveaxis(scales, -1, axis)),
        None,
        axis=axis,
    )


def to_vocab_chunks(head: QuantArray, vocab_first: bool) -> VocabChunks:
    """A quantized (V, D) embedding or (D, V) head, blocked along D, as `VocabChunks`."""
    head_DxV = jax.tree.map(lambda leaf: leaf.T, head) if vocab_first else head
    vocab = head_DxV.shape[1]
    count = math.ceil(vocab / HEAD_CHUNK_COLUMNS)
    width = math.ceil(vocab / count)

    def chunked(leaf):  # (X, V) -> (C, X, W), zero-padded
        padded = jnp.pad(jnp.asarray(leaf), ((0, 0), (0, count * width - vocab)))
        return jnp.moveaxis(padded.reshape(leaf.shape[0], count, width), 1, 0)

    chunks = QuantArray(
        chunked(head_DxV.values),
        chunked(head_DxV.scales),
        None if head_DxV.mins is None else chunked(head_DxV.mins),
        axis=-2,
    )
    return VocabChunks(chunks, vocab_size=vocab, vocab_first=vocab_first)


def vocab_chunks(params: DecoderParams) -> DecoderParams:
    """The params with a quantized output head (lm_head, or the tied embedding) as VocabChunks."""
    if isinstance(params.lm_head, QuantArray):
        return params._replace(lm_head=to_vocab_chunks(params.lm_head, vocab_first=False))
    if params.lm_head is None and isinstance(params.embed, QuantArray):
        return params._replace(embed=to_vocab_chunks(params.embed, vocab_first=True))
    return params


def decoding_layout(params: DecoderParams, kernel: bool) -> DecoderParams:
    """Quantized params laid out for decoding: for the kernel where `kernel` (what it cannot
    take stays a QuantArray), the output head as VocabChunks unless the kernel took it."""
    return vocab_chunks(for_kernel(params) if kernel else params)


def for_kernel(params: DecoderParams) -> DecoderParams:
    """The quantized weights the kernel can take (blocks of 32) as PackedArrays: projections,
    the output head and a tied embedding; any other stays as it is."""

    def packed(weight, stacked: bool):
        return pack(weight, stacked) if isinstance(weight, QuantArray) else weight

    blocks = jax.tree.map(lambda w: packed(w, True), params.blocks, is_leaf=is_quantized)
    packed_params = params._replace(blocks=blocks, lm_head=packed(params.lm_head, False))
    if params.lm_head is None and isinstance(params.embed, QuantArray):
        packed_params = packed_params._replace(embed=_pack_embedding(params.embed))
    return packed_params


def pack(array: QuantArray, stacked: bool) -> QuantArray | PackedArray:
    """A projection ([L,] inputs..., outputs...) blocked along its last input axis, in the
    kernel's layout; as it is where its blocks are not 32 wide."""
    if array.block != qmatvec.BLOCK:
        return array
    lead = 1 if stacked else 0
    at = array.ndim + array.axis
    in_shape, out_shape = array.shape[lead : at + 1], array.shape[at + 1 :]
    outputs = math.prod(out_shape)

    def rows(leaf):  # ([L,] inputs..., outputs...) -> ([L,] N, K)
        if leaf is None:
            return None
        leaf = np.asarray(leaf)
        width = leaf.size // (math.prod(leaf.shape[:lead]) * outputs)
        return np.swapaxes(leaf.reshape(*leaf.shape[:lead], width, outputs), -1, -2)

    return qmatvec.pack_rows(
        rows(array.values), rows(array.scales), rows(array.mins), in_shape, out_shape
    )


def _pack_embedding(embed: QuantArray) -> QuantArray | PackedArray:
    """A (V, D) embedding blocked along D: its rows are already the head's output rows."""
    if embed.block != qmatvec.BLOCK or embed.axis != -1:
        return embed
    vocab, width = embed.shape
    return qmatvec.pack_rows(
        embed.values, embed.scales, embed.mins, (width,), (vocab,), transposed=True
    )


def with_activations(params: DecoderParams, activations: str) -> DecoderParams:
    """The params with every PackedArray's kernel arithmetic set to `activations` (one of
    `qmatvec.ACTIVATIONS`: "f32", exact; "int8", llama.cpp's)."""
    if activations not in qmatvec.ACTIVATIONS:
        raise ArgumentError(
            f"activations must be one of {list(qmatvec.ACTIVATIONS)}, got {activations!r}"
        )
    return jax.tree.map(
        lambda w: (
            dataclasses.replace(w, activations=activations) if isinstance(w, PackedArray) else w
        ),
        params,
        is_leaf=is_form,
    )


def check_block(shape: tuple[int, ...], axis: int, block: int, name: str) -> None:
    """The block size must be positive and divide the blocked axis."""
    if not isinstance(block, int) or block < 1:
        raise ArgumentError(f"block must be a positive int, got {block!r}")
    if not -len(shape) <= axis < 0:
        raise ArgumentError(f"{name}: the blocked axis {axis} is not an axis of shape {shape}")
    if shape[axis] % block:
        raise ArgumentError(
            f"{name}: block size {block} does not divide the input width {shape[axis]} "
            f"(axis {axis} of shape {shape})"
        )


def check_quant_array(array, name: str, shape: tuple[int, ...]) -> None:
    """A QuantArray of the dense shape, its scales (and mins) one per block, int8 values."""
    if not isinstance(array, QuantArray):
        raise ArgumentTypeError(f"{name} must be a QuantArray, got {type(array).__name__}")
    if array.shape != shape:
        raise ArgumentError(f"{name} has shape {array.shape}, expected {shape}")
    if array.values.dtype != jnp.int8:
        raise ArgumentTypeError(f"{name}.values must be int8, got {array.values.dtype}")
    scale_shape = tuple(array.scales.shape)
    blocks = scale_shape[array.axis] if len(scale_shape) == len(shape) else 0
    expected = list(shape)
    expected[array.axis] = blocks
    if not (blocks and shape[array.axis] % blocks == 0 and tuple(expected) == scale_shape):
        raise ArgumentError(
            f"{name}.scales has shape {scale_shape}: expected one per block along axis "
            f"{array.axis} of the values' shape {shape}"
        )
    if array.mins is not None and tuple(array.mins.shape) != scale_shape:
        raise ArgumentError(
            f"{name}.mins has shape {tuple(array.mins.shape)}, expected the scales' {scale_shape}"
        )
