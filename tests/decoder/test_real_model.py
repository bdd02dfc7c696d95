"""SmolLM2-135M-Instruct from its real GGUF file (Q4_1 and Q8_0 tensors): scanlab against
transformers loading the same file, text in and text out.

scanlab runs as users get it, `load_model`'s default: the file's blocks kept as int8 (the tour,
the docs and these tests then share compiled programs); the f32 load is the twin they equal."""

import re

import numpy as np
import pytest
import torch
from tests.decoder.formats.gguf_files import oracle_reader
from transformers import AutoModelForCausalLM, AutoTokenizer

from scanlab.decoder import generate, load_gguf, load_model, load_tokenizer, stream

pytestmark = pytest.mark.e2e  # SmolLM2 against transformers, every check: `make test-e2e`

NEW_TOKENS = 24
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def scanlab_model(smollm2_path):
    return load_model(smollm2_path)


@pytest.fixture(scope="module")
def dense_params(smollm2_path):
    return load_gguf(smollm2_path)[1]  # every tensor dequantized to f32


@pytest.fixture(scope="module")
def transformers_model(smollm2_path):
    folder, name = smollm2_path.parent, smollm2_path.name
    with oracle_reader():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        return model.eval(), AutoTokenizer.from_pretrained(folder, gguf_file=name)


def prompts(tokenizer) -> dict[str, list[int]]:
    return {
        "plain": tokenizer.encode("The three primary colors are"),
        "code": tokenizer.encode("def fibonacci(n):\n"),
        "chat": tokenizer.encode(tokenizer.chat(QUESTION)),
    }


@pytest.mark.parametrize("kind", ["plain", "code", "chat"])
def test_greedy_tokens_equal_transformers(scanlab_model, transformers_model, kind):
    config, params, tokenizer = scanlab_model
    model, _ = transformers_model
    prompt = np.array([prompts(tokenizer)[kind]])
    ours = generate(params, prompt, config, NEW_TOKENS).tokens
    with torch.no_grad():
        theirs = model.generate(
            torch.tensor(prompt),
            attention_mask=torch.ones(prompt.shape, dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,  # both run the full length: compare every token
        )
    np.testing.assert_array_equal(ours, theirs.numpy())


def test_logits_close_to_transformers(scanlab_model, transformers_model):
    from scanlab.decoder import forward

    config, params, tokenizer = scanlab_model
    model, _ = transformers_model
    prompt = np.array([prompts(tokenizer)["chat"]])
    with torch.no_grad():
        theirs = model(torch.tensor(prompt)).logits.numpy()
    ours = np.asarray(forward(params, prompt, config))
    # Logits reach ~35; 30 layers of f32 matmuls summed in different orders: 1.2e-4 measured.
    np.testing.assert_allclose(ours, theirs, atol=5e-4)


def test_tokenizer_equals_transformers(scanlab_model, transformers_model):
    _, _, tokenizer = scanlab_model
    _, reference = transformers_model
    texts = [
        "Hello, world! 12345 + 678 = 13023",
        "  spaces\n\ttabs, ünïcödé, 日本語 and 🙂",
        "<|im_start|>user\nhi<|im_end|>\n",
    ]
    for text in texts:
        ids = tokenizer.encode(text)
        assert ids == reference(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    conversations = [
        QUESTION,
        [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"},
        ],
    ]
    for messages in conversations:
        for add_generation_prompt in (True, False):
            assert tokenizer.chat(messages, add_generation_prompt) == reference.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )


def test_tokenizer_directory_as_transformers_saves_it(transformers_model, tmp_path):
    """tokenizer.json, tokenizer_config.json and chat_template.jinja, as save_pretrained writes."""
    _, reference = transformers_model
    reference.save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    text = "Hello, world! 12345 🙂"
    assert tokenizer.encode(text) == reference(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.chat(QUESTION) == reference.apply_chat_template(
        QUESTION, tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.eos_ids == (reference.eos_token_id,)
    assert tokenizer.pad_id == reference.pad_token_id


def test_chat_answer_ends_at_end_of_turn_and_streams(scanlab_model):
    config, params, tokenizer = scanlab_model
    prompt = np.array([prompts(tokenizer)["chat"]])
    out = generate(params, prompt, config, 64, stop_tokens=tokenizer.eos_ids)
    length = int(out.lengths[0])
    answer = out.tokens[0, prompt.shape[1] : prompt.shape[1] + length]
    assert length < 64 and int(answer[-1]) in tokenizer.eos_ids
    assert "Paris" in tokenizer.decode(answer)
    chunks = stream(params, prompt, config, 64, stop_tokens=tokenizer.eos_ids)
    np.testing.assert_array_equal(np.concatenate(list(chunks), 1)[0], answer)


def test_bfloat16_against_float32(scanlab_model, dense_params):
    """bf16 weights and activations (norms, rotary phases, softmax in f32): logits near f32's."""
    import jax
    import jax.numpy as jnp

    from scanlab.decoder import forward

    config, _, tokenizer = scanlab_model
    params = dense_params
    # What load_gguf(dtype="bfloat16") returns: the dequantized f32 weights cast (tests/test_gguf).
    params_bf16 = jax.tree.map(lambda leaf: leaf.astype(jnp.bfloat16), params)
    prompt = np.array([prompts(tokenizer)["chat"]])
    f32 = np.asarray(forward(params, prompt, config))
    bf16 = np.asarray(forward(params_bf16, prompt, config))
    print(f"max |bf16 - f32| logit: {np.abs(bf16 - f32).max():.3f} of {np.abs(f32).max():.1f}")
    assert np.abs(bf16 - f32).max() < 2.0
    assert (bf16.argmax(-1) == f32.argmax(-1)).mean() > 0.9


def test_decode_stream_holds_back_a_split_character(scanlab_model):
    from scanlab.decoder.chat import decode_stream

    _, _, tokenizer = scanlab_model
    ids = tokenizer.encode("Smile 🙂 and 日本")
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # some token splits a character
    pieces = list(decode_stream(tokenizer, (np.array([[i]]) for i in ids)))
    assert "".join(pieces) == "Smile 🙂 and 日本"
    assert not any("\ufffd" in piece for piece in pieces)


def test_chat_remembers_the_conversation(scanlab_model):
    from scanlab.decoder.chat import Chat
    from scanlab.decoder.load import Model

    chat = Chat(Model(*scanlab_model), system="Answer briefly.", max_new_tokens=24)
    first = "".join(chat.reply(QUESTION[0]["content"]))
    assert first and chat.messages[-1] == {"role": "assistant", "content": first}
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant"]
    follow_up = chat.model.tokenizer.decode(chat.prompt_ids("And of Italy?"))
    assert first in follow_up and "Answer briefly." in follow_up


def test_a_conversation_longer_than_the_context_is_refused(scanlab_model):
    from scanlab.decoder.chat import Chat
    from scanlab.decoder.load import Model

    config = scanlab_model[0]
    # Prompts are padded to 64-token buckets: 8128 new tokens leave room for one bucket only.
    with pytest.raises(ValueError, match="max_new_tokens must be <= 8128, got 8129"):
        Chat(Model(*scanlab_model), max_new_tokens=config.max_seq_len - 63)
    chat = Chat(Model(*scanlab_model), max_new_tokens=config.max_seq_len - 64)
    with pytest.raises(
        ValueError, match="prompt length \\+ max_new_tokens must be <= max_seq_len=8192"
    ):
        chat.reply("Hi " * 80)  # a prompt of two buckets
    assert chat.messages == []


def test_decoder_generate_continues_text_from_a_checkpoint_directory(transformers_model, tmp_path):
    """The CLI's text path: a transformers directory's weights and tokenizer, text in and out."""
    import jax
    from typer.testing import CliRunner

    from scanlab.cli import app
    from scanlab.decoder import init_params, preset, save_checkpoint

    config = preset("tiny").replace(vocab_size=49152)  # random weights over SmolLM2's vocabulary
    params = init_params(config, jax.random.PRNGKey(3))
    save_checkpoint(tmp_path, config, params)
    transformers_model[1].save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    prompt = "The sky is"
    ids = np.array([tokenizer.encode(prompt)])
    out = generate(params, ids, config, 6, stop_tokens=tokenizer.eos_ids)
    answer = out.tokens[0, ids.shape[1] : ids.shape[1] + int(out.lengths[0])]
    result = CliRunner().invoke(
        app,
        ["decoder", "generate", "--model", str(tmp_path), "--prompt", prompt,
         "--max-new-tokens", "6"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout == prompt + tokenizer.decode(answer) + "\n"
    assert re.fullmatch(rf"loading {tmp_path} \(default weights\)\.\.\. [0-9.]+ s\n", result.stderr)


@pytest.mark.parametrize(
    ("command", "flags", "message"),
    [
        ("chat", ["--max-new-tokens", "8129"], "--max-new-tokens must be <= 8128, got 8129"),
        (
            "chat",
            ["--top-k", "99999999", "--temperature", "0.7"],
            "--top-k must be <= vocab_size=49152, got 99999999",
        ),
        (
            "decoder generate",
            ["--top-k", "49153", "--temperature", "0.7", "--tokens", "1,2"],
            "--top-k must be <= vocab_size=49152, got 49153",
        ),
    ],
)
def test_limits_from_the_model_s_config_are_checked_before_its_weights_load(
    cli, smollm2_path, monkeypatch, command, flags, message
):
    from scanlab.decoder import load

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded before the flags were checked")

    monkeypatch.setattr(load, "load_weights", no_weights)
    monkeypatch.setattr(load, "load_model", no_weights)
    status, err, _ = cli([*command.split(), "--model", str(smollm2_path), *flags])
    assert (status, err.strip()) == (2, f"error: {message}")


def test_kept_blocks_are_the_f32_weights_and_decode_its_tokens(scanlab_model, dense_params):
    """The file's Q4_1/Q8_0 blocks kept as int8: dequantized they are the f32 weights, bit for
    bit, and greedy decoding from them gives the f32 path's tokens."""
    import jax

    from scanlab.decoder import weights

    config, kept, tokenizer = scanlab_model
    dense = jax.tree.map(weights.as_dense, kept, is_leaf=weights.is_form)
    jax.tree.map(np.testing.assert_array_equal, dense, dense_params)
    prompt = np.array([prompts(tokenizer)["chat"]])
    np.testing.assert_array_equal(
        generate(kept, prompt, config, NEW_TOKENS).tokens,
        generate(dense_params, prompt, config, NEW_TOKENS).tokens,
    )
