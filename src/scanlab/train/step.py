"""The optimizer step, K of them scanned into one compiled call, and the Python-loop twin."""

from __future__ import annotations

import functools
from typing import Generic, NamedTuple, Protocol, TypeVar

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from scanlab import sharding
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


def learning_rate(config: OptimizerSettings) -> optax.Schedule:
    """Linear warm-up to `learning_rate`, then cosine decay to 10% of it at `steps`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=config.steps,
        end_value=config.learning_rate * 0.1,
    )


def optimizer(config: OptimizerSettings) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(learning_rate(config), weight_decay=config.weight_decay),
    )


def _init_state(config: TrainConfig) -> TrainState:
    params_key, run_key = jax.random.split(jax.random.PRNGKey(config.seed))
    params = init_params(config.model, params_key)
    return TrainState(params, optimizer(config).init(params), run_key, jnp.zeros((), jnp.int32))


def state_shardings(config: TrainConfig, mesh: Mesh) -> TrainState:
    """NamedShardings of a TrainState on `mesh`: the optimizer's moments follow the params."""
    params = sharding.named(param_specs(config.model, mesh), mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = jax.eval_shape(lambda: _init_state(config))
    opt_state = optax.tree_utils.tree_map_params(
        optimizer(config),
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
    state: TrainState, config: TrainConfig, mesh: Mesh | None = None
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
        updates, opt_state = optimizer(config).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(params, opt_state, key, state.step + 1), loss


# The state is donated: parameters and optimizer moments are updated in place between calls.
@functools.partial(jax.jit, static_argnames=("config", "steps", "mesh"), donate_argnums=0)
def train_chunk(state: TrainState, *, config: TrainConfig, steps: int, mesh: Mesh | None = None):
    """`steps` optimizer steps in one compiled call: a `jax.lax.scan` over `train_step`.

    On a mesh, pass a state from `init_state(config, mesh)`: the step follows its shardings.

    Returns:
      (state after the steps, per-step losses of shape (steps,)).
    """
    return jax.lax.scan(lambda s, _: train_step(s, config, mesh), state, None, length=steps)


_jitted_step = jax.jit(train_step, static_argnames=("config", "mesh"), donate_argnums=0)


def train_loop(state: TrainState, *, config: TrainConfig, steps: int, mesh: Mesh | None = None):
    """The usual alternative, for comparison: a Python loop over a jitted step."""
    losses = []
    for _ in range(steps):
        state, loss = _jitted_step(state, config, mesh)
        if mesh is not None:
            # On XLA's CPU client, several sharded steps in flight at once can deadlock in their
            # collectives (each device thread waits in a different step): run one at a time.
            jax.block_until_ready(loss)
        losses.append(loss)
    return state, jnp.stack(losses)
