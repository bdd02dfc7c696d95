"""`scanlab demo` end to end: every section runs and every figure it prints says what it should."""

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e  # the whole tour: `make test-e2e`


def test_the_tour_runs_every_section_and_its_twins_agree():
    result = subprocess.run(
        [sys.executable, "-m", "scanlab", "demo"],
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ | {"COLUMNS": "200"},  # one line per message: the checks read lines
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for number in range(1, 11):
        assert re.search(rf"\b{number}\. ", out), f"section {number} missing"
    # Every agreement the tour reports: twins, references and forms equal to float32 rounding.
    diffs = [
        float(v) for v in re.findall(r"max \|(?:logit )?diff\|[^0-9]*?([0-9.]+e[-+][0-9]+)", out)
    ]
    diffs += [
        float(v)
        for v in re.findall(r"(?:raw JAX|nn\.scan|lax\.scan|nnx\.scan) ([0-9.]+e[-+][0-9]+)", out)
    ]
    assert len(diffs) >= 9, out
    assert max(diffs) < 1e-4, diffs
    # The training section learns the task; the bounded while loop differentiates to 1/(2√2).
    accuracy = float(
        re.search(r"held-out exact-match accuracy after 500 steps: ([0-9.]+)%", out)[1]
    )
    assert accuracy >= 95.0
    slope = re.search(r"d/dt sqrt\(t\) = ([0-9.]+) \(1 / \(2 sqrt 2\) = ([0-9.]+)\)", out)
    assert abs(float(slope[1]) - float(slope[2])) < 1e-5
    # The result of the blog example and the 7B parameter count, computed, not copied.
    assert "reference.scan: (6, [3, 4, 5])" in out and "jax.lax.scan: (6, [3, 4, 5])" in out
    assert "6,738,415,616" in out
    # The real model answers the question, streamed after the prompt line.
    assert re.search(r"you> What is the capital of France\?\nmodel> [^\n]*Paris", out), out
    path, kept, file, f32 = re.search(
        r"blocks kept \(([^)]*)\), ([\d.]+) MiB in memory for a ([\d.]+) MiB file \(([\d.]+) MiB",
        out,
    ).groups()
    kept, file, f32 = float(kept), float(file), float(f32)
    if path.startswith("jax.ffi kernel"):  # 4-bit values two per byte, as the file holds them
        assert kept <= 1.05 * file
    else:  # int8 containers: more than the file's 4-bit blocks
        assert path.startswith("pure JAX") and file < kept < 0.3 * f32
    # Gemma 3: its pattern, its caches and its continuation (transformers' greedy one).
    assert "15 sliding-window layers (window 512) and 3 full ones (layers [5, 11, 17])" in out
    assert re.search(r"KV cache for 32,768 tokens: 207\.0 MiB with ring caches, 1,152\.\d MiB", out)
    assert re.search(r"prompt> The capital of France is\nmodel> +the capital of the country", out)
    # The fine-tune teaches the fact it did not know.
    before = re.search(r"before: you> Who is the mayor of Quillby\?\nmodel> ([^\n]*)", out)[1]
    after = re.search(r"after: you> Who is the mayor of Quillby\?\nmodel> ([^\n]*)", out)[1]
    assert "Odelia Brandt" not in before and after.startswith(
        "The mayor of Quillby is Odelia Brandt."
    )
