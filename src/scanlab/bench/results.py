"""Reading a benchmark run's figures (the dict `runner.run` returns, as results.json holds it):
shared by the targets, the markdown and the plots."""

from __future__ import annotations

from collections import defaultdict

from scanlab.bench.recurrence import Shape


def by_shape(results: dict) -> dict[Shape, list[dict]]:
    """W2's timings grouped by shape (B, H, T)."""
    grouped = defaultdict(list)
    for t in results["recurrence"]:
        grouped[Shape(**t["shape"])].append(t)
    return dict(grouped)


def best_scanlab(timings: list[dict]) -> dict:
    return min((t for t in timings if t["peer"].startswith("scanlab")), key=lambda t: t["median_s"])


def contender(decoding: dict, name: str, batch: int) -> dict | None:
    """W7's figures of one contender at one batch size (None when it did not run)."""
    return next(
        (c for c in decoding["contenders"] if c["name"] == name and c["batch"] == batch), None
    )


def bound(decoding: dict, dtype: str, batch: int) -> float:
    """W7's bandwidth bound in tokens/s for "f32" or "bf16" weights at one batch size."""
    return next(
        b["tokens_per_s"] for b in decoding["bounds"] if b["dtype"] == dtype and b["batch"] == batch
    )


def first_token_s(figures: dict, prompt: int) -> float | None:
    """W17: one contender's median seconds to the first token of a `prompt`-token prompt."""
    return next((r["seconds"] for r in figures["first_token"] if r["prompt"] == prompt), None)


def decode_rate(figures: dict, batch: int) -> float | None:
    """W17: one contender's decoding tokens/s at `batch` rows (None: not run or not possible)."""
    return next((r["tokens_per_s"] for r in figures["decode"] if r["batch"] == batch), None)
