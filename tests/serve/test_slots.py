"""Decoding slots (`scanlab.decoder.slots`) driven step by step, against `generate` decoding
each prompt alone, and the requests the engine refuses before any work.

The invariant: at temperature 0 a request's tokens are those of its prompt decoded alone by
`decoder.generate` (with the tokenizer's stop tokens and the same budget), whatever else shares
the batch and whenever it joined; with the same seed its sampled tokens are too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tests.serve.alone import CONTEXT, LONGEST, alone
from tests.traces import traced

from scanlab.decoder import Model
from scanlab.decoder import slots as slots_lib
from scanlab.decoder.chat import left_padded
from scanlab.errors import ArgumentError, OutOfMemoryError
from scanlab.serve.engine import Engine, prompt_bucket


class Host:
    """A host loop over the slots, driven step by step so a test fixes who joins when."""

    def __init__(self, model: Model, rows: int, steps: int):
        self.model, self.steps = model, steps
        stops = np.asarray(model.tokenizer.eos_ids, np.int32)
        self.stops = stops
        self.slots = slots_lib.init_slots(model.config, rows, CONTEXT, len(stops))
        self.out: dict[int, list[int]] = {}  # row -> the tokens of the request in it

    def admit(self, row: int, prompt: list[int], budget: int, temperature=0.0, seed=0, **rest):
        tokens, mask = left_padded([prompt], self.model.tokenizer.pad_id, 16)
        settings = slots_lib.Sampling(
            jnp.float32(temperature),
            jnp.int32(rest.get("top_k", self.model.config.vocab_size)),
            jnp.float32(rest.get("top_p", 1.0)),
            jnp.float32(0.0),
            jnp.float32(1.0),
        )
        self.slots, first = slots_lib.admit(
            self.model.params,
            self.slots,
            jnp.asarray(tokens),
            jnp.asarray(mask),
            jnp.asarray([row], jnp.int32),
            jnp.asarray([budget], jnp.int32),
            jnp.asarray(self.stops)[None],
            jax.tree.map(lambda setting: setting[None], settings),
            jax.random.key(seed)[None],
            config=self.model.config,
        )
        self.out[row] = [int(first[0])]

    def dispatch(self) -> dict[int, list[int]]:
        rows = self.slots.token_B.shape[0]
        self.slots, emitted = slots_lib.decode(
            self.model.params,
            self.slots,
            jnp.ones(rows, bool),
            jnp.int32(self.model.tokenizer.pad_id),
            config=self.model.config,
            steps=self.steps,
            rows=rows,
        )
        tokens, live = np.asarray(emitted.tokens_BxK), np.asarray(emitted.live_BxK)
        for row in self.out:
            self.out[row] += tokens[row][live[row]].tolist()
        return self.out


def test_requests_joining_mid_flight_decode_as_each_prompt_alone(model, prompts, greedy_alone):
    host = Host(model, rows=3, steps=3)
    host.admit(0, prompts[0], 12)
    host.dispatch()
    host.admit(1, prompts[2], LONGEST)  # joins while row 0 is mid-answer
    host.dispatch()
    host.admit(2, prompts[1], 1)  # a budget of one: done at admission
    for _ in range(4):
        host.dispatch()
    done = host.out[0]
    host.admit(0, prompts[1], 20)  # a row reused after its request ended
    for _ in range(10):
        host.dispatch()
    assert done == greedy_alone[0][:12]
    assert host.out[1] == greedy_alone[2][:LONGEST]
    assert host.out[2] == greedy_alone[1][:1]
    assert host.out[0] == greedy_alone[1][:20]


def test_sampled_rows_draw_as_generate_does_with_the_same_key(model, prompts):
    host = Host(model, rows=2, steps=4)
    host.admit(1, prompts[0], 16)  # greedy beside the sampled row
    host.admit(0, prompts[2], 16, temperature=0.8, seed=7, top_k=40)
    for _ in range(4):
        host.dispatch()
    drawn = alone(model, prompts[2], 16, key=jax.random.key(7), temperature=0.8, top_k=40)
    assert host.out[0] == drawn
    assert host.out[0] != alone(model, prompts[2], 16, key=jax.random.key(8), temperature=0.8)


def test_admission_compiles_once_per_bucket_and_decoding_once(model, prompts):
    host = Host(model, rows=2, steps=2)
    host.admit(0, prompts[0], 4)
    host.admit(1, prompts[2], 4)
    host.dispatch()
    with traced() as traces:
        host.admit(1, prompts[1], 5)  # 9 tokens: bucket 16, as prompt 0's
        host.admit(0, prompts[2], 6, temperature=1.0, seed=3)  # new settings, same program
        host.dispatch()
        host.dispatch()
    assert traces["admit"] == 0 and traces["decode"] == 0


# --- the engine ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "options", "message"),
    [
        ([], 4, {}, "prompt must hold at least one token, got none"),
        ([5, 999], 4, {}, r"prompt\[1\] must be <= 319, got 999"),
        ([5] * 64, 4, {}, r"the prompt must be at most 63 tokens \(the context, 64, less one"),
        ([5] * 20, 33, {}, r"max_tokens must be <= 32 for a prompt of 20 tokens .* padded to 32"),
        ([5], 0, {}, "max_tokens must be >= 1, got 0"),
        ([5], 4, {"temperature": -1.0}, "temperature must be >= 0"),
        ([5], 4, {"temperature": 1.0, "top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ([5], 4, {"seed": -1}, r"seed must be in \[0, 2\*\*32\)"),
    ],
)
def test_bad_requests_are_refused_naming_the_argument(model, prompt, max_tokens, options, message):
    engine = Engine(model, slots=1, context=CONTEXT)
    with pytest.raises(ArgumentError, match=message):
        engine.check(prompt, max_tokens, **options)


def test_buckets_pad_prompts_to_a_few_lengths():
    assert [prompt_bucket(n, 4096) for n in (1, 16, 17, 300, 512, 513, 4000)] == [
        16,
        16,
        32,
        512,
        512,
        1024,
        4095,
    ]
    assert prompt_bucket(40, 48) == 47  # never past the context less one


def test_slots_past_the_machine_s_memory_are_refused_before_allocating(model):
    with pytest.raises(OutOfMemoryError, match=r"^1000000000 slots of 64 positions .* GiB"):
        Engine(model, slots=10**9, context=CONTEXT)
