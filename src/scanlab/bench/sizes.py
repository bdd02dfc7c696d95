"""W17's models at the sizes people run: GGUF files of real shapes with random blocks.

No model hub is reachable and no multi-GB file is committed: a Llama-shaped GGUF is written at
benchmark time, its weight blocks random (valid f16 scales, random integers) and its tokenizer
and chat template copied from a small real file (SmolLM2's), so every contender — scanlab,
llama.cpp — loads, prefills and decodes it as it would a real model of that shape. Only speed
and memory are measured on it: its tokens mean nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import gguf
import numpy as np

from scanlab import storage
from scanlab.decoder.formats.gguf_file import open_gguf
from scanlab.errors import ArgumentError

Q = gguf.GGMLQuantizationType


class Shape(NamedTuple):
    """A Llama model's dimensions (the vocabulary is the tokenizer's file's)."""

    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    mlp_dim: int


SHAPES = {
    "1b": Shape(d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, mlp_dim=8192),  # Llama 3.2
    "8b": Shape(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, mlp_dim=14336),  # Llama 3.1
}
TENSOR_TYPES = ("Q4_0", "Q4_1", "Q8_0")
# A weight's dequantized magnitude: small enough that 32 layers keep activations finite.
WEIGHT_SCALE = 0.02


def write_synthetic_gguf(
    path: str | os.PathLike, shape: Shape, tensor_type: str, like: str | os.PathLike, seed=0
) -> Path:
    """A Llama GGUF of `shape`, every weight matrix (the tied embedding too) in `tensor_type`
    (Q4_0, Q4_1 or Q8_0) with random blocks, norms of ones; metadata and tokenizer from `like`.

    Written tensor by tensor (memory holds one at a time, whatever the file's size) under a
    temporary name, renamed when complete.
    """
    if tensor_type not in TENSOR_TYPES:
        raise ArgumentError(f"tensor_type must be one of {TENSOR_TYPES}, got {tensor_type!r}")
    qtype = getattr(Q, tensor_type)
    source = open_gguf(like)
    vocab = len(source.fields["tokenizer.ggml.tokens"].contents())
    with storage.staged_file(Path(path)) as staging:  # never a half-written file
        writer = gguf.GGUFWriter(staging, "llama")
        for field in source.fields.values():
            if field.name.startswith(("GGUF.", "general.architecture", "llama.")):
                continue
            value_type = field.types[0]
            sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
        head_dim = shape.d_model // shape.n_heads
        writer.add_block_count(shape.n_layers)
        writer.add_embedding_length(shape.d_model)
        writer.add_feed_forward_length(shape.mlp_dim)
        writer.add_head_count(shape.n_heads)
        writer.add_head_count_kv(shape.n_kv_heads)
        writer.add_context_length(8192)
        writer.add_rope_freq_base(500_000.0)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_vocab_size(vocab)
        writer.add_rope_dimension_count(head_dim)
        tensors = _tensors(shape, vocab, head_dim, qtype)
        for name, dims, kind in tensors:
            writer.add_tensor_info(name, _stored_shape(dims, kind), *_stored_type(dims, kind))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        rng = np.random.default_rng(seed)
        for _, dims, kind in tensors:
            writer.write_tensor_data(_random_tensor(rng, dims, kind))
        writer.close()
    return Path(path)


def _tensors(shape: Shape, vocab: int, head_dim: int, qtype) -> list[tuple[str, tuple, Q]]:
    """(GGUF name, (rows, inputs) or (width,), type) of every tensor, in file order."""
    d, f = shape.d_model, shape.mlp_dim
    q, kv = shape.n_heads * head_dim, shape.n_kv_heads * head_dim
    tensors = [("token_embd.weight", (vocab, d), qtype), ("output_norm.weight", (d,), Q.F32)]
    for i in range(shape.n_layers):
        matrices = {
            "attn_q": (q, d),
            "attn_k": (kv, d),
            "attn_v": (kv, d),
            "attn_output": (d, q),
            "ffn_gate": (f, d),
            "ffn_up": (f, d),
            "ffn_down": (d, f),
        }
        tensors += [(f"blk.{i}.{name}.weight", dims, qtype) for name, dims in matrices.items()]
        tensors += [(f"blk.{i}.{name}.weight", (d,), Q.F32) for name in ("attn_norm", "ffn_norm")]
    return tensors


def _stored_shape(dims: tuple, kind: Q) -> tuple[int, ...]:
    """The shape `add_tensor_info` takes: a quantized tensor's in bytes per row."""
    if kind == Q.F32:
        return dims
    per_block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    return (dims[0], dims[1] // per_block * block_bytes)


def _stored_type(dims: tuple, kind: Q) -> tuple[np.dtype, int, Q | None]:
    rows_bytes = _stored_shape(dims, kind)
    if kind == Q.F32:
        return np.dtype(np.float32), 4 * int(np.prod(dims)), None
    return np.dtype(np.uint8), int(np.prod(rows_bytes)), kind


def _random_tensor(rng: np.random.Generator, dims: tuple, kind: Q) -> np.ndarray:
    """Norms of ones; blocks of random integers whose f16 scales (and Q4_1's mins) make the
    dequantized weights about WEIGHT_SCALE in size."""
    if kind == Q.F32:
        return np.ones(dims, np.float32)
    rows, inputs = dims
    per_block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    blocks = rng.integers(0, 256, (rows, inputs // per_block, block_bytes), dtype=np.uint8)
    largest = 127 if kind == Q.Q8_0 else 8
    scales = rng.uniform(0.5, 1.5, blocks.shape[:2]) * WEIGHT_SCALE / largest
    blocks[..., :2] = scales.astype(np.float16)[..., None].view(np.uint8)
    if kind == Q.Q4_1:  # the min: centre the values 0..15 on zero
        blocks[..., 2:4] = (-8 * scales).astype(np.float16)[..., None].view(np.uint8)
    return blocks.reshape(rows, -1)
