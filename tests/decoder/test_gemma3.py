"""Gemma 3 against transformers' own Gemma3ForCausalLM on random models: sliding-window and full
layers in one scan, windows crossed in the prompt and while decoding, ring caches against
full-length ones, the Python-loop twin and the NNX stack."""

import json

import chex
import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from tests.decoder.oracle import hf_greedy, hf_logits

from scanlab.decoder import (
    Chat,
    CheckpointError,
    DecoderConfig,
    Model,
    Tokenizer,
    forward,
    forward_loop,
    generate,
    init_cache,
    init_params,
    load_checkpoint,
    param_count,
    save_checkpoint,
    stream,
)
from scanlab.decoder.cache import cache_bytes
from scanlab.decoder.formats.gguf_file import check_layer_pattern
from scanlab.nnx.stack import NNXDecoder

# Independent float32 implementations of the same math (torch vs XLA): rounding differs, not math.
LOGITS_ATOL = 1e-4
WINDOW = 4

SHAPES = {
    # 8 layers: a pattern (5 sliding, 1 full) and 2 more sliding ones (the remainder); MQA, as
    # the 270M model. Whole patterns only: the real 270M file (18 = 3 x 6).
    "mqa-8": dict(num_hidden_layers=8, num_key_value_heads=1),
    # 3 layers: sliding only (no full stack at all); GQA; another query scale.
    "gqa-3-scaled": dict(num_hidden_layers=3, num_key_value_heads=2, query_pre_attn_scalar=24),
}


def hf_model(**overrides):
    settings = {
        **dict(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=96,
            num_attention_heads=4,
            head_dim=16,
            max_position_embeddings=64,
            sliding_window=WINDOW,
            query_pre_attn_scalar=16,
            rms_norm_eps=1e-6,
            attn_implementation="eager",
        ),
        **overrides,
    }
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**settings)).eval()
    with torch.no_grad():  # norms start at 0 (a scale of 1): make them count
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(0.5 * torch.randn_like(parameter))
    return model


@pytest.fixture(scope="module", params=list(SHAPES))
def models(request, tmp_path_factory):
    model = hf_model(**SHAPES[request.param])
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    config, params = load_checkpoint(directory)
    return model, config, params


@pytest.fixture(scope="module")
def one_model(tmp_path_factory):
    """One of the shapes (8 layers: the remainder, MQA), for what the layer kinds do not change."""
    model = hf_model(**SHAPES["mqa-8"])
    directory = tmp_path_factory.mktemp("one")
    model.save_pretrained(directory)
    return load_checkpoint(directory)


TOKENS = np.random.default_rng(0).integers(0, 128, (2, 13))


def small_config(**changes) -> DecoderConfig:
    """A Gemma 3 config made without transformers: 6 layers (one pattern), window 4."""
    settings = dict(
        vocab_size=64,
        n_layers=6,
        d_model=32,
        n_heads=2,
        n_kv_heads=1,
        head_dim=16,
        mlp_dim=48,
        max_seq_len=64,
        family="gemma3",
        sliding_window=4,
    )
    return DecoderConfig(**{**settings, **changes})


def test_config_follows_transformers(models):
    model, config, _ = models
    assert config.family == "gemma3" and config.sliding_window == WINDOW
    assert list(config.layer_types) == model.config.layer_types
    assert param_count(config) == sum(p.numel() for p in model.parameters())


def test_logits_equal_transformers_across_the_window(models):
    """A 13-token prompt: every sliding layer's window (4) is crossed."""
    model, config, params = models
    ours = np.asarray(forward(params, TOKENS, config))
    np.testing.assert_allclose(ours, hf_logits(model, TOKENS), atol=LOGITS_ATOL, rtol=0)
    np.testing.assert_allclose(forward_loop(params, TOKENS, config), ours, atol=1e-5, rtol=0)


def test_greedy_tokens_equal_transformers_ring_and_full_caches(models):
    """A prompt longer than the window, then decoding across it many times over."""
    model, config, params = models
    prompt = TOKENS[:, :7]
    expected = hf_greedy(model, prompt, 14)
    ring = generate(params, prompt, config, 14).tokens
    full = generate(params, prompt, config, 14, ring_cache=False).tokens
    np.testing.assert_array_equal(ring, expected)
    np.testing.assert_array_equal(full, expected)


def test_left_padded_batch_equals_transformers(models):
    model, config, params = models
    prompt = TOKENS[:, :7].copy()
    mask = np.ones(prompt.shape, np.int64)
    mask[0, :3], prompt[0, :3] = 0, 0  # row 0: a 4-token prompt, left-padded
    expected = hf_greedy(model, prompt, 9, mask)
    ours = generate(params, prompt, config, 9, attn_mask=mask.astype(bool))
    np.testing.assert_array_equal(ours.tokens, expected)


def test_streamed_chunks_equal_generate(one_model):
    config, params = one_model
    prompt = TOKENS[:1, :5]
    whole = np.asarray(generate(params, prompt, config, 11).tokens[:, 5:])
    np.testing.assert_array_equal(
        np.concatenate(list(stream(params, prompt, config, 11, chunk=3)), 1), whole
    )


def test_nnx_stack_equals_the_scan(one_model):
    config, params = one_model
    for layer_scan in ("nnx.scan", "split-lax.scan-merge"):
        model = NNXDecoder.from_params(params, config, rngs=nnx.Rngs(0), layer_scan=layer_scan)
        np.testing.assert_allclose(
            model(TOKENS), forward(params, TOKENS, config), atol=1e-5, rtol=0
        )


def test_round_trip_through_transformers(tmp_path):
    config = small_config(vocab_size=96, n_layers=7, sliding_window=3, tie_embeddings=True)
    params = init_params(config, jax.random.PRNGKey(3))
    params = jax.tree.map(lambda leaf: leaf + 0.1, params)  # norms away from their initial 0
    save_checkpoint(tmp_path / "ckpt", config, params)
    model = transformers.Gemma3ForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    tokens = TOKENS % config.vocab_size
    np.testing.assert_allclose(
        forward(params, tokens, config), hf_logits(model, tokens), atol=LOGITS_ATOL, rtol=0
    )
    config_again, params_again = load_checkpoint(tmp_path / "ckpt")
    assert config_again == config.replace(query_pre_attn_scalar=16)
    jax.tree.map(np.testing.assert_array_equal, params_again, params)


def test_ring_caches_keep_a_window_for_sliding_layers():
    config = small_config(n_layers=18, max_seq_len=4096, sliding_window=512)
    ring = init_cache(config, 1, 4096)
    full = init_cache(config, 1, 4096, bounded=False)
    assert ring.full.k.shape == (3, 1, 4096, 1, 16) and ring.ring.k.shape == (15, 1, 512, 1, 16)
    # 3 full layers of 4096 slots and 15 rings of 512, against 18 full layers.
    assert cache_bytes(ring) / cache_bytes(full) == (3 * 4096 + 15 * 512) / (18 * 4096)
    assert init_cache(config, 1, 512).ring is None  # a window no shorter than the cache


def test_layer_pattern_other_than_the_family_s_is_refused(tmp_path):
    model = hf_model(**SHAPES["mqa-8"])
    model.save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    hf["layer_types"] = ["full_attention"] * 8
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match=r"layer_types must follow gemma3_text's pattern"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(sliding_window=None), "sliding_window must be set: family 'gemma3'"),
        (dict(sliding_window=128), r"sliding_window must be <= max_seq_len=64, got 128"),
        (dict(family="llama"), r"sliding_window must be None: family 'llama'"),
    ],
)
def test_bad_window_settings_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        small_config(**changes)


def test_every_remat_policy_gives_the_scan_s_gradients(one_model):
    config, params = one_model

    def loss(params, remat):
        return forward(params, TOKENS, config, remat=remat).mean()

    plain = jax.grad(loss)(params, "none")
    for remat in ("full", "sqrt"):  # "sqrt": the kinds reshaped into nested segments too
        # Recomputed activations, sums in another order: gradients reach ~700 (the embedding's,
        # times sqrt(D)), equal to float32 rounding of such values.
        chex.assert_trees_all_close(jax.grad(loss)(params, remat), plain, atol=1e-3, rtol=1e-3)


def test_a_recorded_layer_pattern_must_be_the_family_s():
    config = small_config()
    check_layer_pattern(None, config, "m.gguf")  # no key: the family's pattern
    check_layer_pattern([True] * 5 + [False], config, "m.gguf")
    with pytest.raises(CheckpointError, match=r"m\.gguf: the layer pattern .* got \[True, False"):
        check_layer_pattern([True, False] * 3, config, "m.gguf")


def test_a_chat_needs_a_chat_template(one_model):
    config, params = one_model
    tokenizer = Tokenizer(
        backend=None, chat_template=None, eos_ids=(1,), bos_token="", eos_token="", pad_id=0
    )
    with pytest.raises(ValueError, match=r"Chat needs a chat template: this model has no chat"):
        Chat(Model(config, params, tokenizer))
