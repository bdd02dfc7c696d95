"""GGUF's block formats unpacked to int8 values, scales and mins: exactly what the gguf package
dequantizes, for every kept format."""

import gguf
import numpy as np
import pytest

from scanlab.decoder.formats import gguf_blocks

Q = gguf.GGMLQuantizationType
LEGACY = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]  # the gguf package quantizes these
K_QUANTS = [Q.Q4_K, Q.Q5_K, Q.Q6_K]  # it only dequantizes these: random blocks instead


def dense(blocks: gguf_blocks.Blocks) -> np.ndarray:
    """values * scale + min in f32, the arithmetic `quant.dequantize` runs."""
    rows, width = blocks.values.shape
    split = blocks.values.astype(np.float32).reshape(rows, -1, blocks.block)
    out = split * blocks.scales.astype(np.float32)[..., None]
    if blocks.mins is not None:
        out = out + blocks.mins.astype(np.float32)[..., None]
    return out.reshape(rows, width)


def random_k_blocks(tensor_type, rows: int, width: int, rng) -> np.ndarray:
    """Random bytes in the type's layout, its f16 factors finite."""
    per_block, nbytes, _ = gguf_blocks._FORMATS[tensor_type]
    raw = rng.integers(0, 256, (rows * width // per_block, nbytes), dtype=np.uint8)
    factors = {Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}[tensor_type]
    for at in factors:
        f16 = rng.normal(size=len(raw)).astype(np.float16)
        raw[:, at : at + 2] = f16.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def quantized(tensor_type, rows: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if tensor_type in K_QUANTS:
        return random_k_blocks(tensor_type, rows, width, rng)
    return gguf.quants.quantize(rng.normal(size=(rows, width)).astype(np.float32), tensor_type)


@pytest.mark.parametrize("tensor_type", LEGACY + K_QUANTS, ids=lambda t: t.name)
@pytest.mark.parametrize(("rows", "width"), [(1, 256), (3, 768)])
def test_unpacked_blocks_dequantize_exactly_as_gguf(tensor_type, rows, width):
    raw = quantized(tensor_type, rows, width)
    blocks = gguf_blocks.unpack(raw, tensor_type)
    assert blocks.values.dtype == np.int8 and blocks.values.shape == (rows, width)
    assert blocks.block == gguf_blocks.block_size(tensor_type)
    np.testing.assert_array_equal(dense(blocks), gguf.quants.dequantize(raw, tensor_type))


def test_one_layout_for_layers_of_different_types_is_exact():
    """Gemma 3's ffn_down mixes Q6_K (blocks of 16, no mins) and Q4_K (32, mins) over layers."""
    types = [Q.Q6_K, Q.Q4_K, Q.Q8_0, Q.Q5_1]
    raws = [quantized(t, 2, 512, seed) for seed, t in enumerate(types)]
    parts = gguf_blocks.common_layout(
        [gguf_blocks.unpack(raw, t) for raw, t in zip(raws, types, strict=True)]
    )
    assert {part.block for part in parts} == {16}
    assert {part.scales.dtype for part in parts} == {np.dtype(np.float32)}
    assert all(part.mins is not None for part in parts)
    for part, raw, tensor_type in zip(parts, raws, types, strict=True):
        np.testing.assert_array_equal(dense(part), gguf.quants.dequantize(raw, tensor_type))


def test_layers_of_f16_scaled_types_keep_f16_scales():
    types = [Q.Q8_0, Q.Q5_0]  # Gemma 3's attn_v
    parts = gguf_blocks.common_layout([gguf_blocks.unpack(quantized(t, 2, 64), t) for t in types])
    assert {part.scales.dtype for part in parts} == {np.dtype(np.float16)}
    assert all(part.mins is None for part in parts)
