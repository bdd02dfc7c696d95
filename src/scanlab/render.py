"""Rendering for the CLI and the tour: text, rich tables and progress bars.

Library modules return data; this module turns it into something to show, and only the CLI and
the tour print it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:  # types only: rendering runs no model and no benchmark
    from scanlab.bench.layers import LayerPoint
    from scanlab.reference import Step
    from scanlab.train import ChunkReport
    from scanlab.train.evaluation import Evaluation


def shape_listing(tree: Any, indent: int = 0) -> str:
    """A NamedTuple of shape tuples in the blog's layout, one field per line.

    >>> print(shape_listing(Attention(q_proj=(4, 2), k_proj=(4,), v_proj=(4,), out_proj=(2, 4))))
    Attention(
      q_proj=(4, 2),
      ...
    )
    """
    if _is_shape(tree):
        return f"({tree[0]})" if len(tree) == 1 else str(tree)
    pad = "  " * (indent + 1)
    fields = ",\n".join(
        f"{pad}{name}={shape_listing(value, indent + 1)}"
        for name, value in tree._asdict().items()
        if value is not None  # a leaf this config does not declare (e.g. Llama's biases)
    )
    return f"{type(tree).__name__}(\n{fields}\n{'  ' * indent})"


def _is_shape(node: Any) -> bool:
    return isinstance(node, tuple) and not hasattr(node, "_fields")


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def count(n: int) -> str:
    """6738415616 -> '6.74 B (6,738,415,616)'."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f} {suffix} ({n:,})"
    return str(n)


def seconds(value: float) -> str:
    return f"{value:.2f} s"


def mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.1f} MiB"


def steps_table(steps: list[Step], title: str = "scan, step by step") -> Table:
    """One row per step of a scan trace: step, carry in, x, carry out, y."""
    table = Table(title=title)
    for column in ("step", "carry in", "x", "carry out", "y"):
        table.add_column(column, justify="right" if column == "step" else "left")
    for step in steps:
        table.add_row(
            str(step.index), *map(_plain, (step.carry_in, step.x, step.carry_out, step.y))
        )
    return table


def _plain(tree: Any) -> str:
    """Arrays as nested lists, so a 0-d int prints as `3` and a vector as `[1, 2]`."""
    plain = jax.tree_util.tree_map(lambda leaf: np.asarray(leaf).tolist(), tree)
    return "None" if plain is None else str(plain)


def layer_table(point: LayerPoint) -> Table:
    """Scan vs loop over layers for one model: agreement, compile and run times."""
    table = Table(
        title=f"{point.n_layers} layers: lax.scan vs a Python loop "
        f"(max |logit diff| {point.max_abs_diff:.1e})"
    )
    for column in ("", "compile", "run (median)"):
        table.add_column(column, justify="right" if column else "left")
    table.add_row("lax.scan over layers", seconds(point.scan_compile_s), ms(point.scan_run_s))
    table.add_row("Python loop over layers", seconds(point.loop_compile_s), ms(point.loop_run_s))
    table.add_row(
        "loop / scan",
        f"{point.loop_compile_s / point.scan_compile_s:.1f}x",
        f"{point.loop_run_s / point.scan_run_s:.2f}x",
    )
    return table


@contextlib.contextmanager
def training_progress(
    console: Console, description: str, total_steps: int
) -> Iterator[Callable[[ChunkReport], None]]:
    """A progress bar for a training run; yields the `on_chunk` callback that advances it.

    When the console is not a terminal (output to a file or a pipe) a bar would show nothing
    until the end: each chunk prints one plain line instead, so a log file shows progress. A run
    that had no chunk to run (resumed when finished) says so.
    """
    reports: list[ChunkReport] = []
    with _drawn(console, description, total_steps) as draw:

        def on_chunk(report: ChunkReport) -> None:
            reports.append(report)
            draw(report)

        yield on_chunk
    if not reports:
        console.print(
            f"{description}: nothing to train, the run is finished ({total_steps} of "
            f"{total_steps} steps); a larger --steps extends it",
            highlight=False,
            soft_wrap=True,
        )


@contextlib.contextmanager
def _drawn(
    console: Console, description: str, total_steps: int
) -> Iterator[Callable[[ChunkReport], None]]:
    """What `training_progress` shows of each chunk: a bar on a terminal, else a line (and,
    until the first, a line every `WAITING_LINE_S`: a log shows the run alive while the first
    chunk compiles)."""
    if not console.is_terminal:
        first = threading.Event()

        def log_line(report: ChunkReport) -> None:
            first.set()
            console.print(
                f"{description}: step {report.step}/{report.total_steps}, "
                f"loss {report.mean_loss:.4f}, {_speed(report)}{_extra(report)}",
                highlight=False,
                soft_wrap=True,
            )

        preparing = f"{description}: preparing the first chunk (loading, compiling)"
        with _until(first, console, preparing):
            yield log_line
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[speed]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task(description, total=total_steps, loss="-", speed="")

        def update(report: ChunkReport) -> None:
            held_out = "" if report.eval_loss is None else f", held-out {report.eval_loss:.4f}"
            progress.update(
                bar,
                completed=report.step,
                loss=f"{report.mean_loss:.4f}{held_out}",
                speed=_speed(report),
            )

        yield update


WAITING_LINE_S = 30.0


@contextlib.contextmanager
def _until(done: threading.Event, console: Console, doing: str) -> Iterator[None]:
    """Prints `doing` and the seconds waited every `WAITING_LINE_S` until `done` is set or the
    block ends."""
    start = time.monotonic()

    def tick() -> None:
        while not done.wait(WAITING_LINE_S):
            console.print(f"{doing}: {time.monotonic() - start:.0f} s", highlight=False)

    ticker = threading.Thread(target=tick, name="scanlab-waiting", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()


def _speed(report: ChunkReport) -> str:
    if report.tokens_per_s is not None:
        return f"{report.steps_per_s:.2f} steps/s, {report.tokens_per_s:.0f} tokens/s"
    return f"{report.steps_per_s:.0f} steps/s"


def _extra(report: ChunkReport) -> str:
    held_out = "" if report.eval_loss is None else f", held-out loss {report.eval_loss:.4f}"
    return held_out + (", checkpoint saved" if report.checkpointed else "")


def evaluation(evaluation: Evaluation, step: int) -> tuple[str, Table]:
    """Held-out exact-match accuracy (a line) and a table of a few generated answers."""
    line = f"held-out exact-match accuracy after {step} steps: {evaluation.accuracy:.1%}"
    table = Table(title="held-out examples, answers generated greedily")
    for column in ("question", "expected", "model", ""):
        table.add_column(column)
    for sample in evaluation.samples:
        mark = "[green]✓[/green]" if sample.predicted == sample.expected else "[red]✗[/red]"
        table.add_row(sample.question, sample.expected, sample.predicted, mark)
    return line, table
