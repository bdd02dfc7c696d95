"""The `scanlab` command. Parses arguments, calls the library, prints; errors become one line."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.syntax import Syntax

from scanlab import explain, pitfalls, tour
from scanlab.recurrence import lax_scan_in_module

app = typer.Typer(
    help="Loops the JAX way: jax.lax.scan over time, layers, tokens and training steps.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()


@app.command()
def run(
    seed: Annotated[int, typer.Option(help="PRNGKey seed for W, in [0, 2**32).")] = 0,
    hidden: Annotated[int, typer.Option(help="State width H.")] = 4,
    T: Annotated[int, typer.Option("--T", "-T", help="Recurrence steps after the first.")] = 10,
    x: Annotated[
        str | None, typer.Option(help="Comma-separated input of length H (default: ones).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print lax_scan_in_module(seed, x, hidden, T): the final hidden state."""
    x_values = np.ones(hidden, np.float32) if x is None else _parse_floats("--x", x)
    final = np.asarray(lax_scan_in_module(seed, x_values, hidden, T)).tolist()
    if as_json:
        print(json.dumps({"seed": seed, "hidden": hidden, "T": T, "final": final}))
    else:
        console.print(final)


@app.command("explain")
def explain_command() -> None:
    """Walk through the blog example scan(lambda c, x: (c + x, x + 2), 0, [1, 2, 3])."""
    steps = explain.trace(explain.blog_body, 0, explain.BLOG_XS)
    console.print(explain.as_table(steps, title="scan(lambda c, x: (c + x, x + 2), 0, [1, 2, 3])"))
    console.print(f"result: ({steps[-1].carry_out.item()}, {[s.y.item() for s in steps]})")


@app.command("pitfalls")
def pitfalls_command() -> None:
    """Reproduce each pitfall: the wrong code, the error it raises today, the fix."""
    for number, pitfall in enumerate(pitfalls.PITFALLS, start=1):
        result = pitfalls.reproduce(pitfall)
        console.rule(f"{number}. {pitfall.title}")
        console.print("[red]wrong:[/red]")
        console.print(Syntax(pitfall.wrong_code, "python"))
        console.print(f"[red]raises {type(result.error).__name__}:[/red]")
        console.print(pitfalls.error_summary(result.error), markup=False, highlight=False)
        console.print("[green]fix:[/green]")
        console.print(Syntax(pitfall.fixed_code, "python"))
        console.print(f"[green]fixed result:[/green] {np.asarray(_first(result.fixed_result))}")
        console.print(f"why: {pitfall.why}")


@app.command()
def demo() -> None:
    """The tour: every part of scanlab, end to end."""
    tour.run(console)


def _parse_floats(name: str, text: str) -> np.ndarray:
    try:
        return np.array([float(item) for item in text.split(",")], np.float32)
    except ValueError:
        raise ValueError(f"{name} must be comma-separated numbers, got {text!r}") from None


def _first(result):
    return result[0] if isinstance(result, tuple) else result


def main() -> None:
    """Entry point: library errors (bad arguments) print as one line and exit with status 2."""
    try:
        app()
    except (ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
