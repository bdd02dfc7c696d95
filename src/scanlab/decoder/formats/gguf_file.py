"""GGUF files (llama.cpp's format) -> stacked DecoderParams, through the `gguf` package.

A GGUF file holds the model's settings as metadata (`llama.block_count`, ...), its tokenizer and
chat template, and one tensor per layer and weight (`blk.{i}.attn_q.weight`), each float or
quantized in blocks. `gguf.quants.dequantize` turns every type it knows (F32, F16, BF16, Q4_0,
Q4_1, Q5_0, Q5_1, Q8_0, the K-quants Q2_K..Q6_K, the IQ types) into float32; tensor names come
from the parameter declarations in `scanlab.decoder.families`. llama.cpp's converter interleaves
the rotary pairs of Llama's q and k rows and adds 1 to Gemma's norms; loading undoes both (as the
leaves declare), so the result equals the transformers checkpoint the file was converted from.
Neither format records Gemma 3's layer pattern: it is the family's, as in llama.cpp.
"""

from __future__ import annotations

import functools
import os
import struct
import sys
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from scanlab import checks, storage
from scanlab.decoder import quant, spec
from scanlab.decoder.config import DecoderConfig
from scanlab.decoder.families import FAMILIES, LM_HEAD, SLIDING, Family, Leaf
from scanlab.decoder.formats import gguf_blocks, gguf_packed
from scanlab.decoder.formats.base import (
    CheckpointError,
    Tensor,
    assemble,
    checked_tensor,
    from_hf,
    hf_shape,
    to_hf,
)
from scanlab.decoder.params import DecoderParams, outside_layers
from scanlab.decoder.qmatvec import PackedArray
from scanlab.decoder.quant import QuantArray
from scanlab.decoder.rope import FACTORS, RopeScaling
from scanlab.errors import ArgumentError, PathExistsError, ScanlabError

ROPE_FACTORS = "rope_freqs.weight"  # per-pair divisors of the rotary frequencies


def _architectures() -> dict[str, Family]:
    """general.architecture -> the first family declared with it (Llama reads "llama" files,
    Mistral's included)."""
    readers: dict[str, Family] = {}
    for family in FAMILIES.values():
        readers.setdefault(family.gguf_architecture, family)
    return readers


ARCHITECTURES = _architectures()


class FastReader(gguf.GGUFReader):
    """`gguf.GGUFReader`, slicing a plain ndarray view of its memory map.

    The reader cuts every metadata value out of a `np.memmap`, whose slices each run a Python
    hook (`__array_finalize__`); Gemma's 262,144-token vocabulary makes millions of them, most
    of the time spent opening the file. The same bytes, the same views, a third of the time.
    """

    def _bytes(self) -> np.ndarray:
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self.__dict__["_plain"] = self.data.view(np.ndarray)
        return plain

    def _get(self, offset, dtype, count=1, override_order=None):
        plain = self._bytes()
        count = int(count)
        end = offset + np.dtype(dtype).itemsize * count
        array = plain[offset:end].view(dtype=dtype)[:count]
        order = self.byte_order if override_order is None else override_order
        return array.view(array.dtype.newbyteorder(order))

    def _get_field_parts(self, orig_offs, raw_type):
        """As the reader's, the same parts, but an array (a vocabulary, its merges, scores,
        token types) cut in one loop rather than by the generic recursion per item."""
        little_endian_file = self.byte_order == "I" and sys.byteorder == "little"
        if raw_type != gguf.GGUFValueType.ARRAY or not little_endian_file:
            return super()._get_field_parts(orig_offs, raw_type)
        plain = self._bytes()
        item_type, count = struct.unpack_from("<IQ", plain, orig_offs)
        scalar = self.gguf_scalar_to_np.get(gguf.GGUFValueType(item_type))
        if item_type != gguf.GGUFValueType.STRING and scalar is None:
            return super()._get_field_parts(orig_offs, raw_type)  # an array of arrays
        parts = [plain[orig_offs : orig_offs + 4].view(np.uint32)]
        parts.append(plain[orig_offs + 4 : orig_offs + 12].view(np.uint64))
        offset = orig_offs + 12
        if scalar is not None:  # one (1,) part per item, as the reader cuts them
            end = offset + count * np.dtype(scalar).itemsize
            parts += list(plain[offset:end].view(scalar).reshape(-1, 1))
            data_indices = list(range(2, len(parts)))
            offset = end
        else:  # a length part and a bytes part per string
            for _ in range(count):
                (length,) = struct.unpack_from("<Q", plain, offset)
                parts.append(plain[offset : offset + 8].view(np.uint64))
                parts.append(plain[offset + 8 : offset + 8 + length])
                offset += 8 + length
            data_indices = list(range(3, len(parts), 2))
        types = [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType(item_type)]
        return offset - orig_offs, parts, data_indices, types


@functools.lru_cache(maxsize=1)
def _open(path: Path, mtime_ns: int) -> gguf.GGUFReader:
    del mtime_ns  # part of the cache key only: a rewritten file is read again
    return FastReader(path)


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """The file's reader (metadata parsed, tensors memory-mapped); the last one is cached.

    Raises CheckpointError for a missing, truncated or corrupt file.
    """
    path = checks.path_like("path", path)
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


def config_from_gguf(reader: gguf.GGUFReader, path: str | os.PathLike = "") -> DecoderConfig:
    """DecoderConfig from the file's metadata: a family in ARCHITECTURES, its rotary scaling
    "linear" or "yarn" (`_rope_scaling`)."""
    arch = metadata(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"{path}: general.architecture must be one of {list(ARCHITECTURES)}, got {arch!r}"
        )
    family = ARCHITECTURES[arch]

    def get(key: str, default=None):
        value = metadata(reader, f"{arch}.{key}", default)
        if value is None:
            raise CheckpointError(f"{path}: GGUF metadata is missing {arch}.{key}")
        return value

    tensors = {tensor.name: tensor for tensor in reader.tensors}
    n_heads, d_model = int(get("attention.head_count")), int(get("embedding_length"))
    tokens = metadata(reader, "tokenizer.ggml.tokens", [])
    try:
        config = DecoderConfig(
            vocab_size=int(get("vocab_size", len(tokens) or None)),
            n_layers=int(get("block_count")),
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=int(get("attention.head_count_kv", n_heads)),
            head_dim=int(get("attention.key_length", d_model // n_heads)),
            mlp_dim=int(get("feed_forward_length")),
            rope_theta=float(get("rope.freq_base", 10_000.0)),
            rope_scaling=_rope_scaling(get, arch, tensors.get(ROPE_FACTORS), path),
            local_rope_theta=float(get("rope.freq_base_swa", 10_000.0)),
            norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            max_seq_len=int(get("context_length")),
            tie_embeddings=LM_HEAD.gguf_name not in tensors,
            family=family.name,
            sliding_window=(
                int(get("attention.sliding_window")) if family.has_sliding_layers else None
            ),
            no_rope_layers=family.no_rope_layers(int(get("block_count"))),
        )
    except ScanlabError as error:
        raise CheckpointError(f"{path}: {error}") from None
    check_layer_pattern(metadata(reader, f"{arch}.attention.sliding_window_pattern"), config, path)
    return config


# Settings of llama.cpp's YaRN whose meaning is not transformers' (scanlab computes the latter).
_UNREAD_YARN_KEYS = ("attn_factor", "yarn_attn_factor", "yarn_ext_factor", "yarn_log_multiplier")


def _rope_scaling(get, arch: str, factors, path) -> RopeScaling | None:
    """The full attention layers' rotary scaling as llama.cpp writes it: `rope.scaling.type`
    "none", "linear" (its factor) or "yarn" (factor, pretraining context, betas), or a "llama3"
    scaling as the divisors of its frequencies (the tensor `factors`, ROPE_FACTORS)."""
    kind = get("rope.scaling.type", "none")
    if factors is not None:
        if kind != "none":
            raise CheckpointError(
                f"{path}: {ROPE_FACTORS} and {arch}.rope.scaling.type {kind!r} both scale the "
                f"rotary frequencies: one of them must go"
            )
        divisors = tuple(float(f) for f in np.asarray(factors.data, np.float32).reshape(-1))
        return RopeScaling(kind=FACTORS, factor=max(divisors), frequency_factors=divisors)
    if kind == "none":
        return None
    if kind not in ("linear", "yarn"):
        raise CheckpointError(
            f"{path}: {arch}.rope.scaling.type must be one of ['none', 'linear', 'yarn'], "
            f"got {kind!r}"
        )
    settings: dict = {}
    if kind == "yarn":
        for key in _UNREAD_YARN_KEYS:
            if get(f"rope.scaling.{key}", False) is not False:
                raise CheckpointError(f"{path}: {arch}.rope.scaling.{key} is not supported")
        settings = dict(
            original_max_seq_len=int(get("rope.scaling.original_context_length")),
            beta_fast=float(get("rope.scaling.yarn_beta_fast", 32.0)),
            beta_slow=float(get("rope.scaling.yarn_beta_slow", 1.0)),
        )
    return RopeScaling(kind=kind, factor=float(get("rope.scaling.factor")), **settings)


def check_layer_pattern(pattern, config: DecoderConfig, path) -> None:
    """A recorded layer pattern (llama.cpp writes one per layer for some models: True for a
    sliding layer) must be the family's; scanlab does not guess another."""
    if pattern is None:
        return
    sliding = [kind == SLIDING for kind in config.layer_types]
    if not isinstance(pattern, list) or [bool(p) for p in pattern] != sliding:
        raise CheckpointError(
            f"{path}: the layer pattern {config.family}.attention.sliding_window_pattern must be "
            f"{sliding} (the family's), got {pattern}"
        )


def load_gguf(
    path: str | os.PathLike, dtype=jnp.float32, *, quantized: bool = False, kernel: bool = False
) -> tuple[DecoderConfig, DecoderParams]:
    """Reads a GGUF file of a known family (Llama, Qwen2, Gemma 3) into stacked DecoderParams.

    Args:
      path: the .gguf file.
      dtype: the dense parameters' dtype (quantized tensors are dequantized to float32 first).
      quantized: keep the weight matrices the file quantizes as `QuantArray`s, their blocks
        unpacked losslessly (`gguf_blocks`; dequantized, they equal the dense load exactly), the
        output head as `VocabChunks`; norms, biases and float tensors load dense in `dtype`.
      kernel: with `quantized`, the weights the CPU kernel takes in its layout instead
        (`quant.for_kernel`: PackedArrays).

    Every declared tensor's presence is checked before any is dequantized.
    """
    dtype = spec.check_param_dtype(dtype)
    reader = open_gguf(path)
    config = config_from_gguf(reader, path)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    declared = spec.declared(config)
    missing = [name for name in tensor_names(config) if name not in tensors]
    if missing:
        raise CheckpointError(
            f"{path}: {len(missing)} tensor(s) of a {config.family} model are missing: "
            f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}"
        )

    def read(leaf: Leaf, layer: int | None) -> Tensor:
        name = _name(leaf, layer)
        tensor = _dequantized(tensors, name, hf_shape(leaf, config), path)
        array = from_hf(leaf, tensor, config)
        if leaf.gguf_interleaved:
            array = _halves_from_pairs(array, leaf.shape.split().index("Dh"))
        return array - leaf.gguf_offset if leaf.gguf_offset else array

    def read_kept(leaf: Leaf, in_blocks: bool) -> QuantArray | PackedArray | None:
        if not (quantized and leaf.quantizable):
            return None
        layers = range(config.n_layers) if in_blocks else [None]
        kept = [tensors[_name(leaf, layer)] for layer in layers]
        if not _keepable(leaf, kept, config):
            return None
        embedding = leaf == declared.embed
        if kernel and (config.tie_embeddings or not embedding):
            on_kernel = gguf_packed.packed(
                leaf, kept, config, Path(path), stacked=in_blocks, embedding=embedding
            )
            if on_kernel is not None:
                return on_kernel
        parts = [_unpacked(tensor, leaf, config, path) for tensor in kept]
        array = _quant_array(leaf, gguf_blocks.common_layout(parts), config)
        return array if in_blocks else jax.tree.map(lambda part: part[0], array)

    params = assemble(config, read, dtype, read_kept)
    return config, quant.decoding_layout(params, kernel) if quantized else params


def _name(leaf: Leaf, layer: int | None) -> str:
    return leaf.gguf_name if layer is None else f"blk.{layer}.{leaf.gguf_name}"


def _keepable(leaf: Leaf, tensors: list, config: DecoderConfig) -> bool:
    """Every layer's tensor in a kept block format, the blocks within the input letter."""
    if any(tensor.tensor_type not in gguf_blocks.KEPT for tensor in tensors):
        return False
    block = min(gguf_blocks.block_size(tensor.tensor_type) for tensor in tensors)
    return spec.sizes(config)[leaf.input_letter] % block == 0


def _unpacked(tensor, leaf: Leaf, config: DecoderConfig, path) -> gguf_blocks.Blocks:
    """The tensor's blocks, their shape checked and their scales and mins finite."""
    blocks = gguf_blocks.unpack(tensor.data, tensor.tensor_type)
    what = f"{path}: tensor {tensor.name}"
    checked_tensor(blocks.values, hf_shape(leaf, config), what, "the metadata")
    for per_block in (blocks.scales, blocks.mins):
        if per_block is not None:
            checked_tensor(per_block, per_block.shape, f"{what}'s scales or mins", "")
    return blocks


def _quant_array(leaf: Leaf, parts: list[gguf_blocks.Blocks], config: DecoderConfig) -> QuantArray:
    """Layers' Blocks in transformers' layout -> one QuantArray (L, ...) in scanlab's."""
    block = parts[0].block
    letters = leaf.shape.split()

    def stacked(per_layer: list[np.ndarray], block_of: int) -> jax.Array:
        arrays = [from_hf(leaf, array, config, block_of) for array in per_layer]
        if leaf.gguf_interleaved:
            arrays = [_halves_from_pairs(array, letters.index("Dh")) for array in arrays]
        return jnp.stack([jnp.asarray(array) for array in arrays])

    mins = [part.mins for part in parts if part.mins is not None]  # all or none
    return QuantArray(
        stacked([part.values for part in parts], 1),
        stacked([part.scales for part in parts], block),
        stacked(mins, block) if mins else None,
        axis=leaf.blocked_axis,
    )


def tensor_names(config: DecoderConfig) -> list[str]:
    """The GGUF names of every tensor the config declares."""
    declared = spec.declared(config)
    outside = jax.tree.leaves(outside_layers(declared), is_leaf=spec.is_leaf)
    blocks = jax.tree.leaves(declared.blocks, is_leaf=spec.is_leaf)
    return [leaf.gguf_name for leaf in outside] + [
        f"blk.{i}.{leaf.gguf_name}" for i in range(config.n_layers) for leaf in blocks
    ]


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


# --- save -------------------------------------------------------------------------------------

# How `save_gguf` may store the weight matrices (norms and biases are always F32).
SAVE_TYPES = {
    "F32": gguf.GGMLQuantizationType.F32,
    "F16": gguf.GGMLQuantizationType.F16,
    "Q8_0": gguf.GGMLQuantizationType.Q8_0,
}


def save_gguf(
    path: str | os.PathLike,
    config: DecoderConfig,
    params: DecoderParams,
    like: str | os.PathLike,
    tensor_type: str = "Q8_0",
    overwrite: bool = False,
) -> Path:
    """Writes dense params as a GGUF file carrying the metadata of `like`, the GGUF file of the
    same model they came from (its settings, tokenizer and chat template), as llama.cpp lays
    tensors out (rotary pairs interleaved, Gemma's norms as 1 + w).

    Weight matrices are stored as `tensor_type` (a key of SAVE_TYPES; Q8_0 where the input
    width is a multiple of its 32-wide blocks, else F32). Written under a temporary name and
    renamed when complete.
    """
    spec.check_params(params, config)
    spec.check_dense(params, "save_gguf")
    if tensor_type not in SAVE_TYPES:
        raise ArgumentError(f"tensor_type must be one of {list(SAVE_TYPES)}, got {tensor_type!r}")
    source = open_gguf(like)
    if config_from_gguf(source, like) != config:
        raise CheckpointError(f"{like} holds another model than these params' ({config})")
    path = Path(path)
    if path.is_dir():
        raise PathExistsError(f"path {path} is a directory; a GGUF model is a file")
    if path.exists() and not overwrite:
        raise PathExistsError(f"path {path} exists; pass {checks.shown('overwrite')}=True")
    with storage.staged_file(path) as staging:
        writer = gguf.GGUFWriter(staging, config.features.gguf_architecture)
        _copy_metadata(source, writer)
        for name, tensor in _gguf_tensors(config, params):
            qtype = SAVE_TYPES[tensor_type] if tensor.ndim == 2 else SAVE_TYPES["F32"]
            if qtype == SAVE_TYPES["Q8_0"] and tensor.shape[-1] % 32:
                qtype = SAVE_TYPES["F32"]
            data = gguf.quants.quantize(np.asarray(tensor, np.float32), qtype)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def _copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter) -> None:
    """Every metadata key of `reader` but the ones the writer writes itself (gguf's own
    gguf_new_metadata script does the same)."""
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub_type = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub_type)


def _gguf_tensors(config: DecoderConfig, params: DecoderParams):
    """(GGUF name, tensor in the file's layout) of every declared leaf, `read`'s inverse."""
    declared = spec.declared(config)

    def leaves(tree):
        return jax.tree.leaves(tree, is_leaf=spec.is_leaf)

    def in_file(leaf: Leaf, array) -> np.ndarray:
        return np.asarray(
            file_layout(leaf, jnp.asarray(array, jnp.float32) + leaf.gguf_offset, config)
        )

    for leaf, array in zip(
        leaves(outside_layers(declared)), leaves(outside_layers(params)), strict=True
    ):
        yield _name(leaf, None), in_file(leaf, array)
    for leaf, array in zip(leaves(declared.blocks), leaves(params.blocks), strict=True):
        for layer in range(config.n_layers):
            yield _name(leaf, layer), in_file(leaf, array[layer])
    if config.rope_scaling is not None and config.rope_scaling.kind == FACTORS:
        yield ROPE_FACTORS, np.asarray(config.rope_scaling.frequency_factors, np.float32)


def file_layout(leaf: Leaf, array: Tensor, config: DecoderConfig) -> jax.Array:
    """One layer's leaf in scanlab's layout -> as a GGUF file holds it (numpy's (out, in) order
    of transformers, rotary pairs interleaved where llama.cpp's converter interleaves them)."""
    if leaf.gguf_interleaved:
        array = _pairs_from_halves(array, leaf.shape.split().index("Dh"))
    return jnp.asarray(to_hf(leaf, jnp.asarray(array), config))


def _pairs_from_halves(array: Tensor, axis: int) -> jax.Array:
    """The inverse of `_halves_from_pairs`: a Dh axis of halves (x.. y..) -> pairs (x0 y0 ...)."""
    moved = jnp.moveaxis(jnp.asarray(array), axis, -1)
    halves = moved.reshape(*moved.shape[:-1], 2, -1)
    return jnp.moveaxis(halves.swapaxes(-1, -2).reshape(moved.shape), -1, axis)


def _halves_from_pairs(array: Tensor, axis: int) -> jax.Array:
    """Reorders a Dh axis from interleaved rotary pairs (x0 y0 x1 y1 ...) to halves (x.. y..)."""
    moved = jnp.moveaxis(jnp.asarray(array), axis, -1)
    pairs = moved.reshape(*moved.shape[:-1], -1, 2)
    return jnp.moveaxis(pairs.swapaxes(-1, -2).reshape(moved.shape), -1, axis)
