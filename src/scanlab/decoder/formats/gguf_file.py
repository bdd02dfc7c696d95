"""GGUF files (llama.cpp's format) -> stacked DecoderParams, through the `gguf` package.

A GGUF file holds the model's settings as metadata (`llama.block_count`, ...), its tokenizer and
chat template, and one tensor per layer and weight (`blk.{i}.attn_q.weight`), each float or
quantized in blocks. `gguf.quants.dequantize` turns every type it knows (F32, F16, BF16, Q4_0,
Q4_1, Q5_0, Q5_1, Q8_0, the K-quants Q2_K..Q6_K, the IQ types) into float32; tensor names come
from the parameter declarations in `scanlab.decoder.spec`. llama.cpp's converter interleaves the
rotary pairs of Llama's q and k rows; loading undoes it, so the result equals the transformers
checkpoint the file was converted from.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from scanlab.decoder import spec
from scanlab.decoder.config import DecoderConfig
from scanlab.decoder.formats.base import (
    CheckpointError,
    Tensor,
    assemble,
    checked_tensor,
    from_hf,
    hf_shape,
)
from scanlab.decoder.params import DecoderParams

ARCHITECTURES = ("llama", "qwen2")


@functools.lru_cache(maxsize=1)
def _open(path: Path, mtime_ns: int) -> gguf.GGUFReader:
    del mtime_ns  # part of the cache key only: a rewritten file is read again
    return gguf.GGUFReader(path)


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """The file's reader (metadata parsed, tensors memory-mapped); the last one is cached.

    Raises CheckpointError for a missing, truncated or corrupt file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist")
    try:
        return _open(path.resolve(), path.stat().st_mtime_ns)
    except (
        ValueError,
        IndexError,
        KeyError,
        TypeError,
        OverflowError,
        UnicodeDecodeError,
    ) as error:
        raise CheckpointError(f"{path} is not a readable GGUF file: {error}") from None


def metadata(reader: gguf.GGUFReader, key: str, default=None):
    """The value of a metadata key (a scalar, string or list), or `default` when absent."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def config_from_gguf(reader: gguf.GGUFReader) -> DecoderConfig:
    """DecoderConfig from the file's metadata; only Llama and Qwen2 without rope scaling."""
    arch = metadata(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"general.architecture must be one of {list(ARCHITECTURES)}, got {arch!r}"
        )

    def get(key: str, default=None):
        value = metadata(reader, f"{arch}.{key}", default)
        if value is None:
            raise CheckpointError(f"GGUF metadata is missing {arch}.{key}")
        return value

    scaling = get("rope.scaling.type", "none")
    if scaling != "none":
        raise CheckpointError(f"{arch}.rope.scaling.type must be 'none', got {scaling!r}")
    tensors = {tensor.name for tensor in reader.tensors}
    n_heads, d_model = int(get("attention.head_count")), int(get("embedding_length"))
    tokens = metadata(reader, "tokenizer.ggml.tokens", [])
    return DecoderConfig(
        vocab_size=int(get("vocab_size", len(tokens) or None)),
        n_layers=int(get("block_count")),
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=int(get("attention.key_length", d_model // n_heads)),
        mlp_dim=int(get("feed_forward_length")),
        rope_theta=float(get("rope.freq_base", 10_000.0)),
        norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        max_seq_len=int(get("context_length")),
        tie_embeddings=spec.LM_HEAD.gguf_name not in tensors,
        family=arch,
    )


def load_gguf(path: str | os.PathLike, dtype=jnp.float32) -> tuple[DecoderConfig, DecoderParams]:
    """Reads a Llama or Qwen2 GGUF file into stacked DecoderParams.

    Args:
      path: the .gguf file.
      dtype: the parameters' dtype (quantized tensors are dequantized to float32 first).
    """
    reader = open_gguf(path)
    config = config_from_gguf(reader)
    tensors = {tensor.name: tensor for tensor in reader.tensors}

    def read(leaf: spec.Leaf, layer: int | None) -> Tensor:
        name = leaf.gguf_name if layer is None else f"blk.{layer}.{leaf.gguf_name}"
        tensor = _dequantized(tensors, name, hf_shape(leaf, config), path)
        array = from_hf(leaf, tensor, config)
        if leaf.gguf_interleaved and config.family == "llama":
            array = _halves_from_pairs(array, leaf.shape.split().index("Dh"))
        return array

    return config, assemble(config, read, jnp.dtype(dtype))


def _dequantized(tensors: dict, name: str, shape: tuple[int, ...], path) -> np.ndarray:
    tensor = tensors.get(name)
    if tensor is None:
        raise CheckpointError(f"{path}: tensor {name} is missing")
    try:
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise CheckpointError(
            f"{path}: tensor {name} has type {tensor.tensor_type.name}, which the gguf package "
            "cannot dequantize"
        ) from None
    return checked_tensor(array, shape, f"{path}: tensor {name}", "the metadata")


def _halves_from_pairs(array: Tensor, axis: int) -> jax.Array:
    """Reorders a Dh axis from interleaved rotary pairs (x0 y0 x1 y1 ...) to halves (x.. y..)."""
    moved = jnp.moveaxis(jnp.asarray(array), axis, -1)
    pairs = moved.reshape(*moved.shape[:-1], -1, 2)
    return jnp.moveaxis(pairs.swapaxes(-1, -2).reshape(moved.shape), -1, axis)
