"""The fine-tuning step, K of them scanned into one compiled call, and the Python-loop twin.

The trainable tree is the LoRA adapters (the base weights passed beside it, frozen: no
gradients, no optimizer state) or, for full fine-tuning, the whole DecoderParams. Each step
draws its batch's rows from the training rows held on the device, runs it as `accumulate`
micro-batches (a `lax.scan` summing their gradients), clips and applies AdamW.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from scanlab.decoder.config import DecoderConfig
from scanlab.decoder.model import forward
from scanlab.decoder.params import DecoderParams
from scanlab.errors import ArgumentError
from scanlab.finetune import adapters
from scanlab.finetune.config import FinetuneConfig
from scanlab.finetune.data import Rows
from scanlab.train.step import (
    RunSettings,
    check_steps,
    optimizer,
    program_config,
    run_settings,
    scan_steps,
)


class FinetuneState(NamedTuple):
    """Arrays in a fine-tuning run: what a checkpoint holds (the frozen base is not in it)."""

    trainable: adapters.Adapters | DecoderParams  # the LoRA adapters, or every weight
    opt_state: optax.OptState
    key: jax.Array  # the run's PRNG stream: split once per step
    step: jax.Array  # int32, steps taken


def init_state(
    config: FinetuneConfig, model_config: DecoderConfig, params: DecoderParams
) -> FinetuneState:
    """The state at step 0: fresh adapters (PEFT's start) or, for full fine-tuning, a copy of
    `params` (the chunks donate the state: the caller's arrays stay theirs)."""
    adapter_key, run_key = jax.random.split(jax.random.PRNGKey(config.seed))
    if config.lora is None:
        trainable = jax.tree.map(lambda leaf: jnp.array(leaf, copy=True), params)
    else:
        trainable = adapters.init_adapters(model_config, config.lora, adapter_key)
    state_opt = optimizer(run_settings(config)).init(trainable)
    return FinetuneState(trainable, state_opt, run_key, jnp.zeros((), jnp.int32))


def model_params(trainable, frozen: DecoderParams | None, config: FinetuneConfig, key=None):
    """The DecoderParams the forward pass runs: the base with the adapters, or `trainable`."""
    if config.lora is None:
        return trainable
    if frozen is None:
        raise ArgumentError("LoRA adapters need the frozen base params, got None")
    return adapters.adapt(frozen, trainable, config.lora, key)


def summed_loss(
    params: DecoderParams, rows: Rows, model_config: DecoderConfig, remat: str = "none"
) -> tuple[jax.Array, jax.Array]:
    """(sum of next-token cross-entropies over the target positions, their count) of rows
    (B, S): position s-1 predicts token s where `rows.targets[:, s]`."""
    logits_BxSxV = forward(
        params, rows.tokens[:, :-1], model_config, attn_mask=rows.mask[:, :-1], remat=remat
    )
    losses_BxS = optax.softmax_cross_entropy_with_integer_labels(logits_BxSxV, rows.tokens[:, 1:])
    weights_BxS = rows.targets[:, 1:].astype(jnp.float32)
    return (losses_BxS * weights_BxS).sum(), weights_BxS.sum()


def finetune_step(
    state: FinetuneState,
    frozen: DecoderParams | None,
    data: Rows,
    settings: RunSettings,
    config: FinetuneConfig,
    model_config: DecoderConfig,
) -> tuple[FinetuneState, jax.Array]:
    """One AdamW step on `batch_size` rows of `data` drawn from the state's key; returns (new
    state, the batch's mean loss per target token)."""
    key, rows_key, dropout_key = jax.random.split(state.key, 3)
    rows = jax.random.permutation(rows_key, len(data))[: config.batch_size]
    micro_rows = rows.reshape(config.accumulate, config.micro_batch)

    def micro_batch(carry, inputs):
        grads, loss_sum, count = carry
        index, chosen = inputs

        def loss_of(trainable):
            params = model_params(trainable, frozen, config, jax.random.fold_in(dropout_key, index))
            return summed_loss(params, data.take(chosen), model_config, config.remat)

        (loss, n), g = jax.value_and_grad(loss_of, has_aux=True)(state.trainable)
        return (jax.tree.map(jnp.add, grads, g), loss_sum + loss, count + n), None

    zeros = jax.tree.map(jnp.zeros_like, state.trainable)
    carry = (zeros, jnp.zeros(()), jnp.zeros(()))
    (grads, loss_sum, count), _ = jax.lax.scan(
        micro_batch, carry, (jnp.arange(config.accumulate), micro_rows)
    )
    count = jnp.maximum(count, 1.0)  # a batch with no target tokens has zero gradients
    grads = jax.tree.map(lambda g: g / count, grads)
    with jax.numpy_dtype_promotion("standard"):  # optax's bias correction: see train.step
        updates, opt_state = optimizer(settings).update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    return FinetuneState(trainable, opt_state, key, state.step + 1), loss_sum / count


# The state is donated: adapters (or weights) and moments are updated in place between calls;
# the frozen base and the rows are read, never copied.
@functools.partial(jax.jit, static_argnames=("config", "model_config", "length"), donate_argnums=0)
def _finetune_chunk(state, frozen, data, settings, steps, *, config, model_config, length):
    def step(s):
        return finetune_step(s, frozen, data, settings, config, model_config)

    return scan_steps(step, state, steps, length)


def finetune_chunk(
    state: FinetuneState,
    frozen: DecoderParams | None,
    data: Rows,
    *,
    config: FinetuneConfig,
    model_config: DecoderConfig,
    steps: int,
    length: int | None = None,
) -> tuple[FinetuneState, jax.Array]:
    """`steps` optimizer steps in one compiled call: a `jax.lax.scan` over `finetune_step`.

    As `train.train_chunk`: the run settings are traced, and the scan runs `length` iterations
    (default `steps`), those past `steps` skipped, so one program serves a run's every chunk.

    Returns:
      (state after the steps, per-step losses of shape (steps,)).
    """
    args, static = _chunk_arguments(state, frozen, data, config, model_config, steps, length)
    state, losses = _finetune_chunk(*args, **static)
    return state, losses[:steps]


def compiled_chunk(state, frozen, data: Rows, *, config, model_config, steps: int):
    """The compiled program `finetune_chunk` runs for these arguments (for XLA's memory
    analysis); `state` may be abstract (`jax.eval_shape`)."""
    args, static = _chunk_arguments(state, frozen, data, config, model_config, steps, None)
    return _finetune_chunk.lower(*args, **static).compile()


def _chunk_arguments(state, frozen, data, config, model_config, steps: int, length: int | None):
    """(traced arguments, static ones) of `_finetune_chunk`: the run settings traced."""
    length = check_steps(steps, length)
    args = (state, frozen, data, run_settings(config), jnp.int32(steps))
    return args, {"config": program_config(config), "model_config": model_config, "length": length}


_jitted_step = jax.jit(finetune_step, static_argnames=("config", "model_config"), donate_argnums=0)


def finetune_loop(state, frozen, data, *, config, model_config, steps: int):
    """The usual alternative, for comparison: a Python loop over a jitted step."""
    settings, program = run_settings(config), program_config(config)
    losses = []
    for _ in range(steps):
        state, loss = _jitted_step(state, frozen, data, settings, program, model_config)
        losses.append(loss)
    return state, jnp.stack(losses)


def evaluation_loss(
    trainable, frozen, data: Rows, *, config: FinetuneConfig, model_config: DecoderConfig
) -> jax.Array:
    """The mean loss per target token over all of `data`, `micro_batch` rows at a time."""
    return _evaluation_loss(
        trainable, frozen, data, config=program_config(config), model_config=model_config
    )


@functools.partial(jax.jit, static_argnames=("config", "model_config"))
def _evaluation_loss(trainable, frozen, data: Rows, *, config, model_config) -> jax.Array:
    size = config.micro_batch
    padded = -len(data) % size  # rows without targets: they add nothing
    batches = jax.tree.map(
        lambda a: jnp.pad(a, ((0, padded), (0, 0))).reshape(-1, size, a.shape[1]), data
    )
    params = model_params(trainable, frozen, config)

    def batch_loss(_, rows):
        return None, summed_loss(params, Rows(*rows), model_config)

    _, (sums, counts) = jax.lax.scan(batch_loss, None, tuple(batches))
    return sums.sum() / jnp.maximum(counts.sum(), 1.0)
