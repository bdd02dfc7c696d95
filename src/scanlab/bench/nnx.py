"""W12: the same loops in linen, NNX and plain JAX — compile and run time side by side.

The recurrence in its four forms (linen / NNX × raw `lax.scan` / lifted scan) on one W, each
called the way users call it (`jax.jit(module.apply)` for linen, `nnx.jit` for NNX), plus the
two cached entry points; and the decoder's layer stack, functional vs the two NNX forms.
"""

from __future__ import annotations

import functools
import time
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx

from scanlab import decoder
from scanlab.bench.layers import block_config
from scanlab.nnx import NNXDecoder
from scanlab.nnx.recurrence import (
    NNXLaxScanModule,
    NNXScanModule,
    from_linen,
    nnx_lax_scan_in_module,
)
from scanlab.recurrence import LaxScanModule, NNScanModule, lax_scan_in_module
from scanlab.timing import interleaved


class FormTiming(NamedTuple):
    form: str
    first_s: float  # first call: trace + compile + run
    median_s: float  # steady call, interleaved with the other forms


def _time_forms(forms: dict, rounds: int) -> list[FormTiming]:
    firsts = {}
    for name, fn in forms.items():
        start = time.perf_counter()
        jax.block_until_ready(fn())
        firsts[name] = time.perf_counter() - start
    samples = interleaved(forms, rounds)
    return [FormTiming(name, firsts[name], float(np.median(samples[name]))) for name in forms]


def recurrence_forms(B: int, H: int, T: int, rounds: int = 9) -> list[FormTiming]:
    """The recurrence h ← tanh(h @ W) on x (B, H), every form on one W."""
    x = np.random.default_rng(0).standard_normal((B, H)).astype(np.float32)
    variables = LaxScanModule(H, T).init(jax.random.PRNGKey(0), x)
    linen_raw = jax.jit(LaxScanModule(H, T).apply)
    linen_lifted = jax.jit(NNScanModule(H, T).apply)
    nnx_raw = from_linen(variables, T, cls=NNXLaxScanModule)
    nnx_lifted = from_linen(variables, T, cls=NNXScanModule)
    call = nnx.jit(lambda module, x: module(x))
    forms = {
        "linen, raw lax.scan": lambda: linen_raw(variables, x),
        "linen, nn.scan": lambda: linen_lifted(variables, x),
        "NNX, raw lax.scan": lambda: call(nnx_raw, x),
        "NNX, nnx.scan": lambda: call(nnx_lifted, x),
        "lax_scan_in_module (linen, cached)": lambda: lax_scan_in_module(0, x, H, T),
        "nnx_lax_scan_in_module (cached)": lambda: nnx_lax_scan_in_module(0, x, H, T),
    }
    return _time_forms(forms, rounds)


def layer_stack_forms(
    n_layers: int, d_model: int = 256, seq: int = 128, rounds: int = 5
) -> list[FormTiming]:
    """The decoder forward, functional `decoder.forward` vs the NNX stack's two forms."""
    config = block_config(n_layers, d_model, seq)
    params = decoder.init_params(config, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (1, seq), 0, config.vocab_size)
    functional = jax.jit(decoder.forward, static_argnames="config")
    call = nnx.jit(lambda model, tokens: model(tokens))
    models = {
        form: NNXDecoder.from_params(params, config, layer_scan=form)
        for form in ("nnx.scan", "split-lax.scan-merge")
    }
    # nnx.jit hands the module's whole state in and out on every call; splitting once and
    # jitting the pure function of (graphdef, state) avoids that per-call cost.
    graphdef, state = nnx.split(models["nnx.scan"])
    pure = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
    forms = {"functional, lax.scan": lambda: functional(params, tokens, config)}
    forms |= {
        f"NNX {form}, nnx.jit": functools.partial(call, model, tokens)
        for form, model in models.items()
    }
    forms["NNX nnx.scan, split once + jax.jit"] = lambda: pure(state, tokens)
    return _time_forms(forms, rounds)
