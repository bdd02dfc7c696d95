import json
from pathlib import Path

import matplotlib.image

from scanlab.bench import decoding as w7
from scanlab.bench import figures, markdown, targets
from scanlab.bench import results as results_lib


def canonical_results() -> dict:
    """The committed run's figures (W7 and W13 are left out of quick runs)."""
    return json.loads((Path(__file__).parents[2] / "docs/bench/results.json").read_text())


def test_w7_is_rendered_and_judged_from_the_canonical_figures(tmp_path):
    """W7 is left out of quick runs: its section, targets and plot from the committed run."""
    results = canonical_results()
    decoding = results["decoding"]
    text = markdown.render(results)
    assert "## W7 — decoding smollm2-135m-instruct" in text
    assert "| bandwidth bound, bf16 | 8 |" in text
    judged = {name: ok for name, _, ok in targets.judge(results)}
    ours = results_lib.contender(decoding, w7.SCANLAB_F32, 1)
    theirs = results_lib.contender(decoding, w7.TRANSFORMERS, 1)
    ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
    assert judged["W7 decoding ≥ 3× transformers' tokens/s, batch 1"] == (ratio >= 3)
    kept = results_lib.contender(decoding, w7.SCANLAB_KEPT, 1)
    speedup = kept["tokens_per_s"] / ours["tokens_per_s"]
    assert judged["W7 decoding from kept blocks ≥ 2× f32's tokens/s, batch 1"] == (speedup >= 2)
    memory = decoding["memory"]
    resident = memory["resident_bytes"]["quantized"] / memory["file_bytes"]
    assert judged["W7 kept blocks resident ≤ 1.3× the file's bytes"] == (resident <= 1.3)
    assert "| quantized | 150 | 1.52× |" in text
    # The kernel: its fastest form against llama.cpp at batch 1, against both peers at batch 8.
    llama_cpp = results_lib.contender(decoding, w7.LLAMA_CPP, 1)["tokens_per_s"]
    for batch, peers in ((1, [llama_cpp]), (8, [llama_cpp])):
        rates = [
            results_lib.contender(decoding, name, batch)["tokens_per_s"]
            for name in w7.KERNEL_CONTENDERS
        ]
        if batch == 8:
            peers.append(results_lib.contender(decoding, w7.TRANSFORMERS, 8)["tokens_per_s"])
        name = next(n for n in judged if n.startswith(f"W7 kernel decoding, batch {batch},"))
        assert judged[name] == (max(rates) >= max(peers))
    assert "1024 of 1024 greedy tokens agree" in text  # the f32 arithmetic: the f32 path's tokens
    figures.decoding(decoding, tmp_path / "decoding.png")
    pixels = matplotlib.image.imread(tmp_path / "decoding.png")
    assert pixels[..., :3].std() > 0.05
    # Without W7 (a quick run) the section says so and no W7 target is judged.
    del results["decoding"]
    assert "Not run in quick mode" in markdown.render(results)
    assert not any(name.startswith("W7") for name, _, _ in targets.judge(results))


def test_w13_is_rendered_and_judged_from_the_canonical_figures(tmp_path):
    """W13 is left out of quick runs: its section, targets and plots from the committed run."""
    results = canonical_results()
    gemma3 = results["gemma3"]
    text = markdown.render(results)
    assert "## W13 — gemma3-270m: layers that differ, in one scan" in text
    assert "| 32768 | 207 | 1152 | 0.180 |" in text
    judged = {name: ok for name, _, ok in targets.judge(results)}
    longest = [p for p in gemma3["contexts"] if p["context"] == 32768]
    ring, full = sorted(longest, key=lambda p: not p["ring"])
    fraction = ring["cache_bytes"] / full["cache_bytes"]
    name = "W13 ring caches ≤ 0.183 of full-length caches' bytes at 32768 tokens"
    assert judged[name] == (fraction <= 1.1 / 6)
    for plot in (figures.decoding, figures.contexts):
        plot(gemma3, tmp_path / "plot.png")
        assert matplotlib.image.imread(tmp_path / "plot.png")[..., :3].std() > 0.05
    del results["gemma3"]
    assert "## W13 — Gemma 3 270M\n\nNot run in quick mode" in markdown.render(results)
    assert not any(name.startswith("W13") for name, _, _ in targets.judge(results))


def test_w17_is_rendered_and_judged_from_the_canonical_figures(tmp_path):
    """W17 writes and loads files of up to 8B: its section, targets and plot from the committed
    run."""
    results = canonical_results()
    sizes = results["sizes"]
    text = markdown.render(results)
    assert "## W17 — real sizes: scanlab against llama.cpp on the same GGUF files" in text
    judged = {name: ok for name, _, ok in targets.judge(results)}
    names = [file["name"] for file in sizes["files"]]
    assert names[0] == "smollm2-135m-instruct" and "Llama-8B-shaped Q4_0" in names
    for file in sizes["files"]:
        name, ours = file["name"], file["contenders"]["scanlab"]
        theirs = file["contenders"]["llama.cpp"]
        peak = ours["load_peak_bytes"] / file["file_bytes"]
        assert judged[f"W17 {name}: load peak ≤ 1.25× the file"] == (peak <= 1.25)
        for row in ours["first_token"]:
            ratio = results_lib.first_token_s(theirs, row["prompt"]) / row["seconds"]
            target = f"W17 {name}: first token of {row['prompt']} ≥ 1.0× llama.cpp's speed"
            assert judged[target] == (ratio >= 1.0)
        one = results_lib.decode_rate(ours, 1)
        decoding = f"W17 {name}: decoding batch 1 ≥ 1.0× llama.cpp's tokens/s"
        if name.startswith(("smollm2", "Llama-1B")):
            assert judged[decoding] == (one >= results_lib.decode_rate(theirs, 1))
        else:
            assert decoding not in judged
        assert f"| {name} | {file['params'] / 1e9:.2f} |" in text
    figures.sizes(sizes, tmp_path / "sizes.png")
    assert matplotlib.image.imread(tmp_path / "sizes.png")[..., :3].std() > 0.05
    del results["sizes"]
    assert "## W17 — real sizes\n\nNot run in quick mode" in markdown.render(results)
    assert not any(name.startswith("W17") for name, _, _ in targets.judge(results))


def test_w16_is_rendered_and_judged_from_the_canonical_figures(tmp_path):
    """W16 starts two servers per file: its section, targets and plot from the committed run."""
    results = canonical_results()
    serving = results["serving"]
    text = markdown.render(results)
    assert "## W16 — many users at once: scanlab serve against llama-server" in text
    judged = {name: ok for name, _, ok in targets.judge(results)}
    for file in serving["files"]:
        name = file["name"]
        ours = {row["clients"]: row for row in file["servers"]["scanlab serve"]}
        theirs = {row["clients"]: row for row in file["servers"]["llama-server"]}
        alone = ours[1]["tokens_per_s"] / file["one_at_a_time_tokens_per_s"]
        assert judged[f"W16 {name}: one client ≥ 0.9× scanlab chat's tokens/s"] == (alone >= 0.9)
        ratio = ours[8]["tokens_per_s"] / theirs[8]["tokens_per_s"]
        assert judged[f"W16 {name}: 8 clients ≥ 1.5× llama-server's aggregate tokens/s"] == (
            ratio >= 1.5
        )
        assert f"| {name} | scanlab serve | 8 | {ours[8]['tokens_per_s']:.1f} |" in text
    figures.serving(serving, tmp_path / "serving.png")
    assert matplotlib.image.imread(tmp_path / "serving.png")[..., :3].std() > 0.05
    del results["serving"]
    assert "## W16 — many users at once\n\nNot run in quick mode" in markdown.render(results)
    assert not any(name.startswith("W16") for name, _, _ in targets.judge(results))


def test_the_committed_report_is_the_rendering_of_the_committed_figures():
    docs = Path(__file__).parents[2] / "docs"
    assert (docs / "bench/report.md").read_text() == markdown.render(canonical_results())


def test_the_readme_quotes_only_figures_of_the_report():
    """Every figure in the README's results column (a decimal, or a count of ×, %, MB) is in the
    report rendered from results.json: none typed by hand, none gone stale."""
    import re

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    table = readme[readme.index("## Results") : readme.index("![W2")]
    report = markdown.render(canonical_results())
    rows = [line for line in table.splitlines() if line.startswith("| W")]
    figures = [
        (row.split("|")[1].strip(), figure)
        for row in rows
        for figure in re.findall(r"(?<![\w.])\d+\.\d+|\d+(?=×|%| MB| MiB)", row.split("|")[3])
    ]
    assert len(rows) >= 10 and len(figures) >= 40
    quoted = [
        (row, figure)
        for row, figure in figures
        if not re.search(rf"(?<![\d.]){re.escape(figure)}(?!\d)", report)
    ]
    assert quoted == []
