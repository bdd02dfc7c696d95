"""Matplotlib figures written to files.

Figures are built with `matplotlib.figure.Figure`, not pyplot: no backend is chosen or needed,
so importing scanlab leaves a user's matplotlib set-up alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.figure import Figure

from scanlab import checks
from scanlab.errors import ArgumentError, PathExistsError


def checked_path(name: str, path: str | Path) -> Path:
    """Where a figure will be written, checked before the work that makes it: a format
    matplotlib writes (no suffix: .png, as `savefig` adds it) in a writable folder."""
    path = Path(path)
    if path.is_dir():
        raise PathExistsError(
            f"{checks.shown(name)} {path} is a directory: give a file, e.g. {path / 'loss.png'}"
        )
    if not path.suffix:
        path = path.with_suffix(".png")
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise ArgumentError(
            f"{checks.shown(name)} must end in an image format matplotlib writes "
            f"({', '.join(f'.{f}' for f in sorted(formats))}), got {str(path)!r}"
        )
    checks.writable_dir(f"{checks.shown(name)}'s folder", path.parent)
    return path


def loss_curve(losses: np.ndarray, path: str | Path, title: str) -> Path:
    """Per-step training loss (log scale) with a running mean, written to a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    steps = np.arange(1, len(losses) + 1)
    window = max(1, len(losses) // 50)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(steps, losses, alpha=0.3, label="per step")
    ax.plot(steps[window - 1 :], smooth, label=f"mean of {window}")
    ax.set(xlabel="step", ylabel="loss", yscale="log", title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
