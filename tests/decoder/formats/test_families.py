"""The families people run, each from a transformers directory of random weights with its real
settings (rotary scaling, q/k norms, head width, layers without rotary), against transformers:
logits, greedy tokens, a left-padded batch, and the directory scanlab writes back."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from tests.decoder.oracle import hf_greedy, hf_logits
from tests.decoder.test_rope import LLAMA3_2_ROPE

from scanlab.decoder import forward, forward_loop, generate, load_checkpoint, save_checkpoint
from scanlab.decoder.formats.base import CheckpointError
from scanlab.decoder.rope import RopeScaling

# Independent float32 implementations of the same math (torch vs XLA): rounding differs, not math.
LOGITS_ATOL = 1e-4

_TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=56,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
)
_YARN = dict(rope_type="yarn", rope_theta=1_000_000.0, factor=4.0)

FAMILIES = {
    "llama3.2": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(
            num_hidden_layers=2,
            head_dim=16,
            rope_parameters=LLAMA3_2_ROPE,
            tie_word_embeddings=True,
        ),
    ),
    # Llama 3.2's rotary with a pretraining context of 24 tokens: the test's 40 reach past it.
    "llama3-past-its-context": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(
            num_hidden_layers=2,
            head_dim=16,
            rope_parameters=LLAMA3_2_ROPE | dict(original_max_position_embeddings=24),
        ),
    ),
    "llama-linear": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(
            num_hidden_layers=2,
            rope_parameters=dict(rope_type="linear", rope_theta=10_000.0, factor=4.0),
        ),
    ),
    "qwen2.5": (
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        dict(num_hidden_layers=2, use_sliding_window=False),
    ),
    "qwen2.5-yarn": (
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        dict(
            num_hidden_layers=2,
            use_sliding_window=False,
            rope_parameters=_YARN | dict(original_max_position_embeddings=24),
        ),
    ),
    # Qwen3: q/k norms, no biases, a head width (24) that is not D / heads (8).
    "qwen3": (
        transformers.Qwen3Config,
        transformers.Qwen3ForCausalLM,
        dict(
            num_hidden_layers=2,
            head_dim=24,
            rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0),
        ),
    ),
    "qwen3-tied-yarn": (
        transformers.Qwen3Config,
        transformers.Qwen3ForCausalLM,
        dict(
            num_hidden_layers=2,
            head_dim=24,
            tie_word_embeddings=True,
            rope_parameters=_YARN | dict(original_max_position_embeddings=24),
        ),
    ),
    # Gemma 3 4B's rotary: global layers' base 1e6 scaled linearly by 8, local ones 1e4 unscaled.
    "gemma3-4b-rope": (
        transformers.Gemma3TextConfig,
        transformers.Gemma3ForCausalLM,
        dict(
            num_hidden_layers=7,
            head_dim=16,
            sliding_window=6,
            query_pre_attn_scalar=16,
            attn_implementation="eager",
            rope_parameters={
                "full_attention": dict(rope_type="linear", rope_theta=1_000_000.0, factor=8.0),
                "sliding_attention": dict(rope_type="default", rope_theta=10_000.0),
            },
        ),
    ),
    # SmolLM3: every fourth layer without rotary (layer 3 of 5), tied embeddings.
    "smollm3": (
        transformers.SmolLM3Config,
        transformers.SmolLM3ForCausalLM,
        dict(
            num_hidden_layers=5,
            pad_token_id=0,  # its default, 128004, lies outside the tiny vocabulary
            rope_parameters=dict(rope_type="default", rope_theta=2_000_000.0),
        ),
    ),
    # Mistral 7B v0.2+: Llama's block under its own name, no sliding window.
    "mistral": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        dict(num_hidden_layers=2, sliding_window=None, head_dim=16),
    ),
}

TOKENS = np.random.default_rng(0).integers(0, 96, (2, 40))


def hf_model(name: str, **overrides):
    """The family's tiny random model (`overrides` on its config), its norms away from init."""
    config_type, model_type, settings = FAMILIES[name]
    torch.manual_seed(0)
    model = model_type(config_type(**(_TINY | settings | overrides))).eval()
    with torch.no_grad():  # norms start at 1 (or 0 for Gemma's 1 + w): make them count
        for parameter_name, parameter in model.named_parameters():
            if "norm" in parameter_name:
                parameter.add_(0.3 * torch.randn_like(parameter))
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    model = hf_model(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    return request.param, model, directory, *load_checkpoint(directory)


def test_logits_match_transformers_and_the_loop_twin(family):
    _, model, _, config, params = family
    expected = hf_logits(model, TOKENS)
    np.testing.assert_allclose(
        forward(params, jnp.asarray(TOKENS), config), expected, atol=LOGITS_ATOL, rtol=0
    )
    np.testing.assert_allclose(
        forward_loop(params, jnp.asarray(TOKENS), config), expected, atol=LOGITS_ATOL, rtol=0
    )


def test_the_config_holds_the_family_s_features(family):
    name, model, _, config, _ = family
    hf = model.config
    if name.startswith("llama3"):
        assert config.rope_scaling.kind == "llama3"
        assert (
            config.rope_scaling.original_max_seq_len
            == hf.rope_parameters["original_max_position_embeddings"]
        )
    if name.startswith("qwen3"):
        assert (
            config.family == "qwen3" and config.head_dim == 24 != config.d_model // config.n_heads
        )
    if name == "gemma3-4b-rope":
        assert (
            config.rope_scaling.kind,
            config.rope_scaling.factor,
            config.local_rope_scaling,
        ) == ("linear", 8.0, None)
    if name == "smollm3":
        assert config.no_rope_layers == (3,) and hf.no_rope_layers == [1, 1, 1, 0, 1]
    if name == "mistral":
        assert config.family == "mistral" and config.sliding_window is None


def test_greedy_tokens_match_transformers_with_a_left_padded_row(family):
    _, model, _, config, params = family
    prompt = TOKENS[:, :20]
    mask = np.ones(prompt.shape, np.int64)
    mask[0, :5] = 0  # row 0 is a 15-token prompt, left-padded
    expected = hf_greedy(model, prompt, 12, mask)
    ours = generate(params, prompt, config, 12, attn_mask=mask.astype(bool))
    np.testing.assert_array_equal(ours.tokens[:, prompt.shape[1] :], expected[:, prompt.shape[1] :])


def test_the_directory_scanlab_writes_is_read_back_by_transformers(family, tmp_path):
    _, model, _, config, params = family
    save_checkpoint(tmp_path / "ckpt", config, params)
    again = type(model).from_pretrained(tmp_path / "ckpt", attn_implementation="eager").eval()
    np.testing.assert_allclose(
        hf_logits(again, TOKENS), hf_logits(model, TOKENS), atol=LOGITS_ATOL, rtol=0
    )
    config_again, _ = load_checkpoint(tmp_path / "ckpt")
    assert config_again == config


@pytest.mark.parametrize(
    ("rope", "message"),
    [
        (
            {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
            "rope_type must be one of ['default', 'linear', 'llama3', 'yarn'], got 'dynamic'",
        ),
        (
            {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0]},
            "rope_type must be one of ['default', 'linear', 'llama3', 'yarn'], got 'longrope'",
        ),
        (
            {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 40.0,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
            },
            "rope_parameters.mscale is not supported, got 1.0",
        ),
        (
            {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            "partial_rotary_factor must be 1.0 (every pair rotated), got 0.5",
        ),
        (
            {"rope_type": "linear", "rope_theta": 10000.0},
            "rope_parameters of type 'linear' must state a factor",
        ),
        (
            {"rope_type": "linear", "rope_theta": 10000.0, "factor": -2.0},
            "config.json: rope scaling factor must be > 0, got -2.0",
        ),
    ],
)
def test_a_rotary_setting_scanlab_does_not_compute_is_refused_by_name(tmp_path, rope, message):
    hf_model("llama-linear").save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    hf["rope_parameters"] = rope
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tmp_path)
    assert str(error.value) == message


def test_mistral_s_sliding_window_is_refused_by_name(tmp_path):
    hf_model("mistral").save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    hf["sliding_window"] = 4096  # Mistral 7B v0.1's
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tmp_path)
    assert str(error.value) == (
        "sliding_window must be null for mistral (scanlab does not implement it), got 4096"
    )


def test_llama3_rope_read_from_a_gguf_as_divisors_is_not_written_as_transformers_settings(
    tmp_path,
):
    """A GGUF holds a "llama3" scaling as the divisors of the frequencies, not the settings that
    made them: a transformers directory cannot state it, and saying so beats writing another
    rotation."""
    config, params = load_checkpoint_of("llama3.2", tmp_path)
    factors = RopeScaling(kind="factors", factor=2.0, frequency_factors=(1.0,) * 7 + (2.0,))
    with pytest.raises(
        CheckpointError, match=r"has no transformers rope_parameters: save it as a \.gguf"
    ):
        save_checkpoint(tmp_path / "out", dataclasses.replace(config, rope_scaling=factors), params)
    assert not (tmp_path / "out").exists()


def load_checkpoint_of(name: str, tmp_path):
    hf_model(name).save_pretrained(tmp_path / name)
    return load_checkpoint(tmp_path / name)
