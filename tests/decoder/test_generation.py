import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tests.traces import traced

from scanlab.decoder import forward, generate, init_params, load_model, preset
from scanlab.errors import ArgumentTypeError

CONFIG = preset("tiny")


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def prompt():
    return jax.random.randint(jax.random.PRNGKey(1), (3, 5), 0, CONFIG.vocab_size)


def test_cached_decoding_equals_recomputation(params, prompt):
    out = generate(params, prompt, CONFIG, 10, return_logits=True)
    assert out.tokens.shape == (3, 15) and out.logits.shape == (3, 10, CONFIG.vocab_size)
    np.testing.assert_array_equal(out.tokens[:, :5], prompt)
    full = forward(params, out.tokens, CONFIG)  # every position recomputed from scratch
    np.testing.assert_allclose(out.logits, full[:, 4:-1], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(full[:, 4:-1].argmax(-1), out.tokens[:, 5:])


def test_rows_are_independent(params, prompt):
    batched = generate(params, prompt, CONFIG, 6).tokens
    for row in range(3):
        np.testing.assert_array_equal(
            generate(params, prompt[row : row + 1], CONFIG, 6).tokens[0], batched[row]
        )


def test_sampling(params, prompt):
    key = jax.random.PRNGKey(4)
    greedy = generate(params, prompt, CONFIG, 8).tokens
    top1 = generate(params, prompt, CONFIG, 8, key=key, temperature=0.7, top_k=1).tokens
    np.testing.assert_array_equal(top1, greedy)
    a = generate(params, prompt, CONFIG, 8, key=key, temperature=1.0).tokens
    b = generate(params, prompt, CONFIG, 8, key=key, temperature=1.0).tokens
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(
        a, generate(params, prompt, CONFIG, 8, key=jax.random.PRNGKey(5), temperature=1.0).tokens
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1, got 0"),
        (
            dict(max_new_tokens=124),
            r"prompt length \+ max_new_tokens must be <= max_seq_len=128, got 5 \+ 124 = 129",
        ),
        (dict(temperature=-1.0), r"temperature must be >= 0.0, got -1.0"),
        (dict(temperature=float("nan")), "temperature must be finite, got nan"),
        (
            dict(top_k=3),
            r"top_k needs temperature > 0 \(greedy takes the most likely token\), got top_k=3",
        ),
        (dict(top_p=0.5), r"top_p needs temperature > 0 .*, got top_p=0.5"),
        (dict(min_p=0.1), r"min_p needs temperature > 0 .*, got min_p=0.1"),
        (
            dict(top_p=0.0, temperature=1.0, key=jax.random.PRNGKey(0)),
            r"top_p must be in \(0, 1\], got 0.0",
        ),
        (
            dict(top_p=1.5, temperature=1.0, key=jax.random.PRNGKey(0)),
            r"top_p must be in \(0, 1\], got 1.5",
        ),
        (
            dict(min_p=2.0, temperature=1.0, key=jax.random.PRNGKey(0)),
            r"min_p must be in \[0, 1\], got 2.0",
        ),
        (dict(repetition_penalty=0.0), "repetition_penalty must be > 0, got 0"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty must be finite, got inf"),
        (dict(stop_tokens=[3, 64]), "stop_tokens.1. must be <= 63, got 64"),
        (dict(stop_tokens=[-1]), "stop_tokens.0. must be >= 0, got -1"),
        (dict(stop_tokens=2), "stop_tokens must be a sequence of token ids, got 2"),
        (dict(pad_token=64), "pad_token must be <= 63, got 64"),
        (dict(prompt=jnp.array([[1, 64]])), r"tokens must be ids in \[0, vocab_size=64\)"),
        (dict(temperature=1.0), "key must be a PRNG key when temperature > 0"),
        (
            dict(top_k=65, temperature=1.0, key=jax.random.PRNGKey(0)),
            "top_k must be <= vocab_size=64, got 65",
        ),
        (
            dict(prompt=jnp.zeros(5, jnp.int32)),
            r"tokens must have shape \(B, S\) with B >= 1, got shape \(5,\)",
        ),
    ],
)
def test_bad_arguments(params, prompt, kwargs, match):
    args = dict(prompt=prompt, max_new_tokens=4) | kwargs
    with pytest.raises((ValueError, TypeError), match=match):
        generate(params, args.pop("prompt"), CONFIG, args.pop("max_new_tokens"), **args)


def test_left_padded_prompts_decode_as_they_would_alone(params):
    short = jnp.array([[7, 8, 9]])
    long = jnp.array([[1, 2, 3, 4, 5, 6]])
    padded = jnp.concatenate([jnp.concatenate([jnp.zeros((1, 3), jnp.int32), short], 1), long])
    mask = np.array([[False] * 3 + [True] * 3, [True] * 6])
    batched = generate(params, padded, CONFIG, 8, attn_mask=mask, return_logits=True)
    alone = generate(params, short, CONFIG, 8, return_logits=True)
    np.testing.assert_array_equal(batched.tokens[0, 6:], alone.tokens[0, 3:])
    # Rotary angles shifted by the padding: equal up to float32 rounding of the phases.
    np.testing.assert_allclose(batched.logits[0], alone.logits[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(batched.tokens[1], generate(params, long, CONFIG, 8).tokens[0])


@pytest.mark.parametrize(
    ("mask", "match"),
    [
        (np.ones((3, 4), bool), r"attn_mask must have the tokens' shape \(3, 5\), got \(3, 4\)"),
        (np.array([[True] * 4 + [False]] * 3), "attn_mask must pad on the left"),
        (np.array([[True, False, True, True, True]] * 3), "attn_mask must pad on the left"),
        (
            np.array([[False] * 5] * 3),
            "attn_mask must leave each row at least one real token, got row 0 all padding",
        ),
    ],
)
def test_bad_prompt_mask(params, prompt, mask, match):
    with pytest.raises(ValueError, match=match):
        generate(params, prompt, CONFIG, 4, attn_mask=mask)


def test_new_sampling_values_do_not_recompile(params, prompt):
    key = jax.random.PRNGKey(0)
    settings = [
        dict(temperature=0.7),
        dict(temperature=1.3, top_k=5, top_p=0.9),
        dict(temperature=0.2, top_k=1, min_p=0.2, repetition_penalty=1.3),
        dict(temperature=2.0, top_k=64, top_p=0.5, min_p=0.05, repetition_penalty=0.8),
    ]
    with traced() as traces:
        for setting in settings:
            generate(params, prompt, CONFIG, 4, key=key, **setting)
    assert traces["_generate"] == 1
    with traced() as traces:
        generate(params, prompt, CONFIG, 4)  # greedy is its own program: no key, no draw
    assert traces["_generate"] == 1


def test_rows_stop_at_their_stop_token_then_pad(params, prompt):
    free = generate(params, prompt, CONFIG, 12).tokens[:, 5:]
    stop = int(free[0, 3])  # row 0 produces it as its 4th new token
    out = generate(params, prompt, CONFIG, 12, stop_tokens=[stop], pad_token=0)
    for row, tokens in enumerate(np.asarray(free)):
        hits = np.flatnonzero(tokens == stop)
        length = hits[0] + 1 if hits.size else 12
        assert out.lengths[row] == length
        np.testing.assert_array_equal(out.tokens[row, 5 : 5 + length], tokens[:length])
        assert (out.tokens[row, 5 + length :] == 0).all()


def test_loop_ends_when_every_row_has_stopped(params, prompt):
    """Every row stops at once: the while loop runs no decoding step (its logits stay zero)."""
    first = np.asarray(generate(params, prompt, CONFIG, 1).tokens[:, -1])
    out = generate(params, prompt, CONFIG, 50, stop_tokens=first.tolist(), return_logits=True)
    np.testing.assert_array_equal(out.lengths, np.ones(3))
    assert np.abs(np.asarray(out.logits[:, 1:])).max() == 0.0
    assert np.abs(np.asarray(out.logits[:, 0])).max() > 0.0


@pytest.mark.parametrize("chunk", [1, 5])
def test_stream_yields_generate_tokens(params, prompt, chunk):
    key = jax.random.PRNGKey(4)
    settings = dict(key=key, temperature=0.9, top_p=0.95, repetition_penalty=1.2)
    whole = generate(params, prompt, CONFIG, 20, **settings)
    free = np.asarray(whole.tokens[:, 5:])
    stop = [int(free[0, 2]), int(free[1, 6])]
    whole = generate(params, prompt, CONFIG, 20, stop_tokens=stop, **settings)
    streamed = np.concatenate(
        list(decoder_stream(params, prompt, 20, chunk=chunk, stop_tokens=stop, **settings)), 1
    )
    produced = streamed.shape[1]
    assert produced <= 20
    np.testing.assert_array_equal(streamed, np.asarray(whole.tokens[:, 5 : 5 + produced]))
    assert produced >= int(np.max(whole.lengths))


def decoder_stream(params, prompt, n, **kwargs):
    from scanlab.decoder import stream

    return stream(params, prompt, CONFIG, n, **kwargs)


def test_stream_checks_arguments_before_the_first_token(params, prompt):
    with pytest.raises(ValueError, match="chunk must be >= 1, got 0"):
        decoder_stream(params, prompt, 4, chunk=0)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda p, t, c: generate(p, c, t, 4), TypeError, r"tokens is a DecoderConfig: the order"),
        (lambda p, t, c: forward(p, t, {}), TypeError, r"config must be a DecoderConfig, got dict"),
        (lambda p, t, c: forward(p, t[:0], c), ValueError, r"B >= 1, got shape \(0, 5\)"),
        (
            lambda p, t, c: generate(p, t, c, 4, key=0, temperature=1.0),
            TypeError,
            r"key must be None or a PRNG key .* got int of shape \(\) and dtype None",
        ),
        (
            lambda p, t, c: forward(p, t, c, key=jax.numpy.zeros(3, jax.numpy.uint32)),
            TypeError,
            r"key must be None or a PRNG key .* shape \(3,\) and dtype uint32",
        ),
        (
            lambda p, t, c: init_params(c, jax.random.PRNGKey(0), jax.numpy.int8),
            TypeError,
            r"dtype must be a floating dtype, got int8",
        ),
        (
            lambda p, t, c: init_params(jax.random.PRNGKey(0), c),
            TypeError,
            r"key is a DecoderConfig: the order is config, key \(as in init_params\)",
        ),
        (
            lambda p, t, c: init_params({}, jax.random.PRNGKey(0)),
            TypeError,
            r"config must be a DecoderConfig, got dict",
        ),
        (
            lambda p, t, c: init_params(c, 0),
            TypeError,
            r"key must be a PRNG key .* got int of shape \(\) and dtype None",
        ),
        (
            lambda p, t, c: load_model(None),
            TypeError,
            r"model must be a str or os.PathLike, got NoneType",
        ),
    ],
    ids=[
        "argument-order",
        "config",
        "batch-0",
        "key-int",
        "key-shape",
        "int8-params",
        "init-order",
        "init-config",
        "init-key",
        "load-none",
    ],
)
def test_api_mistakes_name_the_argument(call, error, message):
    config = preset("tiny")
    params = init_params(config, jax.random.PRNGKey(0))
    tokens = np.zeros((2, 5), np.int32)
    with pytest.raises(error, match=message):
        call(params, tokens, config)


def test_swapped_or_ragged_tokens_are_named_before_numpy_sees_them():
    config = preset("tiny")
    params = init_params(config, jax.random.PRNGKey(0))
    prompt = np.zeros((1, 4), np.int32)
    with pytest.raises(
        ArgumentTypeError,
        match=r"tokens is a DecoderParams: the parameters come first \(params, tokens, config\)",
    ):
        generate(prompt, params, config, 2)
    with pytest.raises(ArgumentTypeError, match=r"tokens must be token ids of shape \(B, S\)"):
        generate(params, [[1, 2], [3]], config, 2)
