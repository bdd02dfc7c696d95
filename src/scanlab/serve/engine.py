"""The serving engine: requests join a fixed array of decoding slots between dispatches.

`Engine` owns a `scanlab.decoder.slots` state and one host thread. Between dispatches the
thread admits waiting requests into free rows (a prefill at the prompt's bucket length each),
then runs K decoding steps of every row in one compiled scan, hands each request its new tokens
and frees the rows that finished (a stop token or the budget) or were cancelled. Requests wait in
a bounded queue; a full one refuses at once (`EngineBusy`). Only the thread touches JAX.

Prompts are left-padded to a bucket: powers of two from `MIN_BUCKET` to `STEP_BUCKET`, then
multiples of `STEP_BUCKET`, at most T - 1 (T the slots' context). Each bucket's admission and the
decoding step compile once, on first use or in `warm_up`.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from scanlab import checks
from scanlab.decoder import slots as slots_lib
from scanlab.decoder.cache import cache_bytes, init_cache
from scanlab.decoder.chat import left_padded
from scanlab.decoder.load import Model
from scanlab.decoder.sampling import Sampling
from scanlab.errors import ArgumentError, ScanlabError

MIN_BUCKET = 16
STEP_BUCKET = 512
STOP, LENGTH, CANCELLED = "stop", "length", "cancelled"  # why a request ended


class EngineBusy(ScanlabError):
    """Every slot is busy and the waiting queue is full: try again later."""


def check_fits(config, slots: int, context: int, dtype=jnp.float32) -> None:
    """Refuses up front (OutOfMemoryError) slots whose KV caches the machine cannot hold."""
    shapes = jax.eval_shape(lambda: init_cache(config, slots, context, dtype))
    checks.fits_in_memory(
        f"{slots} slots of {context} positions (their KV caches)", cache_bytes(shapes)
    )


def prompt_bucket(length: int, context: int) -> int:
    """The padded length of a prompt of `length` tokens in slots of `context` positions."""
    bucket = MIN_BUCKET
    while bucket < min(length, STEP_BUCKET):
        bucket *= 2
    if length > STEP_BUCKET:
        bucket = -(-length // STEP_BUCKET) * STEP_BUCKET
    return min(bucket, context - 1)


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt to continue, checked by `Engine.check`: token ids, a budget, sampling."""

    prompt: tuple[int, ...]
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0
    ignore_eos: bool = False  # decode the whole budget past stop tokens (as llama-server's)


Delivery = Callable[[list[int], str | None], None]  # (new token ids, why it ended or None)


class Ticket:
    """A submitted request: its tokens reach `deliver` on the engine's thread; `cancel` ends it
    (its row is freed at the next dispatch)."""

    def __init__(self, request: Request, deliver: Delivery):
        self.request = request
        self.deliver = deliver
        self.emitted = 0
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


@dataclasses.dataclass
class Stats:
    """What the engine is doing: rows busy, requests waiting, finished, recent tokens/s."""

    slots: int
    busy: int
    queued: int
    finished: int
    tokens_per_s: float


class Engine:
    """Continuous batching over `slots` rows of `context` positions for one model.

    Args:
      model: the Model (config, params, tokenizer) to serve.
      slots: B, the rows decoded together.
      context: T, positions per row (a prompt's bucket plus its budget); default the model's.
      steps: K, decoding steps per dispatch (a request joins or leaves between dispatches).
      queue_size: requests that may wait for a free row; more are refused (`EngineBusy`).
    """

    def __init__(
        self,
        model: Model,
        *,
        slots: int = 8,
        context: int | None = None,
        steps: int = 8,
        queue_size: int = 64,
    ):
        config = model.config
        self.model = model
        self.rows = checks.static_int("slots", slots, minimum=1)
        self.context = checks.static_int(
            "context",
            config.max_seq_len if context is None else context,
            minimum=2,
            maximum=config.max_seq_len,
        )
        self.steps = checks.static_int("steps", steps, minimum=1)
        self.queue_size = checks.static_int("queue_size", queue_size, minimum=0)
        # The row counts a dispatch decodes and an admission prefills: powers of two below the
        # slots, and all of them (each compiles once).
        self._row_counts = sorted({min(2**i, self.rows) for i in range(self.rows.bit_length() + 1)})
        check_fits(config, self.rows, self.context, model.params.embed.dtype)
        self._stops = np.full(max(1, len(model.tokenizer.eos_ids)), -1, np.int32)
        self._stops[: len(model.tokenizer.eos_ids)] = model.tokenizer.eos_ids
        self._pad_id = model.tokenizer.pad_id
        self._waiting: deque[Ticket] = deque()
        self._busy: dict[int, Ticket] = {}
        self._wake = threading.Condition()
        self._stopping = False  # the thread ends
        self._closing = False  # no new requests
        self._finished = 0
        self._recent: deque[tuple[float, int]] = deque(maxlen=32)  # (time, tokens) per dispatch
        self._slots = slots_lib.init_slots(
            config, self.rows, self.context, len(self._stops), model.params.embed.dtype
        )
        self._thread = threading.Thread(target=self._run, name="scanlab-engine", daemon=True)

    # --- the caller's side ------------------------------------------------------------------

    def check(self, prompt: Sequence[int], max_tokens: int | None = None, **sampling) -> Request:
        """A Request, every argument checked (ArgumentError naming it); `max_tokens` None: all
        the room the prompt's bucket leaves; `sampling`: Request's other fields."""
        vocab = self.model.config.vocab_size
        if not len(prompt):
            raise ArgumentError("prompt must hold at least one token, got none")
        ids = tuple(
            checks.static_int(f"prompt[{i}]", token, minimum=0, maximum=vocab - 1)
            for i, token in enumerate(prompt)
        )
        if len(ids) > self.context - 1:
            raise ArgumentError(
                f"the prompt must be at most {self.context - 1} tokens (the context, "
                f"{self.context}, less one to answer), got {len(ids)}"
            )
        room = self.context - prompt_bucket(len(ids), self.context)
        if max_tokens is None:
            max_tokens = room
        max_tokens = checks.static_int("max_tokens", max_tokens, minimum=1)
        if max_tokens > room:
            raise ArgumentError(
                f"max_tokens must be <= {room} for a prompt of {len(ids)} tokens (the context, "
                f"{self.context}, less the prompt padded to "
                f"{prompt_bucket(len(ids), self.context)}), got {max_tokens}"
            )
        seed = sampling.pop("seed", 0)
        checks.seed_key(seed)
        ignore_eos = sampling.pop("ignore_eos", False)
        checks.instance("ignore_eos", ignore_eos, bool)
        checked = checks.sampling_options(vocab, **sampling)
        return Request(ids, max_tokens, seed=seed, ignore_eos=ignore_eos, **checked)

    def submit(self, request: Request, deliver: Delivery) -> Ticket:
        """Queues a checked request; raises EngineBusy when the queue is full."""
        ticket = Ticket(request, deliver)
        with self._wake:
            if self._closing:
                raise EngineBusy("the engine is shutting down: it takes no new requests")
            free = self.rows - len(self._busy)
            if len(self._waiting) >= self.queue_size + free:
                raise EngineBusy(
                    f"all {self.rows} slots are busy and {len(self._waiting)} requests wait "
                    f"(the queue holds {self.queue_size}): try again shortly"
                )
            self._waiting.append(ticket)
            self._wake.notify()
        return ticket

    def generate(self, request: Request) -> Iterator[int]:
        """The request's tokens as they come (a convenience over `submit`, for one caller)."""
        pieces: queue.SimpleQueue = queue.SimpleQueue()
        ticket = self.submit(request, lambda ids, end: pieces.put((ids, end)))
        try:
            while True:
                ids, end = pieces.get()
                yield from ids
                if end is not None:
                    return
        finally:
            ticket.cancel()

    def stats(self) -> Stats:
        with self._wake:
            busy, queued = len(self._busy), len(self._waiting)
        recent = list(self._recent)
        rate = 0.0
        if len(recent) > 1 and recent[-1][0] > recent[0][0]:
            rate = sum(n for _, n in recent[1:]) / (recent[-1][0] - recent[0][0])
        return Stats(self.rows, busy, queued, self._finished, rate)

    # --- running ----------------------------------------------------------------------------

    def warm_up(self, buckets: Sequence[int] = (), on_compiled: Callable[[str], None] = print):
        """Compiles the decoding step and the given buckets' admissions (of each batch size) now,
        with dummy requests whose rows are freed at once, rather than at the first requests
        that need them."""
        if self._thread.is_alive():
            raise ArgumentError("warm_up must come before start(): the engine is running")
        for bucket in buckets:
            for size in self._row_counts:  # requests joining together: prefilled together
                dummies = [
                    (row, Ticket(Request((0,) * bucket, 1), lambda ids, end: None))
                    for row in range(size)
                ]
                self._busy.update(dummies)
                self._admit(bucket, dummies)
            on_compiled(f"prompt bucket {bucket}")
        for rows in self._row_counts:
            self._decode(np.zeros(rows, bool))
        self._finished = 0
        on_compiled(f"decoding step ({self.rows} slots, {self.steps} steps per dispatch)")

    def buckets(self, up_to: int | None = None) -> list[int]:
        """The prompt buckets of this context, those <= `up_to` when given."""
        found = sorted({prompt_bucket(n, self.context) for n in range(1, self.context)})
        return [b for b in found if up_to is None or b <= up_to]

    def start(self) -> Engine:
        self._thread.start()
        return self

    def close(self, deadline_s: float = 10.0) -> None:
        """Stops admitting; the requests in flight get `deadline_s` to finish, then are ended
        as cancelled (their callers told), as are those still waiting."""
        end = time.monotonic() + deadline_s
        with self._wake:
            self._closing = True
            waiting, self._waiting = list(self._waiting), deque()
        for ticket in waiting:
            ticket.deliver([], CANCELLED)
        while self._busy and time.monotonic() < end and self._thread.is_alive():
            time.sleep(0.01)
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join()
        for ticket in self._busy.values():
            ticket.deliver([], CANCELLED)
        self._busy.clear()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._busy and not self._waiting:
                    self._wake.wait()
                if self._stopping:
                    return
                admitted: list[Ticket] = []
                while self._waiting and len(self._busy) + len(admitted) < self.rows:
                    admitted.append(self._waiting.popleft())
            joining: dict[int, list[tuple[int, Ticket]]] = {}  # bucket -> (row, ticket)
            for ticket in admitted:
                if ticket.cancelled.is_set():
                    ticket.deliver([], CANCELLED)
                    continue
                free = next(row for row in range(self.rows) if row not in self._busy)
                self._busy[free] = ticket
                bucket = prompt_bucket(len(ticket.request.prompt), self.context)
                joining.setdefault(bucket, []).append((free, ticket))
            for bucket, group in joining.items():
                self._admit(bucket, group)
            if self._busy:
                self._dispatch()

    def _admit(self, bucket: int, group: list[tuple[int, Ticket]]) -> None:
        """Prefills the group's prompts (one bucket) together into their rows. The batch is
        padded to a row count (`_row_counts`) with copies of the first prompt, their rows
        dropped, so each bucket compiles for a few batch sizes only."""
        size = next(n for n in self._row_counts if n >= len(group))
        padded = group + [(self.rows, group[0][1])] * (size - len(group))  # row B: dropped
        requests = [ticket.request for _, ticket in padded]
        tokens, masks = left_padded([list(r.prompt) for r in requests], self._pad_id, bucket)
        vocab = self.model.config.vocab_size
        sampling = jax.tree.map(
            lambda *rows: jnp.stack(rows), *(_sampling(r, vocab) for r in requests)
        )
        self._slots, first = slots_lib.admit(
            self.model.params,
            self._slots,
            jnp.asarray(tokens),
            jnp.asarray(masks),
            jnp.asarray([row for row, _ in padded], jnp.int32),
            jnp.asarray([r.max_tokens for r in requests], jnp.int32),
            jnp.asarray(np.stack([self._stops_of(r) for r in requests])),
            sampling,
            # jax.random.key(seed) for each: the keys `generate` is given for the same seeds.
            jax.random.wrap_key_data(jnp.asarray([checks.seed_key(r.seed) for r in requests])),
            config=self.model.config,
        )
        for (row, ticket), token in zip(group, np.asarray(first).tolist(), strict=False):
            self._hand_over(row, ticket, [token])

    def _dispatch(self) -> None:
        """K steps of the busy rows (the first n rows, n the least row count holding them)."""
        for row, ticket in list(self._busy.items()):
            if ticket.cancelled.is_set():
                self._end(row, CANCELLED)
        if not self._busy:
            return
        highest = max(self._busy)
        rows = next(n for n in self._row_counts if n > highest)
        keep = np.zeros(rows, bool)
        keep[list(self._busy)] = True
        tokens, live = self._decode(keep)
        self._recent.append((time.monotonic(), int(live.sum())))
        for row, ticket in list(self._busy.items()):
            self._hand_over(row, ticket, tokens[row][live[row]].tolist())

    def _decode(self, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._slots, emitted = slots_lib.decode(
            self.model.params,
            self._slots,
            jnp.asarray(keep),
            jnp.int32(self._pad_id),
            config=self.model.config,
            steps=self.steps,
            rows=len(keep),
        )
        return np.asarray(emitted.tokens_BxK), np.asarray(emitted.live_BxK)

    def _hand_over(self, row: int, ticket: Ticket, ids: list[int]) -> None:
        """Gives the ticket its new tokens; ends it where it stopped or spent its budget."""
        ticket.emitted += len(ids)
        end = None
        if ids and ids[-1] in self._stops_of(ticket.request):
            end = STOP
        elif ticket.emitted >= ticket.request.max_tokens:
            end = LENGTH
        if ids or end:
            ticket.deliver(ids, end)
        if end is not None:
            self._end(row, None)

    def _stops_of(self, request: Request) -> np.ndarray:
        """The stop ids of a request's row (-1: none)."""
        return np.full_like(self._stops, -1) if request.ignore_eos else self._stops

    def _end(self, row: int, reason: str | None) -> None:
        """Frees the row (its state is overwritten by the next admission into it)."""
        ticket = self._busy.pop(row)
        self._finished += 1
        if reason is not None:
            ticket.deliver([], reason)


def _sampling(request: Request, vocab_size: int) -> Sampling:
    """The request's settings as one row of the slots' (temperature 0 stays 0: greedy)."""
    return Sampling(
        jnp.float32(request.temperature),
        jnp.int32(request.top_k or vocab_size),
        jnp.float32(request.top_p),
        jnp.float32(request.min_p),
        jnp.float32(request.repetition_penalty),
    )
