"""W1 (seed-function call latency) and W2 (the recurrence h ← tanh(h @ W) against its peers).

Every peer computes the same recurrence on the same shapes: h₀ = tanh(x @ W), T steps of
h ← tanh(h @ W), batch B, width H. Peers with an input path (nn.RNN, torch.nn.RNN) get zero
inputs, so their extra input projection is work scanlab does not do; that is what users would run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scanlab import sharding
from scanlab.recurrence import LaxScanModule, NNScanModule, lax_scan_in_module
from scanlab.timing import interleaved, seconds, time_call

try:
    import torch
except ImportError:  # torch is an optional peer (the `bench` extra)
    torch = None


class Shape(NamedTuple):
    B: int
    H: int
    T: int

    @property
    def flops(self) -> float:
        """Multiply-adds of the T + 1 matmuls, counted as 2 FLOP each."""
        return 2.0 * self.B * self.H * self.H * (self.T + 1)


class PeerTiming(NamedTuple):
    peer: str
    shape: Shape
    first_s: float  # the first call: tracing and compilation included for JAX peers
    median_s: float
    p25_s: float  # quartiles of the steady runs: the spread says what a difference is worth
    p75_s: float
    max_abs_diff: float  # against scanlab's final state


class LatencyResult(NamedTuple):
    scanlab_s: float  # lax_scan_in_module, repeated call
    hand_jit_s: float  # jax.jit(module.apply) with params reused
    textbook_s: float  # init + apply on every call, no jit


SHAPES = (Shape(1, 64, 1000), Shape(1, 256, 10000), Shape(64, 256, 1000), Shape(256, 1024, 200))
QUICK_SHAPES = (Shape(1, 16, 50), Shape(8, 32, 50))


def call_latency(hidden: int = 64, T: int = 1000, repeats: int = 50) -> LatencyResult:
    """W1: one call of the seed function, repeated, vs the alternatives."""
    x = np.random.default_rng(0).standard_normal(hidden).astype(np.float32)
    module = LaxScanModule(hidden, T)
    variables = module.init(jax.random.PRNGKey(0), x)
    apply = jax.jit(module.apply)
    fast = {
        "scanlab": lambda: lax_scan_in_module(0, x, hidden, T),
        "hand": lambda: apply(variables, x),
    }
    for fn in fast.values():
        jax.block_until_ready(fn())
    samples = interleaved(fast, repeats)
    textbook = time_call(
        lambda: module.apply(module.init(jax.random.PRNGKey(0), x), x), max(3, repeats // 10)
    )
    return LatencyResult(
        float(np.median(samples["scanlab"])), float(np.median(samples["hand"])), textbook.median_s
    )


def matmul_rate(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """The machine's limit: FLOP/s of one large float32 matmul, in JAX and (if present) torch."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    a_jax = jnp.asarray(a)
    matmul = jax.jit(lambda m: m @ m)
    rates = {"jax": 2 * n**3 / time_call(lambda: matmul(a_jax), repeats).median_s}
    if torch is not None:
        a_torch = torch.from_numpy(a)
        rates["torch"] = 2 * n**3 / time_call(lambda: a_torch @ a_torch, repeats).median_s
    return rates


def peers(shape: Shape, n_devices: int) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Each peer as `x (B, H) -> final state (B, H)`, all using the W scanlab draws for seed 0."""
    W = np.array(
        LaxScanModule(shape.H, 0).init(jax.random.PRNGKey(0), np.zeros(shape.H))["params"]["W"]
    )  # a writable copy: torch wraps it without copying
    variables = {"params": {"W": jnp.asarray(W)}}
    nn_scan = jax.jit(NNScanModule(shape.H, shape.T).apply)
    result = {
        "scanlab": lambda x: lax_scan_in_module(0, x, shape.H, shape.T),
        "flax nn.scan twin": lambda x: nn_scan(variables, x),
        "flax nn.RNN(SimpleCell)": _flax_rnn(shape, W),
        "numpy loop": lambda x: _numpy_loop(x, W, shape.T),
    }
    if n_devices > 1 and shape.B % n_devices == 0 and shape.B > 1:
        mesh = sharding.batch_mesh(n_devices)
        result[f"scanlab, batch on {n_devices} CPU devices"] = lambda x: lax_scan_in_module(
            0, x, shape.H, shape.T, mesh=mesh
        )
    if torch is not None:
        result["torch nn.RNN"] = _torch_rnn(shape, W)
        result["torch loop"] = _torch_loop(shape, W)
    return result


def measure(
    shape: Shape, n_devices: int = 1, repeats: int = 5, budget_s: float = 1.0
) -> list[PeerTiming]:
    """W2 for one shape: every peer on the same x, timed first and then steady.

    Steady runs are interleaved (`timing.interleaved`), so that a slow patch of a noisy machine,
    or the OpenMP threads torch leaves spinning after its call, hits all peers alike; fast peers
    get more rounds, up to `budget_s` each.
    """
    x = np.random.default_rng(1).standard_normal((shape.B, shape.H)).astype(np.float32)
    runs = peers(shape, n_devices)
    calls = {name: functools.partial(run, x) for name, run in runs.items()}
    first = {name: seconds(call) for name, call in calls.items()}
    slowest = max(seconds(call) for call in calls.values())
    rounds = int(np.clip(budget_s / slowest, repeats, 10 * repeats))
    samples = interleaved(calls, rounds)
    reference = np.asarray(calls["scanlab"]())
    timings = []
    for name, call in calls.items():
        median, p25, p75 = np.percentile(samples[name], [50, 25, 75])
        diff = float(np.abs(np.asarray(call()) - reference).max())
        timings.append(PeerTiming(name, shape, first[name], median, p25, p75, diff))
    return timings


def _numpy_loop(x: np.ndarray, W: np.ndarray, T: int) -> np.ndarray:
    h = np.tanh(x @ W)
    for _ in range(T):
        h = np.tanh(h @ W)
    return h


def _flax_rnn(shape: Shape, W: np.ndarray):
    """nn.RNN(SimpleCell) with W as its recurrent kernel, zero input kernel and bias."""
    cell = nn.SimpleCell(features=shape.H)
    rnn = nn.RNN(cell)
    inputs = jnp.zeros((shape.B, shape.T + 1, shape.H))
    variables = rnn.init(jax.random.PRNGKey(0), inputs)
    params = jax.tree.map(jnp.zeros_like, variables["params"])
    params["cell"]["h"]["kernel"] = jnp.asarray(W)

    def last_state(p, x0):
        states = rnn.apply({"params": p}, inputs, initial_carry=x0)
        return cast(jax.Array, states)[:, -1]

    apply = jax.jit(last_state)
    # SimpleCell computes tanh(x_t·Wi + h·Wh + b) from the carry: start it at x, run T + 1 steps.
    return lambda x: apply(params, jnp.asarray(x))


def _torch_rnn(shape: Shape, W: np.ndarray):
    rnn = torch.nn.RNN(shape.H, shape.H, nonlinearity="tanh", bias=False, batch_first=True)
    with torch.no_grad():
        rnn.get_parameter("weight_ih_l0").zero_()
        rnn.get_parameter("weight_hh_l0").copy_(torch.from_numpy(W).T)  # h @ W_hh.T
    inputs = torch.zeros(shape.B, shape.T + 1, shape.H)

    def run(x):
        with torch.no_grad():
            return rnn(inputs, torch.from_numpy(x)[None])[1][0].numpy()

    return run


def _torch_loop(shape: Shape, W: np.ndarray):
    W_torch = torch.from_numpy(W)

    def run(x):
        with torch.no_grad():
            h = torch.tanh(torch.from_numpy(x) @ W_torch)
            for _ in range(shape.T):
                h = torch.tanh(h @ W_torch)
            return h.numpy()

    return run
