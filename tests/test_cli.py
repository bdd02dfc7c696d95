import json
import subprocess
import sys

import numpy as np
from typer.testing import CliRunner

from scanlab import lax_scan_in_module
from scanlab.cli import app

runner = CliRunner()


def test_run_prints_the_final_state_as_json():
    result = runner.invoke(app, ["run", "--seed", "3", "--hidden", "4", "--T", "5", "--x", "1,2,3,4", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    expected = lax_scan_in_module(3, np.array([1, 2, 3, 4], np.float32), 4, 5)
    np.testing.assert_allclose(payload["final"], expected, rtol=1e-6)


def test_explain_prints_the_blog_walkthrough():
    result = runner.invoke(app, ["explain"])
    assert result.exit_code == 0, result.output
    assert "result: (6, [3, 4, 5])" in result.output


def test_pitfalls_prints_each_error():
    result = runner.invoke(app, ["pitfalls"])
    assert result.exit_code == 0, result.output
    for name in ("UnexpectedTracerError", "carry input and carry output", "must be a pair", "no leading axis"):
        assert name in result.output


def test_bad_arguments_print_one_line_not_a_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "scanlab", "run", "--hidden", "3", "--x", "1,2"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: x must have shape (..., hidden) = (..., 3), got shape (2,)"
    )
    assert "Traceback" not in result.stderr
