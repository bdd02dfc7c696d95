"""The benchmark report's plots, drawn with matplotlib's `Figure` (no pyplot, no backend)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from scanlab.bench.contender import SCANLAB
from scanlab.bench.results import bound, by_shape, decode_rate


def recurrence(results: dict, path: Path) -> None:
    """W2: median time per call of each peer at each shape (log scale)."""
    grouped = by_shape(results)
    peers = list(dict.fromkeys(t["peer"] for t in results["recurrence"]))
    fig = Figure(figsize=(10, 4.5))
    ax = fig.subplots()
    width = 0.8 / len(peers)
    for i, peer in enumerate(peers):
        values = [
            next((t["median_s"] * 1e3 for t in ts if t["peer"] == peer), np.nan)
            for ts in grouped.values()
        ]
        ax.bar(np.arange(len(grouped)) + i * width, values, width, label=peer)
    ax.set_xticks(
        np.arange(len(grouped)) + 0.4 - width / 2, [f"B={b} H={h} T={t}" for b, h, t in grouped]
    )
    ax.set(yscale="log", ylabel="median ms (log)", title="h ← tanh(h @ W): time per call")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def layers(results: dict, path: Path) -> None:
    """W3: compile and run time of scan and loop against the layer count."""
    points = results["layers"]
    n = [p["n_layers"] for p in points]
    fig = Figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    left.plot(n, [p["scan_compile_s"] for p in points], "o-", label="lax.scan")
    left.plot(n, [p["loop_compile_s"] for p in points], "s-", label="Python loop")
    left.set(xlabel="layers", ylabel="compile s", title="compile time")
    right.plot(n, [p["scan_run_s"] * 1e3 for p in points], "o-", label="lax.scan")
    right.plot(n, [p["loop_run_s"] * 1e3 for p in points], "s-", label="Python loop")
    right.set(xlabel="layers", ylabel="forward ms", title="run time")
    for ax in (left, right):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def remat(results: dict, path: Path) -> None:
    """W10: gradient memory of a long scan per remat policy against T (log-log)."""
    by_variant = defaultdict(list)
    for p in results["loops"]["remat"]:
        label = p["policy"] + (", nested √T segments" if p["segments"] > 1 else "")
        by_variant[label].append((p["T"], p["temp_bytes"] / 2**20))
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for label, points in by_variant.items():
        ax.plot(*zip(*points, strict=True), "o-", label=label)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="T (steps)",
        ylabel="temp memory of jit(grad), MiB",
        title="Gradient memory of a long scan: O(T) plain, O(√T) nested",
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def decoding(decoding: dict, path: Path) -> None:
    """W7 and W13: tokens/s per contender at each batch size, with the bandwidth bounds."""
    batches = sorted({c["batch"] for c in decoding["contenders"]})
    fig = Figure(figsize=(10, 4.5))
    axes = fig.subplots(1, len(batches), squeeze=False)[0]
    for ax, batch in zip(axes, batches, strict=True):
        contenders = [c for c in decoding["contenders"] if c["batch"] == batch]
        ax.barh([c["name"] for c in contenders], [c["tokens_per_s"] for c in contenders])
        dtypes = {b["dtype"] for b in decoding["bounds"]}
        for dtype, style in (("f32", "--"), ("bf16", ":"), ("kernel", "-.")):
            if dtype not in dtypes:
                continue
            ax.axvline(bound(decoding, dtype, batch), color="k", ls=style, label=f"{dtype} bound")
        ax.set(xlabel="tokens/s", title=f"batch {batch}")
        ax.invert_yaxis()
        ax.legend(fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"Decoding {decoding['model']}, {decoding['new_tokens']} tokens, greedy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def contexts(gemma3: dict, path: Path) -> None:
    """W13: cache memory and decoding speed against the context, ring vs full-length caches."""
    fig = Figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    for ring, label, style in ((True, "ring caches", "o-"), (False, "full-length caches", "s-")):
        points = [p for p in gemma3["contexts"] if p["ring"] == ring]
        context = [p["context"] for p in points]
        left.plot(context, [p["cache_bytes"] / 2**20 for p in points], style, label=label)
        right.plot(context, [p["tokens_per_s"] for p in points], style, label=label)
    left.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="KV cache MiB")
    right.set(xscale="log", xlabel="context (tokens)", ylabel="decoding tokens/s, batch 1")
    for ax in (left, right):
        ax.legend()
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"{gemma3['model']}: 15 sliding-window layers in rings, 3 full layers")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def sizes(sizes: dict, path: Path) -> None:
    """W17: decoding tokens/s (batch 1) and peak memory against the parameter count, one point
    per file and contender, with the files' own sizes for scale."""
    fig = Figure(figsize=(10, 4.5))
    speed, memory = fig.subplots(1, 2)
    files = sizes["files"]
    params = np.array([f["params"] for f in files], dtype=float)
    for name, marker in zip(sizes["contenders"], "os^D", strict=False):
        rates = [decode_rate(f["contenders"][name], 1) for f in files]
        speed.scatter(params, rates, marker=marker, label=name)
        peaks = [f["contenders"][name]["peak_bytes"] / 2**30 for f in files]
        memory.scatter(params, peaks, marker=marker, label=f"{name}, peak")
    order = np.argsort(params)
    file_gib = np.array([f["file_bytes"] for f in files]) / 2**30
    memory.plot(params[order], file_gib[order], "k:", label="the file")
    for f in files:
        speed.annotate(
            f["name"],
            (f["params"], decode_rate(f["contenders"][SCANLAB], 1) or 0),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    speed.set(xscale="log", yscale="log", xlabel="parameters", ylabel="decoding tokens/s, batch 1")
    memory.set(xscale="log", yscale="log", xlabel="parameters", ylabel="GiB above the start")
    _finish(
        fig,
        (speed, memory),
        "GGUF files at real sizes: scanlab and llama.cpp, each in its own process",
        path,
    )


def serving(serving: dict, path: Path) -> None:
    """W16: aggregate tokens/s and p95 time to the first token against the clients, per server
    and file, with one-at-a-time serving for scale."""
    fig = Figure(figsize=(10, 4.5))
    rate, first = fig.subplots(1, 2)
    for file, color in zip(serving["files"], ("C0", "C1", "C2"), strict=False):
        for (who, rows), style in zip(file["servers"].items(), ("o-", "s--"), strict=False):
            clients = [row["clients"] for row in rows]
            label = f"{who}, {file['name']}"
            rate.plot(clients, [r["tokens_per_s"] for r in rows], style, color=color, label=label)
            p95 = [r["first_token_s"]["p95"] * 1000 for r in rows]
            first.plot(clients, p95, style, color=color, label=label)
        rate.axhline(file["one_at_a_time_tokens_per_s"], color=color, ls=":", lw=1)
    rate.set(xscale="log", yscale="log", xlabel="clients at once", ylabel="tokens/s, all clients")
    first.set(xscale="log", yscale="log", xlabel="clients at once", ylabel="p95 first token, ms")
    _finish(
        fig,
        (rate, first),
        "Many users: scanlab serve and llama-server (dotted: one request at a time)",
        path,
    )


def _finish(fig: Figure, axes, title: str, path: Path) -> None:
    """Legends and grids on each of `axes`, the title, and the figure written to `path`."""
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
