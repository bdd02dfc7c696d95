"""W3: scan over layers vs a Python loop over layers — compile time, run time, memory with remat."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from scanlab import sharding
from scanlab.decoder import (
    REMAT,
    DecoderConfig,
    forward,
    forward_loop,
    init_params,
    shard_params,
)
from scanlab.timing import compile_seconds, temp_bytes, time_call


class LayerPoint(NamedTuple):
    n_layers: int
    scan_compile_s: float
    loop_compile_s: float
    scan_run_s: float  # median steady forward
    loop_run_s: float
    max_abs_diff: float  # between the scan's and the loop's logits


class ShardedPoint(NamedTuple):
    mesh_shape: dict
    run_s: float  # median steady forward of the scanned model on the mesh
    max_abs_diff: float  # against the same forward on one device


class RematPoint(NamedTuple):
    n_layers: int
    policy: str  # a name in scanlab.decoder.REMAT
    temp_bytes: int  # XLA's compiled temp allocation for forward + backward
    grad_s: float  # median steady gradient step


def block_config(n_layers: int, d_model: int = 256, seq: int = 128) -> DecoderConfig:
    """The measured block: RMSNorm + 4-head attention + SwiGLU at width D, sequence S."""
    return DecoderConfig(
        vocab_size=256,
        n_layers=n_layers,
        d_model=d_model,
        n_heads=4,
        n_kv_heads=4,
        head_dim=d_model // 4,
        mlp_dim=_round_up(8 * d_model // 3, 16),
        max_seq_len=seq,
    )


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _inputs(config: DecoderConfig, batch: int):
    params = init_params(config, jax.random.PRNGKey(0))
    tokens = jax.random.randint(
        jax.random.PRNGKey(1), (batch, config.max_seq_len), 0, config.vocab_size
    )
    return params, tokens


def measure(
    n_layers: int,
    *,
    d_model: int = 256,
    seq: int = 128,
    batch: int = 1,
    repeats: int = 5,
    compiles: int = 3,
) -> LayerPoint:
    """Compiles and runs the scanned and the looped forward on the same params and tokens.

    Compile time is the median of `compiles` fresh compilations (a new jit object each time,
    so nothing is reused from an earlier one).
    """
    config = block_config(n_layers, d_model, seq)
    params, tokens = _inputs(config, batch)
    results = {}
    for name, fn in (("scan", forward), ("loop", forward_loop)):
        compile_runs = [
            compile_seconds(jax.jit(functools.partial(fn, config=config)), params, tokens)
            for _ in range(compiles)
        ]
        compiled = compile_runs[0][0]
        compile_s = float(np.median([seconds for _, seconds in compile_runs]))
        timing = time_call(functools.partial(compiled, params, tokens), repeats)
        results[name] = (compile_s, timing.median_s, compiled(params, tokens))
    diff = float(jnp.max(jnp.abs(results["scan"][2] - results["loop"][2])))
    return LayerPoint(
        n_layers,
        results["scan"][0],
        results["loop"][0],
        results["scan"][1],
        results["loop"][1],
        diff,
    )


def measure_remat(
    n_layers: int,
    *,
    d_model: int = 256,
    seq: int = 128,
    batch: int = 1,
    repeats: int = 3,
    policies: Sequence[str] = tuple(REMAT),
) -> list[RematPoint]:
    """Temp memory and time of a training gradient of the scanned model, per remat policy."""
    config = block_config(n_layers, d_model, seq)
    params, tokens = _inputs(config, batch)
    points = []
    for policy in policies:

        def loss(p, policy=policy):
            logits = forward(p, tokens, config, remat=policy)
            return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        timing = time_call(functools.partial(compiled, params), repeats)
        temp = temp_bytes(compiled)
        points.append(RematPoint(n_layers, policy, temp, timing.median_s))
    return points


def measure_sharded(
    n_layers: int,
    mesh: Mesh,
    *,
    d_model: int = 256,
    seq: int = 128,
    batch: int = 1,
    repeats: int = 5,
) -> ShardedPoint:
    """The scanned forward with params and batch sharded on `mesh`, against one device."""
    config = block_config(n_layers, d_model, seq)
    params, tokens = _inputs(config, batch)
    forward_fn = jax.jit(functools.partial(forward, config=config))
    single = forward_fn(params, tokens)
    sharded_params = shard_params(params, config, mesh)
    sharded_tokens = sharding.shard_batch(tokens, mesh, "tokens")
    timing = time_call(lambda: forward_fn(sharded_params, sharded_tokens), repeats)
    diff = float(jnp.max(jnp.abs(forward_fn(sharded_params, sharded_tokens) - single)))
    return ShardedPoint(dict(mesh.shape), timing.median_s, diff)
