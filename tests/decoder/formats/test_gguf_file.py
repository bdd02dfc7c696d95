"""GGUF files: scanlab's loading against transformers' loading of the same file, and bad files."""

import chex
import gguf
import jax
import numpy as np
import pytest
import torch
from tests.decoder.formats.gguf_files import random_model, write_gguf
from tests.decoder.test_rope import LLAMA3_2_ROPE
from transformers import AutoModelForCausalLM

from scanlab import checks
from scanlab.decoder import CheckpointError, forward, load, load_gguf, qmatvec
from scanlab.decoder.formats import gguf_packed
from scanlab.decoder.formats.gguf_file import save_gguf
from scanlab.errors import ArgumentError, OutOfMemoryError, PathExistsError

Q = gguf.GGMLQuantizationType
TOKENS = np.random.default_rng(0).integers(0, 96, (2, 9))


def logits_of(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


@pytest.mark.parametrize(
    ("family", "tie", "qtype"),
    [("llama", False, q) for q in (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1)]
    + [("llama", True, Q.Q4_1), ("qwen2", False, Q.F32)],
    ids=lambda value: getattr(value, "name", str(value)),
)
def test_logits_equal_transformers_loading_the_same_file(tmp_path, family, tie, qtype):
    path = write_gguf(tmp_path / "model.gguf", random_model(family, tie), qtype)
    reference = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32
    )
    config, params = load_gguf(path)
    assert (config.family, config.tie_embeddings) == (family, tie)
    # Both dequantize with the gguf package: equal to float32 rounding (logits ~0.5-1.1).
    np.testing.assert_allclose(forward(params, TOKENS, config), logits_of(reference), atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3", "smollm3"])
def test_f32_file_equals_the_model_it_was_written_from(tmp_path, family):
    """Independent of transformers' GGUF loader: the q/k permutation round trip is exact; Qwen3's
    q/k norms and head width, SmolLM3's layer without rotary (llama.cpp's rule) read right."""
    model = random_model(family)
    config, params = load_gguf(write_gguf(tmp_path / "model.gguf", model))
    assert config.family == family
    np.testing.assert_allclose(forward(params, TOKENS, config), logits_of(model), atol=1e-5)


@pytest.mark.parametrize(
    "rope",
    [
        dict(rope_type="linear", rope_theta=1_000_000.0, factor=8.0),
        dict(
            rope_type="yarn",
            rope_theta=10_000.0,
            factor=4.0,
            original_max_position_embeddings=8,
            beta_fast=16.0,
        ),
        LLAMA3_2_ROPE | dict(original_max_position_embeddings=8),
    ],
    ids=lambda rope: rope["rope_type"],
)
def test_a_scaled_rotation_reads_as_the_model_it_was_written_from(tmp_path, rope):
    """llama.cpp's rope.scaling keys, or its divisors of the frequencies (rope_freqs.weight, a
    "llama3" scaling), read as transformers' rope_parameters (the prompt reaches past the 8-token
    pretraining context)."""
    model = random_model("llama", rope=rope)
    config, params = load_gguf(write_gguf(tmp_path / "model.gguf", model))
    kinds = {"llama3": "factors"}  # llama.cpp keeps the divisors, not the settings
    assert config.rope_scaling.kind == kinds.get(rope["rope_type"], rope["rope_type"])
    np.testing.assert_allclose(forward(params, TOKENS, config), logits_of(model), atol=1e-5)


def test_bfloat16_loading(tmp_path):
    model = random_model("llama")
    path = write_gguf(tmp_path / "model.gguf", model)
    config, params = load_gguf(path, dtype="bfloat16")
    assert {leaf.dtype.name for leaf in jax.tree.leaves(params)} == {"bfloat16"}
    # bf16 weights and activations: within bf16 rounding of the f32 logits (~0.5 here).
    np.testing.assert_allclose(forward(params, TOKENS, config), logits_of(model), atol=3e-2)


# An edited metadata value's GGUF type, by its Python type.
_VALUE_TYPES = {
    str: gguf.GGUFValueType.STRING,
    float: gguf.GGUFValueType.FLOAT32,
    int: gguf.GGUFValueType.UINT32,
    list: gguf.GGUFValueType.ARRAY,  # of its items' types
}


def rewrite(path, tmp_path, edit):
    """A copy of the GGUF file with edit(metadata dict, tensors dict) applied."""
    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(tmp_path / "edited.gguf", arch)
    fields = {
        name: field
        for name, field in reader.fields.items()
        if not name.startswith("GGUF.") and name != "general.architecture"
    }
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    edit(fields, tensors)
    for name, field in fields.items():
        value = field.contents() if hasattr(field, "contents") else field
        kind = field.types[0] if hasattr(field, "types") else _VALUE_TYPES[type(field)]
        writer.add_key_value(name, value, kind)
    for name, tensor in tensors.items():
        if isinstance(tensor, np.ndarray):  # an edited tensor: its type from its dtype
            writer.add_tensor(name, tensor)
        else:
            writer.add_tensor(name, tensor.data, tensor.data.shape, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tmp_path / "edited.gguf"


@pytest.fixture
def small_file(tmp_path):
    return write_gguf(tmp_path / "model.gguf", random_model("llama"))


def test_truncated_file(small_file):
    data = small_file.read_bytes()
    small_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.gguf is not a readable GGUF file"):
        load_gguf(small_file)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(200))
    with pytest.raises(CheckpointError, match=r"model\.gguf is not a readable GGUF file"):
        load_gguf(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"GGUF file .*absent\.gguf does not exist"):
        load_gguf(tmp_path / "absent.gguf")


@pytest.mark.parametrize(("weights", "pattern"), [(None, "quantized"), ("float32", "float32")])
def test_a_file_that_cannot_fit_is_refused_before_its_weights_are_read(
    small_file, monkeypatch, weights, pattern
):
    monkeypatch.setattr(checks, "available_bytes", lambda: 1024)
    read = []
    monkeypatch.setattr(load, "load_gguf", lambda *args, **kwargs: read.append(args))
    with pytest.raises(
        OutOfMemoryError,
        match=rf"model model\.gguf \({pattern} weights, a 0\.0 GiB file\) needs about "
        r"0\.0 GiB, more than the 0\.0 GiB this device has",
    ):
        load.load_model(small_file, weights)
    assert read == []


def test_unsupported_architecture(small_file, tmp_path):
    def edit(fields, tensors):
        fields["general.architecture"] = "gemma2"

    with pytest.raises(
        CheckpointError,
        match=r"general.architecture must be one of \['llama', 'qwen2', 'gemma3', 'qwen3', 'smollm3'\], "
        r"got 'gemma2'",
    ):
        load_gguf(rewrite(small_file, tmp_path, edit))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"rope.scaling.type": "longrope"},
            r"llama\.rope\.scaling\.type must be one of \['none', 'linear', 'yarn'\], "
            r"got 'longrope'",
        ),
        (
            {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0},
            r"GGUF metadata is missing llama\.rope\.scaling\.original_context_length",
        ),
        (
            {
                "rope.scaling.type": "yarn",
                "rope.scaling.factor": 4.0,
                "rope.scaling.original_context_length": 32,
                "rope.scaling.yarn_attn_factor": 1.5,
            },
            r"llama\.rope\.scaling\.yarn_attn_factor is not supported",
        ),
    ],
)
def test_a_rope_scaling_scanlab_does_not_compute_is_refused(
    small_file, tmp_path, settings, message
):
    def edit(fields, tensors):
        fields.update({f"llama.{key}": value for key, value in settings.items()})

    with pytest.raises(CheckpointError, match=message):
        load_gguf(rewrite(small_file, tmp_path, edit))


@pytest.mark.parametrize(
    ("settings", "factors", "message"),
    [
        (
            {"rope.scaling.type": "linear", "rope.scaling.factor": 4.0},
            np.ones(8, np.float32),
            r"rope_freqs\.weight and llama\.rope\.scaling\.type 'linear' both scale the rotary "
            r"frequencies: one of them must go",
        ),
        (
            {},
            np.ones(6, np.float32),
            r"rope_scaling.frequency_factors must hold one factor per rotary pair \(8 for head_dim 16\), got 6",
        ),
        (
            {},
            np.zeros(8, np.float32),
            r"frequency_factors must be positive and given for 'factors' rope scaling alone",
        ),
    ],
    ids=["with-scaling-keys", "wrong-length", "zero"],
)
def test_rope_factors_that_do_not_fit_are_refused(small_file, tmp_path, settings, factors, message):
    def edit(fields, tensors):
        fields.update({f"llama.{key}": value for key, value in settings.items()})
        tensors["rope_freqs.weight"] = factors

    with pytest.raises(CheckpointError, match=message):
        load_gguf(rewrite(small_file, tmp_path, edit))


def test_missing_tensor(small_file, tmp_path):
    def edit(fields, tensors):
        del tensors["blk.1.ffn_up.weight"]

    with pytest.raises(
        CheckpointError, match=r"1 tensor\(s\) of a llama model are missing: blk\.1\.ffn_up\.weight"
    ):
        load_gguf(rewrite(small_file, tmp_path, edit))


def test_type_the_gguf_package_cannot_dequantize(small_file, tmp_path):
    def edit(fields, tensors):
        tensors["blk.0.attn_norm.weight"] = np.ones(64, np.int8)

    path = rewrite(small_file, tmp_path, edit)
    with pytest.raises(
        CheckpointError,
        match=r"tensor blk\.0\.attn_norm\.weight has type I8, which the gguf package",
    ):
        load_gguf(path)


def test_nan_weights(small_file, tmp_path):
    def edit(fields, tensors):
        weight = np.array(tensors["output_norm.weight"].data)
        weight[3] = np.nan
        tensors["output_norm.weight"] = weight

    with pytest.raises(CheckpointError, match=r"tensor output_norm\.weight holds NaN or Inf"):
        load_gguf(rewrite(small_file, tmp_path, edit))


def test_the_fast_reader_reads_what_gguf_s_reader_reads(small_file, tmp_path):
    """The same fields, cut into the same parts (arrays of strings and of numbers, as a
    vocabulary and its scores and types are, walked by the fast reader's own loop), and the
    same tensors."""
    from scanlab.decoder.formats.gguf_file import open_gguf

    def edit(fields, tensors):
        fields["tokenizer.ggml.tokens"] = ["<s>", "a", "", "日本語 ▁b", "</s>"]
        fields["tokenizer.ggml.scores"] = [0.0, -1.5, -2.0, 3.25, 1e-3]
        fields["tokenizer.ggml.token_type"] = [3, 1, 1, 4, 3]

    path = rewrite(small_file, tmp_path, edit)
    ours, theirs = open_gguf(path), gguf.GGUFReader(path)
    assert list(ours.fields) == list(theirs.fields)
    for name, field in theirs.fields.items():
        mine = ours.fields[name]
        assert mine.contents() == field.contents(), name
        assert (mine.offset, mine.data, mine.types) == (field.offset, field.data, field.types)
        for part, reference in zip(mine.parts, field.parts, strict=True):
            assert (part.dtype, part.shape) == (reference.dtype, reference.shape), name
            np.testing.assert_array_equal(part, reference)
    assert ours.fields["tokenizer.ggml.tokens"].contents()[3] == "日本語 ▁b"
    for mine, reference in zip(ours.tensors, theirs.tensors, strict=True):
        assert (mine.name, mine.tensor_type, mine.shape.tolist()) == (
            reference.name,
            reference.tensor_type,
            reference.shape.tolist(),
        )
        np.testing.assert_array_equal(mine.data, reference.data)


def test_a_path_that_is_not_one_and_an_integer_dtype_are_named(small_file):
    with pytest.raises(TypeError, match=r"path must be a str or os.PathLike, got NoneType"):
        load_gguf(None)
    with pytest.raises(TypeError, match=r"dtype must be a floating dtype, got int8"):
        load_gguf(small_file, dtype=np.int8)  # would truncate every weight


@pytest.mark.parametrize(
    ("tie", "qtype"),
    [(False, q) for q in (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)] + [(True, Q.Q4_1)],
    ids=lambda value: getattr(value, "name", str(value)),
)
def test_blocks_kept_dequantize_to_the_dense_load_exactly(tmp_path, tie, qtype):
    from scanlab.decoder import quant, weights

    path = write_gguf(tmp_path / "model.gguf", random_model("llama", tie), qtype)
    config, dense = load_gguf(path)
    _, kept = load_gguf(path, quantized=True)
    expected = jax.tree_util.tree_flatten_with_path(dense)[0]
    got = dict(jax.tree_util.tree_flatten_with_path(kept, is_leaf=weights.is_form)[0])
    for key, array in expected:
        leaf = got[key]
        if key[-1].name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"):
            assert isinstance(leaf, quant.QuantArray), key
        np.testing.assert_array_equal(
            weights.as_dense(leaf) if quant.is_quantized(leaf) else leaf, array
        )
    # head_dim 16: out_proj's rows hold blocks of 32 that span two heads; it loads dense.
    assert not quant.is_quantized(kept.blocks.attention.out_proj)
    assert isinstance(kept.embed if tie else kept.lm_head, quant.VocabChunks)
    np.testing.assert_allclose(
        forward(kept, TOKENS, config), forward(dense, TOKENS, config), atol=1e-5, rtol=0
    )


@pytest.mark.skipif(not qmatvec.available(), reason=f"no kernel here: {qmatvec.describe()}")
@pytest.mark.parametrize(
    ("family", "tie", "qtype"),
    [("llama", False, q) for q in (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)]
    + [("llama", True, Q.Q4_0), ("qwen2", False, Q.Q4_1)],
    ids=lambda value: getattr(value, "name", str(value)),
)
def test_the_kernel_s_layout_is_read_from_the_file_s_blocks(tmp_path, family, tie, qtype):
    """Straight from the blocks (q/k rows de-interleaved, heads regrouped): what packing the kept
    blocks gives, exactly; 4-bit formats at the file's size, Q4_0 without a min per block."""
    from scanlab.decoder import quant, weights
    from scanlab.decoder.qmatvec import PackedArray

    path = write_gguf(tmp_path / "model.gguf", random_model(family, tie), qtype)
    config, kept = load_gguf(path, quantized=True)
    _, packed = load_gguf(path, quantized=True, kernel=True)
    expected = dict(jax.tree_util.tree_flatten_with_path(kept, is_leaf=weights.is_form)[0])
    got = jax.tree_util.tree_flatten_with_path(packed, is_leaf=weights.is_form)[0]
    for key, leaf in got:
        np.testing.assert_array_equal(weights.as_dense(leaf), weights.as_dense(expected[key]))
    attention = packed.blocks.attention
    for leaf in (attention.q_proj, attention.k_proj, packed.blocks.down_proj):
        assert isinstance(leaf, PackedArray)
        assert leaf.nibbles == (qtype in (Q.Q4_0, Q.Q4_1))
        assert (leaf.mins is None) == (qtype in (Q.Q8_0, Q.Q4_0, Q.Q5_0))
    assert isinstance(packed.embed, PackedArray) == tie
    if not tie:
        assert isinstance(packed.lm_head, PackedArray)
        assert isinstance(packed.embed, quant.QuantArray)  # read as rows, never as a head
    np.testing.assert_allclose(
        forward(packed, TOKENS, config), forward(kept, TOKENS, config), rtol=0, atol=1e-5
    )


@pytest.mark.skipif(not qmatvec.available(), reason=f"no kernel here: {qmatvec.describe()}")
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q5_1], ids=lambda value: value.name)
def test_a_tensor_read_in_chunks_of_rows_packs_as_one_read_whole(tmp_path, monkeypatch, qtype):
    """Tensors whose blocks keep their order (the tied embedding) are read a chunk of rows at a
    time: one row per read gives the same arrays as the whole tensor in one."""
    path = write_gguf(tmp_path / "model.gguf", random_model("llama", True), qtype)
    _, whole = load_gguf(path, quantized=True, kernel=True)
    monkeypatch.setattr(gguf_packed, "_CHUNK_BYTES", 1)
    _, by_rows = load_gguf(path, quantized=True, kernel=True)
    chex.assert_trees_all_equal(by_rows, whole)


@pytest.mark.parametrize(("family", "tie"), [("llama", False), ("llama", True), ("qwen2", False)])
def test_a_saved_file_loads_back_exactly_and_in_transformers(tmp_path, family, tie):
    """save_gguf is load_gguf's inverse (F32: exact, the q/k pairs re-interleaved), with the
    source file's metadata; transformers reads the file it writes to the same logits."""
    source = write_gguf(tmp_path / "source.gguf", random_model(family, tie))
    config, params = load_gguf(source)
    changed = jax.tree.map(lambda leaf: leaf * 1.5, params)  # not the source's numbers
    saved = save_gguf(
        tmp_path / "out" / "saved.gguf", config, changed, like=source, tensor_type="F32"
    )
    again_config, again = load_gguf(saved)
    assert again_config == config
    chex.assert_trees_all_equal(again, changed)
    reference = AutoModelForCausalLM.from_pretrained(
        saved.parent, gguf_file=saved.name, dtype=torch.float32
    )
    np.testing.assert_allclose(forward(changed, TOKENS, config), logits_of(reference), atol=1e-4)
    with pytest.raises(PathExistsError, match="exists; pass overwrite=True"):
        save_gguf(saved, config, changed, like=source)
    assert [p.name for p in saved.parent.iterdir()] == ["saved.gguf"]  # no staging left


def test_a_saved_llama3_file_keeps_its_rope_factors(tmp_path):
    """Llama 3's rotary scaling, held as rope_freqs.weight, is written back: the saved file
    computes the source model's logits past its 8-token pretraining context. (transformers'
    GGUF reader leaves rope_freqs.weight out, so the model, not its reading of the file, is the
    reference.)"""
    model = random_model("llama", rope=LLAMA3_2_ROPE | dict(original_max_position_embeddings=8))
    source = write_gguf(tmp_path / "source.gguf", model)
    config, params = load_gguf(source)
    saved = save_gguf(tmp_path / "saved.gguf", config, params, like=source, tensor_type="F32")
    again_config, again = load_gguf(saved)
    assert again_config == config and config.rope_scaling.kind == "factors"
    np.testing.assert_allclose(forward(again, TOKENS, again_config), logits_of(model), atol=1e-5)


def test_a_saved_q8_0_file_holds_the_weights_to_q8_0_rounding(tmp_path):
    source = write_gguf(tmp_path / "source.gguf", random_model("llama"))
    config, params = load_gguf(source)
    saved = save_gguf(tmp_path / "q8.gguf", config, params, like=source)
    kept = load_gguf(saved, quantized=True)[1]
    assert type(kept.blocks.gate_proj).__name__ == "QuantArray"
    np.testing.assert_allclose(
        load_gguf(saved)[1].blocks.gate_proj, params.blocks.gate_proj, atol=0.01
    )


def test_saving_is_refused_for_another_model_or_type(tmp_path):
    source = write_gguf(tmp_path / "source.gguf", random_model("llama"))
    other = write_gguf(tmp_path / "other.gguf", random_model("qwen2"))
    config, params = load_gguf(source)
    with pytest.raises(
        CheckpointError, match=r"other\.gguf holds another model than these params'"
    ):
        save_gguf(tmp_path / "x.gguf", config, params, like=other)
    with pytest.raises(
        ArgumentError, match=r"tensor_type must be one of \['F32', 'F16', 'Q8_0'\], got 'Q4_K'"
    ):
        save_gguf(tmp_path / "x.gguf", config, params, like=source, tensor_type="Q4_K")
    assert not (tmp_path / "x.gguf").exists()
