"""The jax.ffi kernel against a NumPy reference of its integer arithmetic, against the pure-JAX
path, under jit, lax.scan and vmap; the layouts it packs; its fallback when switched off."""

import dataclasses
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scanlab.decoder import generate, init_params, preset, qmatvec, quant, quantize, weights
from scanlab.decoder.qmatvec import BLOCK, PackedArray
from scanlab.errors import ArgumentError

pytestmark = pytest.mark.skipif(
    not qmatvec.available(), reason=f"the kernel cannot run here: {qmatvec.describe()}"
)


def reference(x_MxK, quants_NxB, scales_NxK32, mins_NxK32):
    """llama.cpp's arithmetic in NumPy: x's rows to 8-bit blocks, integer dots, then scales."""
    blocks = x_MxK.reshape(x_MxK.shape[0], -1, BLOCK)
    x_scales = np.abs(blocks).max(-1) / np.float32(127)
    inverse = np.where(x_scales > 0, 1 / np.where(x_scales > 0, x_scales, 1), 0)
    x_quants = np.rint(blocks * inverse[..., None]).astype(np.int64)
    if quants_NxB.dtype == np.uint8:
        split = quants_NxB.reshape(quants_NxB.shape[0], -1, BLOCK // 2)
        values = np.concatenate([split & 15, split >> 4], -1).astype(np.int64)
        if mins_NxK32 is None:  # Q4_0: 0..15 stand for -8..7
            values -= 8
    else:
        values = quants_NxB.reshape(quants_NxB.shape[0], -1, BLOCK).astype(np.int64)
    dots = np.einsum("mbi,nbi->mnb", x_quants, values)  # exact integers
    terms = scales_NxK32.astype(np.float64)[None] * dots
    if mins_NxK32 is not None:
        terms += mins_NxK32.astype(np.float64)[None] * x_quants.sum(-1)[:, None, :]
    return (x_scales[:, None, :] * terms).sum(-1)


def random_packed(rng, layers, outputs, inputs, nibbles, scale_dtype, with_mins):
    if nibbles:
        quants = rng.integers(0, 256, size=(layers, outputs, inputs // 2), dtype=np.uint8)
    else:
        quants = rng.integers(-128, 128, size=(layers, outputs, inputs), dtype=np.int8)
    shape = (layers, outputs, inputs // BLOCK)
    scales = (rng.random(shape) * 0.1).astype(scale_dtype)
    mins = (rng.normal(size=shape) * 0.1).astype(scale_dtype) if with_mins else None
    return quants, scales, mins


CASES = [  # (rows M, inputs K, outputs N): one row, widths not a multiple of 256, many rows
    (1, 32, 1),
    (1, 576, 192),
    (7, 96, 300),
    (16, 1536, 65),
    (37, 64, 70),  # a prompt: groups of 8 rows and a partial one, tiles and a partial one
]


@pytest.mark.parametrize("activations", ["f32", "int8"])
@pytest.mark.parametrize("path", qmatvec.paths())  # every path this CPU runs
@pytest.mark.parametrize(
    ("nibbles", "with_mins"), [(False, False), (False, True), (True, True), (True, False)]
)
@pytest.mark.parametrize("scale_dtype", [np.float16, np.float32])
@pytest.mark.parametrize(("rows", "inputs", "outputs"), CASES)
def test_the_kernel_computes_its_reference_arithmetic(
    rows, inputs, outputs, scale_dtype, nibbles, with_mins, path, activations
):
    rng = np.random.default_rng(inputs + outputs)
    quants, scales, mins = random_packed(rng, 3, outputs, inputs, nibbles, scale_dtype, with_mins)
    x = rng.normal(size=(rows, inputs)).astype(np.float32)
    weight = PackedArray(
        jnp.asarray(quants),
        jnp.asarray(scales),
        None if mins is None else jnp.asarray(mins),
        jnp.int32(2),
        in_shape=(inputs,),
        out_shape=(outputs,),
        activations=activations,
    )
    with qmatvec.limited_to(path):
        got = np.asarray(jax.jit(qmatvec.matvec)(jnp.asarray(x), weight))
    dense = x.astype(np.float64) @ np.asarray(qmatvec.unpack(weight), np.float64)
    if activations == "f32":  # the dense product, up to the order of the f32 sums
        np.testing.assert_allclose(got, dense, rtol=1e-5, atol=1e-5 * np.abs(dense).max())
        return
    expected = reference(x, quants[2], scales[2], None if mins is None else mins[2])
    # The integer dots are exact; only the f32 sums of the scaled blocks differ in order.
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    # Against the dense weights: what quantizing the activations costs (as in llama.cpp).
    assert np.abs(got - dense).max() <= 0.02 * np.abs(dense).max()


def quant_array(rng, shape, axis, kind):
    """A QuantArray of a GGUF kind's value range: q8 (Q8_0), q4_0 (-8..7), q4_1 (0..15 + min)."""
    low, high = {"q8": (-127, 128), "q4_0": (-8, 8), "q4_1": (0, 16)}[kind]
    values = rng.integers(low, high, size=shape).astype(np.int8)
    per_block = list(shape)
    per_block[axis] //= BLOCK
    scales = (rng.random(per_block) * 0.05).astype(np.float16)
    mins = (rng.normal(size=per_block) * 0.05).astype(np.float16) if kind == "q4_1" else None
    return quant.QuantArray(
        jnp.asarray(values),
        jnp.asarray(scales),
        None if mins is None else jnp.asarray(mins),
        axis=axis,
    )


@pytest.mark.parametrize("kind", ["q8", "q4_0", "q4_1"])
@pytest.mark.parametrize(
    ("shape", "axis", "equation"),
    [
        ((2, 64, 3, 2, 32), -4, "bsd,drkh->bsrkh"),  # q_proj: inputs D, outputs (R, K, Dh)
        ((2, 3, 2, 64, 96), -2, "bsrkh,rkhd->bsd"),  # out_proj: inputs (R, K, Dh) blocked on Dh
    ],
)
def test_packing_is_lossless_and_projects_as_the_pure_jax_path(shape, axis, equation, kind):
    rng = np.random.default_rng(0)
    array = quant_array(rng, shape, axis, kind)
    packed = quant.pack(array, stacked=True)
    assert isinstance(packed, PackedArray) and packed.nibbles == (kind != "q8")
    np.testing.assert_array_equal(weights.as_dense(packed), weights.as_dense(array))
    x_shape = (1, 4, *shape[1 : len(shape) + axis + 1])
    x = jnp.asarray(rng.normal(size=x_shape).astype(np.float32))
    layer = dataclasses.replace(packed, layer=jnp.int32(1))
    one = jax.tree.map(lambda leaf: leaf[1], array)
    expected = np.asarray(weights.project(equation, x, one))
    got = np.asarray(weights.project(equation, x, layer))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    int8 = np.asarray(weights.project(equation, x, dataclasses.replace(layer, activations="int8")))
    assert np.abs(int8 - expected).max() <= 0.02 * np.abs(expected).max()
    # A prompt's many rows (more than one group of 8, a partial last group) take the kernel too.
    many = jnp.concatenate([x, 2 * x, -x, x[:, :1]], axis=1)  # 13 rows
    np.testing.assert_allclose(
        weights.project(equation, many, layer),
        weights.project(equation, many, one),
        rtol=1e-5,
        atol=1e-5 * np.abs(expected).max(),
    )


def test_blocks_of_another_width_stay_on_the_pure_jax_path():
    rng = np.random.default_rng(1)
    values = rng.integers(-30, 30, size=(2, 64, 8)).astype(np.int8)
    sixteen = quant.QuantArray(
        jnp.asarray(values), jnp.ones((2, 4, 8), jnp.float32), None, axis=-2
    )  # Q6_K's sub-blocks of 16
    assert quant.pack(sixteen, stacked=True) is sixteen


def test_under_jit_scan_and_vmap_it_reads_the_stack_in_place():
    rng = np.random.default_rng(2)
    quants, scales, mins = random_packed(rng, 4, 40, 64, True, np.float16, True)
    stack = PackedArray(
        jnp.asarray(quants), jnp.asarray(scales), jnp.asarray(mins), None, (64,), (40,)
    )
    x = jnp.asarray(rng.normal(size=(3, 64)).astype(np.float32))

    def each_layer(index):
        return qmatvec.matvec(x, PackedArray(*_leaves(stack), jnp.int32(index), (64,), (40,)))

    loop = np.stack([np.asarray(each_layer(i)) for i in range(4)])

    @jax.jit
    def scanned(x):
        def body(_, index):
            return None, qmatvec.matvec(x, PackedArray(*_leaves(stack), index, (64,), (40,)))

        return jax.lax.scan(body, None, jnp.arange(4, dtype=jnp.int32))[1]

    np.testing.assert_array_equal(scanned(x), loop)
    batched = jax.vmap(lambda row: qmatvec.matvec(row[None], _at(stack, 1))[0])(x)
    # One row at a time sums in another order than three together: f32 rounding only.
    np.testing.assert_allclose(batched, loop[1], rtol=1e-6, atol=1e-6 * np.abs(loop[1]).max())
    # The compiled scan passes the whole stack to the kernel: no slice of it is copied first.
    hlo = scanned.lower(x).compile().as_text().splitlines()
    made = [re.search(r"= u8\[[^ ]* (\S+?)\(", line) for line in hlo]
    kinds = {match[1] for match in made if match}
    assert kinds <= {"constant", "parameter", "get-tuple-element", "tuple"}, kinds


def test_a_prompt_never_dequantizes_a_weight_matrix():
    """Prefill and decoding compiled together hold no f32 copy of any packed matrix, stacked
    or one layer's, in any layout."""
    config = preset("tiny").replace(tie_embeddings=True, n_heads=2, n_kv_heads=1, head_dim=32)
    params = quantize(init_params(config, jax.random.PRNGKey(0)), config, kernel=True)
    tokens = np.arange(24).reshape(2, 12)  # a prompt of 12 rows per sequence: 24 rows of x
    hlo = jax.jit(lambda p: generate(p, tokens, config, 3).tokens).lower(params).compile().as_text()
    f32_shapes = {tuple(map(int, dims.split(","))) for dims in re.findall(r"f32\[([\d,]+)\]", hlo)}
    packed = [
        w for w in jax.tree.leaves(params, is_leaf=weights.is_form) if isinstance(w, PackedArray)
    ]
    assert len(packed) == 8  # 7 projections and the tied embedding
    for weight in packed:
        n, k = int(np.prod(weight.out_shape)), int(np.prod(weight.in_shape))
        layers = weight.quants.shape[:-2]
        dense = (*weight.in_shape, *weight.out_shape)
        forms = {dense, (*layers, *dense), (n, k), (k, n), (*layers, n, k), (*layers, k, n)}
        assert not forms & f32_shapes, (weight.in_shape, weight.out_shape, forms & f32_shapes)


def _leaves(stack: PackedArray):
    return stack.quants, stack.scales, stack.mins


def _at(stack: PackedArray, index: int) -> PackedArray:
    return PackedArray(*_leaves(stack), jnp.int32(index), stack.in_shape, stack.out_shape)


def test_the_arithmetic_is_named_and_checked():
    config = preset("tiny").replace(n_heads=2, n_kv_heads=1, head_dim=32)
    params = quantize(init_params(config, jax.random.PRNGKey(0)), config, kernel=True)
    assert quant.with_activations(params, "int8").blocks.up_proj.activations == "int8"
    with pytest.raises(ArgumentError, match=r"activations must be one of \['f32', 'int8'\]"):
        quant.with_activations(params, "int4")


def test_a_stack_without_its_layer_index_is_refused_not_read_as_layer_0():
    rng = np.random.default_rng(4)
    quants, scales, _ = random_packed(rng, 3, 8, 32, False, np.float32, False)
    stack = PackedArray(jnp.asarray(quants), jnp.asarray(scales), None, None, (32,), (8,))
    with pytest.raises(ArgumentError, match=r"stacked PackedArray \(3 layers\) needs its layer"):
        qmatvec.matvec(jnp.ones((1, 32)), stack)


def test_differentiating_it_is_refused_with_the_way_out():
    rng = np.random.default_rng(3)
    quants, scales, _ = random_packed(rng, 1, 8, 32, False, np.float32, False)
    weight = PackedArray(jnp.asarray(quants[0]), jnp.asarray(scales[0]), None, None, (32,), (8,))
    with pytest.raises(ArgumentError, match=r"kernel is for inference only.*weights='float32'"):
        jax.grad(lambda x: qmatvec.matvec(x, weight).sum())(jnp.ones((1, 32)))


@pytest.mark.parametrize("activations", ["f32", "int8"])
def test_a_decoder_on_the_kernel_decodes_as_the_pure_jax_quantized_path(activations):
    config = preset("tiny").replace(tie_embeddings=True, n_heads=2, n_kv_heads=1, head_dim=32)
    dense = init_params(config, jax.random.PRNGKey(0))
    on_kernel = quant.with_activations(quantize(dense, config, kernel=True), activations)
    pure_jax = quantize(dense, config)
    assert isinstance(on_kernel.blocks.gate_proj, PackedArray)
    assert isinstance(on_kernel.embed, PackedArray) and on_kernel.lm_head is None
    tokens = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    kernel_out = generate(on_kernel, tokens, config, 16, return_logits=True)
    jax_out = generate(pure_jax, tokens, config, 16, return_logits=True)
    logits_k, logits_j = np.asarray(kernel_out.logits), np.asarray(jax_out.logits)
    # Exact: the sums' order only. int8 activations move the logits a little; on this random
    # model the tokens still agree.
    tolerance = 1e-5 if activations == "f32" else 0.05
    assert np.abs(logits_k - logits_j).max() <= tolerance * np.abs(logits_j).max()
    np.testing.assert_array_equal(kernel_out.tokens, jax_out.tokens)


def test_switched_off_the_pure_jax_path_runs_and_says_so():
    script = """
from scanlab.decoder import qmatvec, quantize, init_params, preset
import jax
config = preset("tiny").replace(n_heads=2, n_kv_heads=1, head_dim=32)
params = quantize(init_params(config, jax.random.PRNGKey(0)), config, kernel=qmatvec.available())
print(qmatvec.available(), qmatvec.describe(), type(params.blocks.gate_proj).__name__)
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=os.environ | {"SCANLAB_KERNEL": "off"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False pure JAX (SCANLAB_KERNEL=off) QuantArray"


@pytest.mark.parametrize(
    ("compiler", "reason"),
    [
        ("no-such-c++", "no C++ compiler found ($CXX, else c++)"),
        ("/bin/false", "/bin/false could not compile the kernel: no message"),
    ],
)
def test_without_a_working_compiler_the_pure_jax_path_runs_and_says_why(tmp_path, compiler, reason):
    """A fresh cache (no kernel built yet) and nothing that builds it."""
    script = "from scanlab.decoder import qmatvec; print(qmatvec.available(), qmatvec.describe())"
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=os.environ | {"CXX": compiler, "SCANLAB_CACHE": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == f"False pure JAX ({reason})"
