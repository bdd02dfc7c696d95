"""The tour behind `scanlab demo` / `make demo`: every part of scanlab, end to end, in a minute."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.table import Table

from scanlab import explain, pitfalls, reference
from scanlab.recurrence import LaxScanModule, NNScanModule, lax_scan_in_module
from scanlab.timing import time_call


def run(console: Console) -> None:
    """Prints the tour, section by section."""
    _seed_function(console)
    _scan_semantics(console)
    _pitfalls(console)


def _seed_function(console: Console) -> None:
    console.rule("1. jax.lax.scan inside a Flax module")
    hidden, T = 64, 1000
    x = np.random.default_rng(0).standard_normal(hidden).astype(np.float32)
    cached = time_call(lambda: lax_scan_in_module(0, x, hidden, T), repeats=20)
    module = LaxScanModule(hidden, T)
    textbook = time_call(
        lambda: module.apply(module.init(jax.random.PRNGKey(0), x), x), repeats=3
    )
    variables = module.init(jax.random.PRNGKey(0), x)
    scan_out = module.apply(variables, x)
    twin_out = NNScanModule(hidden, T).apply(variables, x)
    table = Table(title=f"lax_scan_in_module(seed=0, x, hidden={hidden}, T={T})")
    table.add_column("call")
    table.add_column("first", justify="right")
    table.add_column("repeated (median)", justify="right")
    table.add_row("lax_scan_in_module (cached jit)", _ms(cached.first_s), _ms(cached.median_s))
    table.add_row("textbook init + apply", _ms(textbook.first_s), _ms(textbook.median_s))
    console.print(table)
    console.print(
        f"repeated calls: {textbook.median_s / cached.median_s:.0f}x faster than the textbook; "
        f"nn.scan twin vs lax.scan module: max |diff| = "
        f"{float(jnp.max(jnp.abs(scan_out - twin_out))):.1e}"
    )


def _scan_semantics(console: Console) -> None:
    console.rule("2. What scan computes: the blog example")
    carry, ys = reference.scan(explain.blog_body, 0, explain.BLOG_XS)
    jax_carry, jax_ys = jax.lax.scan(explain.blog_body, 0, jnp.asarray(explain.BLOG_XS))
    console.print(
        f"reference.scan: ({carry.item()}, {ys.tolist()})   "
        f"jax.lax.scan: ({int(jax_carry)}, {np.asarray(jax_ys).tolist()})"
    )
    console.print(explain.as_table(explain.trace(explain.blog_body, 0, explain.BLOG_XS)))


def _pitfalls(console: Console) -> None:
    console.rule("3. Pitfalls, reproduced")
    for number, pitfall in enumerate(pitfalls.PITFALLS, start=1):
        result = pitfalls.reproduce(pitfall)
        console.print(f"[bold]{number}. {pitfall.title}[/bold]")
        summary = pitfalls.error_summary(result.error)
        console.print(f"   raises {type(result.error).__name__}: {summary}", markup=False)
        console.print(f"   fix: {pitfall.fixed_code.splitlines()[0]}", markup=False)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"
