"""The engine's host thread over the slots: requests from several threads, queued, admitted
together, ended by a stop token, their budget or a cancel, and params on a mesh — each answer
what its prompt decodes alone."""

import dataclasses
import threading

import jax
import pytest
from tests.serve.alone import CONTEXT, LONGEST, alone

from scanlab.decoder import slots as slots_lib
from scanlab.serve.engine import CANCELLED, LENGTH, STOP, Engine, EngineBusy

pytestmark = pytest.mark.slow  # a serving thread per test: `make test`, not `make test-fast`


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
