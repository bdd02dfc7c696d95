import json
import subprocess
import sys

import matplotlib.image
import pytest

pytestmark = pytest.mark.e2e  # a quick benchmark run: `make test-e2e`


def test_quick_run_writes_the_report_plots_and_figures(tmp_path):
    """`scanlab bench --quick` end to end, in its own process (it sets the device count)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "scanlab",
            "bench",
            "--quick",
            "--devices",
            "2",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((tmp_path / "results.json").read_text())
    assert {
        "latency",
        "matmul_flops",
        "recurrence",
        "layers",
        "remat",
        "training",
        "generation",
        "sharding",
        "loops",
        "nnx",
        "processes",
        "env",
    } <= set(figures)
    assert any(
        t["peer"].startswith("scanlab, batch on 2 CPU devices") for t in figures["recurrence"]
    )
    text = (tmp_path / "report.md").read_text()
    assert "quick mode" in text and "## Targets" in text and "## W5" in text
    assert "## W8–W11" in text and "W8 masked_scan ≤ 1.2×" in text and "## W12" in text
    assert len(figures["nnx"]["recurrence"]) == 6 and len(figures["nnx"]["layers"]) == 4
    assert "## W15" in text and len(figures["processes"]["points"]) == 4  # 1 and 2, both ways
    loops = figures["loops"]
    assert {(p["policy"], p["segments"]) for p in loops["remat"] if p["T"] == 400} == {
        ("none", 1),
        ("full", 1),
        ("dots", 1),
        ("none", 20),
        ("full", 20),
    }
    # The nested variants must hold less memory than the plain gradient, even at smoke sizes.
    at_400 = {
        (p["policy"], p["segments"]): p["temp_bytes"] for p in loops["remat"] if p["T"] == 400
    }
    assert at_400[("full", 20)] < at_400[("full", 1)] < at_400[("none", 1)]
    assert [p["steps_taken"] for p in loops["while"]] == [5]
    for plot in ("recurrence.png", "layers.png", "loops-memory.png"):
        pixels = matplotlib.image.imread(tmp_path / plot)
        assert pixels.shape[0] >= 480 and pixels[..., :3].std() > 0.05, plot  # drawn, not blank
    assert all(p["same_tokens"] for p in figures["generation"])
    assert figures["sharding"]["mesh"] == {"data": 2, "model": 1}
    assert figures["sharding"]["forward"]["mesh"]["max_abs_diff"] < 1e-4
