"""Checkpoints against transformers' own LlamaForCausalLM: logits, greedy tokens, round trips."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from tests.decoder.oracle import hf_greedy, hf_logits

from scanlab.decoder import (
    CheckpointError,
    forward,
    generate,
    init_params,
    load_checkpoint,
    preset,
    save_checkpoint,
)

# Independent float32 implementations of the same math (torch vs XLA): rounding differs, not math.
LOGITS_ATOL = 1e-4

HF_CONFIGS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "mqa-tied": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),
    "gqa-headdim": dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, rope_theta=500_000.0
    ),
}


# A model small enough to build in milliseconds, large enough for GQA and two layers of state.
TINY_HF = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=56,
    num_hidden_layers=3,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
)


def hf_model(**overrides):
    config = transformers.LlamaConfig(**TINY_HF, **overrides)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def assert_same_logits(model, params, config, tokens):
    np.testing.assert_allclose(
        forward(params, jnp.asarray(tokens), config),
        hf_logits(model, tokens),
        atol=LOGITS_ATOL,
        rtol=0,
    )


TOKENS = np.random.default_rng(0).integers(0, 96, (2, 11))


@pytest.mark.parametrize("name", HF_CONFIGS)
def test_logits_match_transformers(tmp_path, name):
    model = hf_model(**HF_CONFIGS[name])
    model.save_pretrained(tmp_path)
    config, params = load_checkpoint(tmp_path)
    assert config.n_kv_heads == model.config.num_key_value_heads
    assert_same_logits(model, params, config, TOKENS)


def test_sharded_checkpoint_loads(tmp_path):
    model = hf_model(**HF_CONFIGS["gqa"])
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    config, params = load_checkpoint(tmp_path)
    assert_same_logits(model, params, config, TOKENS)


def test_older_config_form_with_top_level_rope_theta(tmp_path):
    model = hf_model(num_attention_heads=4, num_key_value_heads=2, rope_theta=1234.0)
    model.save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    hf.pop("rope_parameters", None)
    hf["rope_theta"], hf["rope_scaling"] = 1234.0, None
    (tmp_path / "config.json").write_text(json.dumps(hf))
    config, params = load_checkpoint(tmp_path)
    assert config.rope_theta == 1234.0
    assert_same_logits(model, params, config, TOKENS)


@pytest.mark.parametrize("name", ["gqa", "mqa-tied"])
def test_round_trip_through_transformers(tmp_path, name):
    config = preset("tiny").replace(
        n_kv_heads={"gqa": 2, "mqa-tied": 1}[name], tie_embeddings=name == "mqa-tied"
    )
    params = init_params(config, jax.random.PRNGKey(3))
    save_checkpoint(tmp_path / "ckpt", config, params)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    tokens = TOKENS % config.vocab_size
    assert_same_logits(model, params, config, tokens)
    config_again, params_again = load_checkpoint(tmp_path / "ckpt")
    assert config_again == config
    jax.tree.map(np.testing.assert_array_equal, params_again, params)


def test_greedy_generation_matches_transformers(tmp_path):
    model = hf_model(**HF_CONFIGS["gqa"])
    model.save_pretrained(tmp_path)
    config, params = load_checkpoint(tmp_path)
    prompt = TOKENS[:, :6]
    expected = hf_greedy(model, prompt, 12)
    np.testing.assert_array_equal(generate(params, prompt, config, 12).tokens, expected)


def test_left_padded_batch_matches_transformers(tmp_path):
    model = hf_model(**HF_CONFIGS["gqa"])
    model.save_pretrained(tmp_path)
    config, params = load_checkpoint(tmp_path)
    prompt = TOKENS[:, :6].copy()
    mask = np.ones(prompt.shape, np.int64)
    mask[0, :2] = 0  # row 0 is a 4-token prompt, left-padded
    prompt[0, :2] = 0
    expected = hf_greedy(model, prompt, 10, mask)
    ours = generate(params, prompt, config, 10, attn_mask=mask.astype(bool))
    np.testing.assert_array_equal(ours.tokens, expected)


def test_other_architecture_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    with pytest.raises(
        CheckpointError,
        match=r"config.json must describe one of the model types .* got model_type='gpt2'",
    ):
        load_checkpoint(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    model = hf_model(**HF_CONFIGS["gqa"])
    state = {
        k: v for k, v in model.state_dict().items() if k != "model.layers.1.mlp.up_proj.weight"
    }
    model.save_pretrained(tmp_path, state_dict=state)
    with pytest.raises(
        CheckpointError, match=r"tensor model.layers.1.mlp.up_proj.weight is missing"
    ):
        load_checkpoint(tmp_path)


def test_shape_mismatch_is_named(tmp_path):
    hf_model(**HF_CONFIGS["gqa"]).save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    hf["intermediate_size"] = 64
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(
        CheckpointError,
        match=r"tensor model.layers.0.mlp.gate_proj.weight has shape \(56, 32\), expected \(64, 32\)",
    ):
        load_checkpoint(tmp_path)


def test_no_weights_and_no_config(tmp_path):
    with pytest.raises(CheckpointError, match=r"must contain config\.json"):
        load_checkpoint(tmp_path)
    config = hf_model(num_attention_heads=4).config  # head_dim 8 (the default 32 heads: 1)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    with pytest.raises(
        CheckpointError, match=r"must contain model\.safetensors or model\.safetensors\.index\.json"
    ):
        load_checkpoint(tmp_path)


def test_save_refuses_to_overwrite_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    config = preset("tiny")
    params = init_params(config, jax.random.PRNGKey(0))
    target = tmp_path / "ckpt"
    save_checkpoint(target, config, params)
    with pytest.raises(FileExistsError, match="exists and is not empty; pass overwrite=True"):
        save_checkpoint(target, config, params)

    import scanlab.decoder.formats.hf as checkpoint

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(
            target, config, params._replace(final_norm=params.final_norm * 2), overwrite=True
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging directory left
    _, reloaded = load_checkpoint(target)  # the earlier checkpoint is intact
    np.testing.assert_array_equal(reloaded.final_norm, params.final_norm)


# --- Qwen2: the Llama block plus biases on q, k and v ---------------------------------------------

QWEN2_CONFIGS = {
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "gqa-tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}


def qwen2_model(**overrides):
    config = transformers.Qwen2Config(**TINY_HF, use_sliding_window=False, **overrides)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # transformers starts biases at zero: give them values to test
        for name, tensor in model.named_parameters():
            if name.endswith("_proj.bias"):
                tensor.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("name", QWEN2_CONFIGS)
def test_qwen2_logits_and_greedy_tokens_match_transformers(tmp_path, name):
    model = qwen2_model(**QWEN2_CONFIGS[name])
    assert float(model.model.layers[0].self_attn.q_proj.bias.detach().abs().sum()) > 0
    model.save_pretrained(tmp_path)
    config, params = load_checkpoint(tmp_path)
    assert config.family == "qwen2" and config.tie_embeddings == (name == "gqa-tied")
    assert_same_logits(model, params, config, TOKENS)
    prompt = TOKENS[:, :6]
    np.testing.assert_array_equal(
        generate(params, prompt, config, 10).tokens, hf_greedy(model, prompt, 10)
    )


def test_qwen2_round_trip_through_transformers(tmp_path):
    config = preset("tiny").replace(family="qwen2", n_kv_heads=2)
    params = init_params(config, jax.random.PRNGKey(3))
    biases = params.blocks.attention._replace(
        q_bias=jax.random.normal(jax.random.PRNGKey(4), params.blocks.attention.q_bias.shape),
        v_bias=jax.random.normal(jax.random.PRNGKey(5), params.blocks.attention.v_bias.shape),
    )
    params = params._replace(blocks=params.blocks._replace(attention=biases))
    save_checkpoint(tmp_path / "ckpt", config, params)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["model_type"] == "qwen2"
    model = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert_same_logits(model, params, config, TOKENS % config.vocab_size)
    config_again, params_again = load_checkpoint(tmp_path / "ckpt")
    assert config_again == config
    jax.tree.map(np.testing.assert_array_equal, params_again, params)


def test_sliding_window_and_config_gaps_are_named(tmp_path):
    qwen2_model(**QWEN2_CONFIGS["gqa"]).save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(hf | {"use_sliding_window": True}))
    with pytest.raises(
        CheckpointError, match="use_sliding_window must be false for qwen2, got true"
    ):
        load_checkpoint(tmp_path)
    del hf["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match=r"config\.json is missing hidden_size"):
        load_checkpoint(tmp_path)


# --- damaged files: one CheckpointError naming the file, never a SafetensorError or KeyError ------


def damaged(tmp_path, damage):
    hf_model(**HF_CONFIGS["gqa"]).save_pretrained(tmp_path)
    damage(tmp_path)
    return tmp_path


def _truncate(path):
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


def _nan_bytes(path):
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-64:] = np.full(16, np.nan, np.float32).tobytes()  # the last tensor's tail
    (path / "model.safetensors").write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (
            _truncate,
            r"model.safetensors(: tensor .* cannot be read| is not a readable safetensors file)",
        ),
        (
            lambda p: (p / "model.safetensors").write_bytes(b""),
            r"model.safetensors is not a readable safetensors file",
        ),
        (
            lambda p: (p / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096)),
            r"model.safetensors is not a readable safetensors file",
        ),
        (_nan_bytes, r"model.safetensors: tensor .* holds NaN or Inf values"),
        (lambda p: (p / "config.json").write_text("{not json"), r"config.json is not valid JSON"),
    ],
    ids=["truncated", "empty", "random", "nan-data", "bad-json"],
)
def test_damaged_files_are_named(tmp_path, damage, match):
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(damaged(tmp_path, damage))


def test_a_sharded_checkpoint_missing_a_shard_or_its_map_is_named(tmp_path):
    hf_model(**HF_CONFIGS["gqa"]).save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / shard).unlink()
    with pytest.raises(CheckpointError, match=rf"{shard} is listed in the checkpoint but missing"):
        load_checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="must map tensor names under 'weight_map'"):
        load_checkpoint(tmp_path)
