"""The optimizer step, K of them scanned into one compiled call, and the Python-loop twin."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Generic, NamedTuple, Protocol, TypeVar

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from scanlab import checks, sharding
from scanlab.decoder import DecoderParams, forward, init_params, param_specs
from scanlab.train.config import TrainConfig
from scanlab.train.tasks import Task, task_by_name

T = TypeVar("T")  # the leaves: arrays, or their shardings (`state_shardings`)


class TrainState(NamedTuple, Generic[T]):
    """Arrays in a run; `state_shardings` gives the same tree of shardings."""

    params: DecoderParams[T]
    opt_state: optax.OptState
    key: T  # the run's PRNG stream: split once per step for that step's batch
    step: T  # int32, steps taken


class OptimizerSettings(Protocol):
    """What the schedule and the optimizer read: a TrainConfig's or a FinetuneConfig's."""

    @property
    def steps(self) -> int: ...
    @property
    def learning_rate(self) -> float: ...
    @property
    def warmup_steps(self) -> int: ...
    @property
    def weight_decay(self) -> float: ...
    @property
    def clip_norm(self) -> float: ...


class RunSettings(NamedTuple):
    """The run settings a step reads, as traced scalars: runs that differ only in these share
    one compiled program (`program_config`)."""

    learning_rate: jax.Array  # float32, the peak
    warmup_steps: jax.Array  # int32
    steps: jax.Array  # int32, where the cosine decay ends
    weight_decay: jax.Array  # float32
    clip_norm: jax.Array  # float32


def run_settings(config: OptimizerSettings) -> RunSettings:
    return RunSettings(
        jnp.float32(config.learning_rate),
        jnp.int32(config.warmup_steps),
        jnp.int32(config.steps),
        jnp.float32(config.weight_decay),
        jnp.float32(config.clip_norm),
    )


# A config's fields that decide no shape of a step: traced (RunSettings), read only by the initial
# state (the seed), or by the loop around the chunks.
RUN_FIELDS = (
    "steps",
    "chunk_steps",
    "learning_rate",
    "warmup_steps",
    "weight_decay",
    "clip_norm",
    "seed",
    "eval_fraction",
)

C = TypeVar("C", bound="OptimizerSettings")


def program_config(config: C) -> C:
    """The config with its RUN_FIELDS at their defaults: the static argument of the compiled
    step, so runs that differ only in those fields share one program."""
    defaults = {
        field.name: field.default
        for field in dataclasses.fields(config)  # type: ignore[arg-type]
        if field.name in RUN_FIELDS
    }
    return dataclasses.replace(config, **defaults)  # type: ignore[type-var]


def learning_rate(settings: RunSettings) -> optax.Schedule:
    """Linear warm-up to `learning_rate`, then cosine decay to 10% of it at `steps`: optax's
    `warmup_cosine_decay_schedule`, written over traced settings (optax's checks its step
    counts in Python, so they would have to be static)."""

    def schedule(count):
        count = jnp.asarray(count).astype(jnp.float32)
        warmup = settings.warmup_steps.astype(jnp.float32)
        peak = settings.learning_rate
        warming = peak * count / jnp.maximum(warmup, 1.0)
        decay_steps = settings.steps.astype(jnp.float32) - warmup
        progress = jnp.minimum(count - warmup, decay_steps) / decay_steps
        decayed = peak * (0.9 * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)) + 0.1)
        return jnp.where(count < warmup, warming, decayed)

    return schedule


def optimizer(settings: RunSettings) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(settings.clip_norm),
        optax.adamw(learning_rate(settings), weight_decay=settings.weight_decay),
    )


def _init_state(config: TrainConfig) -> TrainState:
    params_key, run_key = jax.random.split(jax.random.PRNGKey(config.seed))
    params = init_params(config.model, params_key)
    opt_state = optimizer(run_settings(config)).init(params)
    return TrainState(params, opt_state, run_key, jnp.zeros((), jnp.int32))


def state_shardings(config: TrainConfig, mesh: Mesh) -> TrainState:
    """NamedShardings of a TrainState on `mesh`: the optimizer's moments follow the params."""
    params = sharding.named(param_specs(config.model, mesh), mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = jax.eval_shape(lambda: _init_state(config))
    opt_state = optax.tree_utils.tree_map_params(
        optimizer(run_settings(config)),
        lambda _, param_sharding: param_sharding,
        abstract.opt_state,
        params,
        transform_non_params=lambda _: replicated,
    )
    return TrainState(params, opt_state, replicated, replicated)


def init_state(config: TrainConfig, mesh: Mesh | None = None) -> TrainState:
    """The state at step 0, placed on `mesh` if one is given.

    It is drawn on one device and then distributed, so every mesh starts from the same numbers
    (`init_params` draws all leaves from one flat normal, which does not partition well).
    """
    state = _init_state(config)
    if mesh is None:
        return state
    sharding.check_divisible("batch_size", config.batch_size, mesh, sharding.DATA_AXIS)
    return jax.device_put(state, state_shardings(config, mesh))


def target_loss(params: DecoderParams, tokens_BxS: jax.Array, task: Task, config: TrainConfig):
    """Mean next-token cross-entropy over the T target positions of each example."""
    logits_BxSxV = forward(params, tokens_BxS[:, :-1], config.model)
    targets_BxT = tokens_BxS[:, task.prompt_length :]
    # Position P-1+t predicts target t.
    logits_BxTxV = logits_BxSxV[:, task.prompt_length - 1 :]
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT).mean()


def train_step(
    state: TrainState, settings: RunSettings, config: TrainConfig, mesh: Mesh | None = None
) -> tuple[TrainState, jax.Array]:
    """One AdamW step on a batch drawn from the state's key; returns (new state, loss).

    On a mesh the batch, drawn whole from one key, is split over "data" right away.
    """
    task = task_by_name(config.task)
    key, batch_key = jax.random.split(state.key)
    tokens = task.sample(batch_key, config.batch_size)
    if mesh is not None:
        tokens = jax.lax.with_sharding_constraint(
            tokens, NamedSharding(mesh, PartitionSpec(sharding.DATA_AXIS, None))
        )
    loss, grads = jax.value_and_grad(target_loss)(state.params, tokens, task, config)
    # optax's bias correction raises a Python float to an int32 step count: allow that one
    # implicit promotion even where a caller has made promotion strict.
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = optimizer(settings).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(params, opt_state, key, state.step + 1), loss


S = TypeVar("S")


def scan_steps(step: Callable[[S], tuple[S, jax.Array]], state: S, steps, length: int):
    """`length` iterations of `step` in one `jax.lax.scan`, the first `steps` (traced) taken and
    the rest skipped: a run's last, shorter chunk reuses its full chunks' program. Returns (state,
    losses (length,)), a skipped step's loss 0."""

    def body(s, i):
        return jax.lax.cond(i < steps, step, lambda s: (s, jnp.zeros((), jnp.float32)), s)

    return jax.lax.scan(body, state, jnp.arange(length))


def check_steps(steps: int, length: int | None) -> int:
    """The scan's length: `length`, or `steps` when None; `steps` within 1..length."""
    length = steps if length is None else length
    checks.static_int("length", length, minimum=1)
    checks.static_int("steps", steps, minimum=1, maximum=length)
    return length


# The state is donated: parameters and optimizer moments are updated in place between calls.
@functools.partial(jax.jit, static_argnames=("config", "length", "mesh"), donate_argnums=0)
def _train_chunk(state, settings, steps, *, config: TrainConfig, length: int, mesh):
    return scan_steps(lambda s: train_step(s, settings, config, mesh), state, steps, length)


def train_chunk(
    state: TrainState,
    *,
    config: TrainConfig,
    steps: int,
    mesh: Mesh | None = None,
    length: int | None = None,
):
    """`steps` optimizer steps in one compiled call: a `jax.lax.scan` over `train_step`.

    One program serves every run of the same shapes: the run settings are traced
    (`program_config`), and the scan runs `length` iterations (default `steps`), the ones past
    `steps` skipped. The state is donated. On a mesh, pass a state from
    `init_state(config, mesh)`: the step follows its shardings.

    Returns:
      (state after the steps, per-step losses of shape (steps,)).
    """
    length = check_steps(steps, length)
    state, losses = _train_chunk(
        state,
        run_settings(config),
        jnp.int32(steps),
        config=program_config(config),
        length=length,
        mesh=mesh,
    )
    return state, losses[:steps]


_jitted_step = jax.jit(train_step, static_argnames=("config", "mesh"), donate_argnums=0)


def train_loop(state: TrainState, *, config: TrainConfig, steps: int, mesh: Mesh | None = None):
    """The usual alternative, for comparison: a Python loop over a jitted step."""
    settings, program = run_settings(config), program_config(config)
    losses = []
    for _ in range(steps):
        state, loss = _jitted_step(state, settings, program, mesh)
        if mesh is not None:
            # On XLA's CPU client, several sharded steps in flight at once can deadlock in their
            # collectives (each device thread waits in a different step): run one at a time.
            jax.block_until_ready(loss)
        losses.append(loss)
    return state, jnp.stack(losses)
