import json

import matplotlib.image

from scanlab.bench import decoding as w7
from scanlab.bench import figures, markdown, targets
from scanlab.bench import results as results_lib


def test_w7_is_rendered_and_judged_from_the_canonical_figures(tmp_path):
    """W7 is left out of quick runs: its section, targets and plot from the committed run."""
    from pathlib import Path

    results = json.loads((Path(__file__).parents[2] / "docs/bench/results.json").read_text())
    decoding = results["decoding"]
    text = markdown.render(results)
    assert "## W7 — decoding smollm2-135m-instruct" in text
    assert "| bandwidth bound, bf16 | 8 |" in text
    judged = {name: ok for name, _, ok in targets.judge(results)}
    ours = results_lib.contender(decoding, w7.SCANLAB_F32, 1)
    theirs = results_lib.contender(decoding, w7.TRANSFORMERS, 1)
    ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
    assert judged["W7 decoding ≥ 3× transformers' tokens/s, batch 1"] == (ratio >= 3)
    figures.decoding(decoding, tmp_path / "decoding.png")
    pixels = matplotlib.image.imread(tmp_path / "decoding.png")
    assert pixels[..., :3].std() > 0.05
    # Without W7 (a quick run) the section says so and no W7 target is judged.
    del results["decoding"]
    assert "Not run in quick mode" in markdown.render(results)
    assert not any(name.startswith("W7") for name, _, _ in targets.judge(results))
