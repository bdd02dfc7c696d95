import json
import re
import subprocess
import sys

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from scanlab import lax_scan_in_module, pitfalls
from scanlab.cli import app

runner = CliRunner()


def test_run_prints_the_final_state_as_json():
    result = runner.invoke(
        app, ["run", "--seed", "3", "--hidden", "4", "--T", "5", "--x", "1,2,3,4", "--json"]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    expected = lax_scan_in_module(3, np.array([1, 2, 3, 4], np.float32), 4, 5)
    np.testing.assert_allclose(payload["final"], expected, rtol=1e-6)


def test_explain_prints_the_blog_walkthrough():
    result = runner.invoke(app, ["explain"])
    assert result.exit_code == 0, result.output
    assert "result: (6, [3, 4, 5])" in result.output


def test_pitfalls_prints_each_error():
    result = runner.invoke(app, ["pitfalls"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for number, pitfall in enumerate(pitfalls.PITFALLS, start=1):
        assert f"{number}. {pitfall.title}" in result.output
        assert f"raises {pitfall.error_type.__name__}:" in result.output
        assert pitfall.error_match in " ".join(result.output.split())


def test_bad_arguments_print_one_line_not_a_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "scanlab", "run", "--hidden", "3", "--x", "1,2"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: --x must have shape (..., --hidden) = (..., 3), got shape (2,)"
    )
    assert "Traceback" not in result.stderr


def _commands(group, path=()):
    """(words, click command) of every command under `group`."""
    for name, command in getattr(group, "commands", {}).items():
        yield (*path, name), command
        yield from _commands(command, (*path, name))


@pytest.mark.parametrize(
    ("words", "command"),
    list(_commands(typer.main.get_command(app))),
    ids=lambda value: " ".join(value) if isinstance(value, tuple) else "",
)
def test_help_texts_keep_their_bracketed_parts(words, command):
    """rich reads "[reverse]" or "[all: q,k]" as markup and drops it unless escaped: every
    bracketed part of every option's help shows in the command's --help."""
    result = runner.invoke(app, [*words, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    shown = " ".join(result.output.replace("│", " ").split())
    for param in command.params:
        for part in re.findall(
            r"\[[^\]]*\]", (getattr(param, "help", None) or "").replace("\\[", "[")
        ):
            assert " ".join(part.split()) in shown, f"{param.name}: {part} lost from --help"


def test_decoder_shapes_prints_the_blog_listing_and_count():
    result = runner.invoke(app, ["decoder", "shapes", "--preset", "llama2-7b"])
    assert result.exit_code == 0, result.output
    assert "q_proj=(32, 4096, 1, 32, 128)" in result.output  # stacked
    assert "q_proj=(4096, 1, 32, 128)" in result.output  # inside the scan body
    assert "input_norm=(4096)" in result.output
    assert "6,738,415,616" in result.output


def test_decoder_compare_reports_agreement():
    result = runner.invoke(
        app, ["decoder", "compare", "--layers", "2", "--d-model", "32", "--seq", "8"]
    )
    assert result.exit_code == 0, result.output
    assert "lax.scan over layers" in result.output and "loop / scan" in result.output
    # The scanned and looped logits agree, as printed (float32 sums in another order).
    diff = re.search(r"max \|logit diff\| ([0-9.]+e[-+][0-9]+)", " ".join(result.output.split()))
    assert diff is not None and float(diff[1]) < 1e-4, result.output


def test_decoder_generate_from_a_checkpoint(tmp_path):
    import jax

    from scanlab.decoder import generate, init_params, preset, save_checkpoint

    config = preset("tiny")
    params = init_params(config, jax.random.PRNGKey(2))
    save_checkpoint(tmp_path / "ckpt", config, params)
    result = runner.invoke(
        app,
        [
            "decoder",
            "generate",
            "--model",
            str(tmp_path / "ckpt"),
            "--tokens",
            "5,6,7",
            "--max-new-tokens",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    expected = generate(params, np.array([[5, 6, 7]]), config, 4).tokens[0, 3:].tolist()
    assert f"generated: {expected}" in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["decoder", "generate", "--help"],
        ["run", "--T", "-1"],
        ["decoder", "shapes", "--preset", "nope"],
        ["decoder", "compare", "--seq", "0"],
        ["decoder", "generate", "--top-p", "2", "--temperature", "1"],
        ["decoder", "generate", "--mesh", "data=2,data=4"],
        ["chat", "--weights", "float16"],
        ["train", "--learning-rate", "inf"],
        ["bench", "--devices", "0"],
        ["evaluate", "--checkpoint-dir", "typo_dir", "--n", "0"],
    ],
)
def test_help_and_flag_errors_answer_without_starting_jax(args):
    """Start-up stays fast: JAX, Flax and the format readers load only for work that needs them."""
    script = f"""
import sys
from scanlab.cli import main
sys.argv = ["scanlab", *{args!r}]
status = 0
try:
    main()
except SystemExit as exit_:
    status = exit_.code
heavy = [m for m in ("jax._src.core", "flax", "gguf", "tokenizers", "jinja2", "orbax") if m in sys.modules]
assert not heavy, heavy
print("status", status)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] in ("0", "2"), result.stdout


def test_finetune_help_names_every_remat_policy():
    from scanlab.decoder.stack import REMAT

    result = runner.invoke(app, ["finetune", "--help"], terminal_width=100)
    shown = " ".join(result.output.replace("│", " ").split())
    assert f"Backward-pass recomputation: {', '.join(REMAT)} [full]" in shown
