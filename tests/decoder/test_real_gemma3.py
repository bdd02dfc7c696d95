"""Gemma 3 270M from its real GGUF file (Q8_0, Q5_0, Q4_K, Q6_K tensors; 15 sliding-window and 3
full layers in one scan): scanlab against transformers' Gemma3ForCausalLM loading the same file,
prompts longer than the 512-token window and generations that cross it.

scanlab runs as users get it, `load_model`'s default: the file's blocks kept as int8; the f32
load is the twin they equal."""

import numpy as np
import pytest
import torch
from tests.decoder.formats.gguf_files import oracle_reader
from transformers import AutoModelForCausalLM, AutoTokenizer

from scanlab.decoder import forward, generate, load_gguf, load_model

pytestmark = pytest.mark.e2e  # Gemma 3 against transformers, every check: `make test-e2e`

NEW_TOKENS = 16
STORY = (
    "Once upon a time, in a village between two rivers, there lived a baker who rose before the "
    "sun every morning. "
)


@pytest.fixture(scope="module")
def scanlab_model(gemma3_path):
    return load_model(gemma3_path)


@pytest.fixture(scope="module")
def dense_params(gemma3_path):
    return load_gguf(gemma3_path)[1]  # every tensor dequantized to f32


@pytest.fixture(scope="module")
def transformers_model(gemma3_path):
    folder, name = gemma3_path.parent, gemma3_path.name
    with oracle_reader():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        return model.eval(), AutoTokenizer.from_pretrained(folder, gguf_file=name)


def prompt_ids(tokenizer, kind: str) -> list[int]:
    """A short prompt, one that reaches the window while decoding, one longer than it."""
    if kind == "plain":
        return tokenizer.encode("The capital of France is")
    ids = tokenizer.encode(STORY * 30)  # ~ 700 tokens
    return ids[:500] if kind == "crosses-512" else ids[:560]


def transformers_greedy(model, ids, new_tokens):
    with torch.no_grad():
        return model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
        ).numpy()


def test_the_file_is_gemma3_with_its_pattern(scanlab_model):
    config, _, _ = scanlab_model
    assert (config.family, config.n_layers, config.sliding_window) == ("gemma3", 18, 512)
    assert [i for i, kind in enumerate(config.layer_types) if kind == "full_attention"] == [
        5,
        11,
        17,
    ]


@pytest.mark.parametrize("kind", ["plain", "crosses-512", "longer-than-512"])
def test_greedy_tokens_equal_transformers(scanlab_model, transformers_model, kind):
    """ "crosses-512": a 500-token prompt decoded past position 512; "longer-than-512": a
    560-token prefill, its sliding layers' rings written from its last 512 tokens."""
    config, params, tokenizer = scanlab_model
    model, _ = transformers_model
    ids = prompt_ids(tokenizer, kind)
    new_tokens = 24 if kind == "crosses-512" else NEW_TOKENS
    ours = generate(params, np.array([ids]), config, new_tokens).tokens
    np.testing.assert_array_equal(ours, transformers_greedy(model, ids, new_tokens))


def test_logits_close_to_transformers_past_the_window(scanlab_model, transformers_model):
    config, params, tokenizer = scanlab_model
    model, _ = transformers_model
    ids = np.array([prompt_ids(tokenizer, "longer-than-512")])
    last = 64  # the positions past the window (and 1 GiB less of logits)
    with torch.no_grad():
        theirs = model(torch.tensor(ids), logits_to_keep=last).logits.numpy()
    ours = np.asarray(forward(params, ids, config))[:, -last:]
    print(f"max |logit diff| {np.abs(ours - theirs).max():.2e} of {np.abs(theirs).max():.1f}")
    # Logits reach ~40; 18 layers of f32 matmuls summed in different orders.
    np.testing.assert_allclose(ours, theirs, atol=5e-4, rtol=0)


def test_tokenizer_equals_transformers(scanlab_model, transformers_model):
    _, _, tokenizer = scanlab_model
    _, reference = transformers_model
    texts = [
        "Hello world",
        "  spaces\n\ttabs,   three  \n\n\n newlines",
        "ünïcödé, 日本語 and 🙂 12345 + 678 = 13023",
        "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
        "def f(x):\n    return x  # comment\r\n",
        " leading and trailing ",
    ]
    for text in texts:
        ids = tokenizer.encode(text)
        assert ids == reference(text)["input_ids"]  # BOS first, as the file says
        assert ids[0] == 2
        assert tokenizer.encode(text, add_special_tokens=False) == ids[1:]
        assert tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert tokenizer.chat_template is None and tokenizer.eos_ids == (1,)


def test_bfloat16_against_float32(scanlab_model, dense_params):
    import jax
    import jax.numpy as jnp

    config, _, tokenizer = scanlab_model
    params = dense_params
    params_bf16 = jax.tree.map(lambda leaf: leaf.astype(jnp.bfloat16), params)
    prompt = np.array([prompt_ids(tokenizer, "longer-than-512")])
    f32 = np.asarray(forward(params, prompt, config))
    bf16 = np.asarray(forward(params_bf16, prompt, config))
    gap, agree = np.abs(bf16 - f32).max(), (bf16.argmax(-1) == f32.argmax(-1)).mean()
    print(f"max |bf16 - f32| logit: {gap:.3f} of {np.abs(f32).max():.1f}; argmax agree {agree}")
    assert gap < 3.0
    assert agree > 0.9


def test_chat_on_the_base_model_says_it_has_no_template(cli, gemma3_path):
    status, err, _ = cli(["chat", "--model", str(gemma3_path), "--message", "hi"])
    assert status == 2
    assert err.startswith(f"error: --model {gemma3_path}: this model has no chat template")
    assert len(err.strip().splitlines()) == 1


def test_decoder_generate_continues_a_prompt(cli):
    status, err, out = cli(
        [
            "decoder",
            "generate",
            "--model",
            "gemma3-270m",
            "--prompt",
            "The capital of France is",
            "--max-new-tokens",
            "8",
        ]
    )
    assert status == 0, err
    assert " ".join(out.split()).startswith("The capital of France is the capital of the country")


def test_kept_blocks_are_the_f32_weights_and_decode_its_tokens(scanlab_model, dense_params):
    """Q8_0/Q5_0 and Q4_K/Q6_K layers brought to one layout per leaf, kept as int8: dequantized
    they are the f32 weights, bit for bit, and greedy decoding across the window gives the f32
    path's tokens."""
    import jax

    from scanlab.decoder import weights

    config, kept, tokenizer = scanlab_model
    dense = jax.tree.map(weights.as_dense, kept, is_leaf=weights.is_form)
    jax.tree.map(np.testing.assert_array_equal, dense, dense_params)
    prompt = np.array([prompt_ids(tokenizer, "crosses-512")])
    np.testing.assert_array_equal(
        generate(kept, prompt, config, NEW_TOKENS).tokens,
        generate(dense_params, prompt, config, NEW_TOKENS).tokens,
    )
