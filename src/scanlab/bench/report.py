"""The benchmark write-up: report.md (`markdown`), its plots (`figures`) and the raw figures as
results.json, written into one folder."""

from __future__ import annotations

import json
from pathlib import Path

from scanlab.bench import figures, markdown


def write(results: dict, out_dir: str | Path) -> Path:
    """Writes report.md, results.json and the plots into out_dir; returns the report's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    figures.recurrence(results, out / "recurrence.png")
    figures.layers(results, out / "layers.png")
    figures.remat(results, out / "loops-memory.png")
    if results.get("decoding"):
        figures.decoding(results["decoding"], out / "decoding.png")
    if results.get("gemma3"):
        figures.decoding(results["gemma3"], out / "gemma3-decoding.png")
        figures.contexts(results["gemma3"], out / "gemma3-contexts.png")
    if results.get("sizes"):
        figures.sizes(results["sizes"], out / "sizes.png")
    if results.get("serving"):
        figures.serving(results["serving"], out / "serving.png")
    report = out / "report.md"
    report.write_text(markdown.render(results))
    return report
