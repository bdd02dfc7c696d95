"""Decoding slots and the engine over them, against `generate` decoding each prompt alone.

The invariant: at temperature 0 a request's tokens are those of its prompt decoded alone by
`decoder.generate` (with the tokenizer's stop tokens and the same budget), whatever else shares
the batch and whenever it joined; with the same seed its sampled tokens are too. Checked on a
Llama-shaped model and on a Gemma 3 one whose window is shorter than the slots' context (its
sliding layers decode from ring caches).
"""

import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tests.tiny import TINY, tiny_tokenizer
from tests.traces import traced

from scanlab.decoder import Model, generate, init_params
from scanlab.decoder import slots as slots_lib
from scanlab.decoder.chat import left_padded
from scanlab.errors import ArgumentError
from scanlab.serve.engine import CANCELLED, LENGTH, STOP, Engine, EngineBusy, prompt_bucket

CONTEXT = 64
CONFIGS = {
    "llama": TINY,
    "gemma3-rings": dataclasses.replace(
        TINY, family="gemma3", n_layers=6, sliding_window=4, max_seq_len=CONTEXT
    ),
}
PROMPT_LENGTHS = (3, 9, 20)  # buckets 16, 16, 32
LONGEST = 30  # the most tokens any request here asks for


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request) -> Model:
    config = CONFIGS[request.param]
    return Model(config, init_params(config, jax.random.PRNGKey(0)), tiny_tokenizer())


@pytest.fixture(scope="module")
def prompts(model) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(3, model.config.vocab_size, n).tolist() for n in PROMPT_LENGTHS]


def alone(model: Model, prompt: list[int], budget: int, **sampling) -> list[int]:
    """`generate`'s new tokens for the prompt alone, up to and including its stop token."""
    tokenizer = model.tokenizer
    out = generate(
        model.params,
        jnp.asarray([prompt]),
        model.config,
        budget,
        stop_tokens=tokenizer.eos_ids,
        pad_token=tokenizer.pad_id,
        **sampling,
    )
    return np.asarray(out.tokens[0, len(prompt) :][: int(out.lengths[0])]).tolist()


@pytest.fixture(scope="module")
def greedy_alone(model, prompts) -> list[list[int]]:
    """Each prompt's greedy answer of LONGEST tokens (a shorter budget's is its beginning)."""
    return [alone(model, prompt, LONGEST) for prompt in prompts]


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


def test_concurrent_requests_through_the_engine_decode_as_each_alone(model, prompts, greedy_alone):
    engine = Engine(model, slots=2, context=CONTEXT, steps=3, queue_size=8).start()
    budgets = [12, 5, LONGEST, 20, 1]
    order = [0, 1, 2, 1, 0]
    answers: dict[int, list[int]] = {}

    def ask(i):
        answers[i] = list(engine.generate(engine.check(prompts[order[i]], budgets[i])))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(budgets))]
    try:
        for thread in threads:  # five requests for two slots: three wait, then join
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        engine.close()
    for i, budget in enumerate(budgets):
        assert answers[i] == greedy_alone[order[i]][:budget]
    stats = engine.stats()
    assert (stats.busy, stats.queued, stats.finished) == (0, 0, len(budgets))


def test_requests_admitted_together_decode_as_each_alone(model, prompts, greedy_alone, monkeypatch):
    admissions = []  # each admission's padded prompts: (N, P)
    admit = slots_lib.admit

    def counted(params, slots, prompts_NxP, *rest, **options):
        admissions.append(prompts_NxP.shape)
        return admit(params, slots, prompts_NxP, *rest, **options)

    monkeypatch.setattr(slots_lib, "admit", counted)
    engine = Engine(model, slots=4, context=CONTEXT, steps=2, queue_size=4)
    asked = [(0, 10, {}), (1, 7, {}), (2, 12, {}), (0, 9, dict(temperature=0.9, seed=5))]
    got = []
    for prompt, budget, options in asked:  # queued before the engine starts: one admission
        deliver, pieces, ended = deliveries()
        engine.submit(engine.check(prompts[prompt], budget, **options), deliver)
        got.append((pieces, ended))
    engine.start()
    try:
        assert all(ended.wait(120) for _, ended in got)
    finally:
        engine.close()
    # Bucket 16: three prompts in one prefill (padded to a batch of 4); bucket 32: one.
    assert sorted(admissions) == [(1, 32), (4, 16)]
    answers = [[token for ids, _ in pieces for token in ids] for pieces, _ in got]
    for (prompt, budget, _), answer in zip(asked[:3], answers, strict=False):
        assert answer == greedy_alone[prompt][:budget]
    drawn = alone(model, prompts[0], 9, key=jax.random.key(5), temperature=0.9)
    assert answers[3] == drawn


def deliveries():
    """A deliver callback and what it was handed: (token ids, end) pairs."""
    got: list[tuple[list[int], str | None]] = []
    ended = threading.Event()

    def deliver(ids, end):
        got.append((ids, end))
        if end is not None:
            ended.set()

    return deliver, got, ended


def test_each_request_ends_with_its_reason(model, prompts, greedy_alone):
    # A stop token the greedy answer reaches: its fourth token (or an earlier occurrence of it).
    stop_id = greedy_alone[0][3]
    stopping = model._replace(tokenizer=dataclasses.replace(model.tokenizer, eos_ids=(stop_id,)))
    engine = Engine(stopping, slots=1, context=CONTEXT, steps=2, queue_size=2).start()
    try:
        for budget, reason in ((3, LENGTH), (20, STOP)):
            deliver, got, ended = deliveries()
            engine.submit(engine.check(prompts[0], budget), deliver)
            assert ended.wait(60) and got[-1][1] == reason
            assert [token for ids, _ in got for token in ids] == alone(stopping, prompts[0], budget)
        deliver, got, ended = deliveries()  # ignore_eos: the whole budget, past the stop token
        engine.submit(engine.check(prompts[0], 20, ignore_eos=True), deliver)
        assert ended.wait(60) and got[-1][1] == LENGTH
        never = model._replace(tokenizer=dataclasses.replace(model.tokenizer, eos_ids=()))
        assert [token for ids, _ in got for token in ids] == alone(never, prompts[0], 20)
        deliver, got, ended = deliveries()
        ticket = engine.submit(engine.check(prompts[1], 40), deliver)
        ticket.cancel()
        assert ended.wait(60) and got[-1][1] == CANCELLED
    finally:
        engine.close()


def test_a_full_queue_refuses_at_once_and_a_cancelled_request_frees_its_slot(model, prompts):
    engine = Engine(model, slots=1, context=CONTEXT, steps=1, queue_size=1)
    deliver, _, _ = deliveries()
    first = engine.submit(engine.check(prompts[0], 40), deliver)  # the slot's (not started yet)
    engine.submit(engine.check(prompts[1], 40), deliver)  # the queue's one place
    with pytest.raises(EngineBusy, match=r"all 1 slots are busy and 2 requests wait"):
        engine.submit(engine.check(prompts[2], 4), deliver)
    engine.start()
    try:
        first.cancel()
        deadline = threading.Event()
        while engine.stats().finished < 1 and not deadline.wait(0.01):
            pass
    finally:
        engine.close(deadline_s=0)
    with pytest.raises(EngineBusy, match="shutting down"):
        engine.submit(engine.check(prompts[0], 4), deliver)


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


def test_tensor_parallel_params_serve_as_one_device_does(on_host_devices):
    """On a mesh of 2 devices (model=2) the engine's programs follow the params' shardings and
    answer as `generate` does on one device."""
    out = on_host_devices(
        2,
        """
        import types
        import jax, jax.numpy as jnp, numpy as np
        from scanlab import decoder, sharding
        from scanlab.serve import Engine

        TINY = decoder.preset("tiny")
        # The engine reads a tokenizer's stop and padding ids only: token ids in and out here.
        ids_only = types.SimpleNamespace(eos_ids=(), pad_id=0)
        params = decoder.init_params(TINY, jax.random.PRNGKey(0))
        mesh = sharding.make_mesh("model=2")
        sharded = decoder.shard_params(params, TINY, mesh)
        assert len(sharded.blocks.attention.q_proj.sharding.device_set) == 2
        engine = Engine(decoder.Model(TINY, sharded, ids_only), slots=2, context=48)
        engine.start()
        prompt = [5, 9, 31, 7]
        served = list(engine.generate(engine.check(prompt, 12, ignore_eos=True)))
        engine.close()
        alone = decoder.generate(params, jnp.asarray([prompt]), TINY, 12).tokens[0, 4:]
        print(served == np.asarray(alone).tolist())
        """,
    )
    assert out.strip() == "True"
