"""A step-by-step trace of a scan: what went in and came out at every iteration.

The trace runs on `scanlab.reference`, so it shows exactly what `jax.lax.scan` computes, one step at
a time, with concrete values (no tracers):

    >>> steps = trace(blog_body, 0, BLOG_XS)
    >>> [(s.carry_in.item(), s.x.item(), s.carry_out.item(), s.y.item()) for s in steps]
    [(0, 1, 1, 3), (1, 2, 3, 4), (3, 3, 6, 5)]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from scanlab import reference

# The blog's example: scan(lambda x, y: (x + y, y + 2), 0, [1, 2, 3]) == (6, [3, 4, 5]), with xs
# as an array (as a Python list it would be three 0-d leaves, which scan rejects).
BLOG_XS = np.array([1, 2, 3])


def blog_body(carry, x):
    """The blog's body: the carry accumulates x, the output is x + 2."""
    return carry + x, x + 2


def trace(
    f: Callable[[Any, Any], tuple[Any, Any]],
    init: Any,
    xs: Any = None,
    length: int | None = None,
    reverse: bool = False,
) -> list[reference.Step]:
    """Runs the scan and returns every step in execution order (see `reference.scan`)."""
    return list(reference.iterate(f, init, xs, length, reverse))
