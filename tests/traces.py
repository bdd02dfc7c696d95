"""Counting the programs JAX traces, through `jax.monitoring`'s public trace events.

A jitted function traced again is compiled again: tests that a call compiles once per signature
count its traces inside `traced()`.
"""

import collections
import contextlib

import jax

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"


@contextlib.contextmanager
def traced():
    """Yields a Counter: function name -> how many times JAX traced it inside the block."""
    counts: collections.Counter[str] = collections.Counter()

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == TRACE_EVENT:
            counts[kwargs.get("fun_name", "")] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
