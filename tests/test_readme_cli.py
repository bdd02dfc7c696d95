"""The CLI lines of the README run as written (in one scratch directory, in order).

Optional parts in [brackets] are dropped: `--mesh` runs in tests/test_multi_device.py
(`test_cli_runs_on_a_mesh`, in a process whose device count is set at start). `scanlab bench`
and `scanlab demo` are left to their own tests, which run exactly those commands
(tests/bench/test_report.py, tests/test_tour.py).
"""

import re
import shlex
from pathlib import Path

import jax
import pytest

from scanlab import decoder

pytestmark = pytest.mark.slow  # the README's CLI lines, end to end: not in `make test-fast`

README = Path(__file__).parent.parent / "README.md"


def cli_lines() -> list[str]:
    text = README.read_text()
    section = text[text.index("## The CLI") : text.index("## Results")]
    block = re.search(r"```bash\n(.*?)```", section, re.S)[1]
    return [line.split("#")[0].strip() for line in block.splitlines() if line.startswith("scanlab")]


def test_every_cli_line_runs(tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    config = decoder.preset("tiny")  # the DIR of `decoder generate --checkpoint DIR`
    decoder.save_checkpoint("DIR", config, decoder.init_params(config, jax.random.PRNGKey(0)))
    lines = cli_lines()
    assert len(lines) >= 10
    for line in lines:
        args = shlex.split(re.sub(r"\[[^\]]*\]", "", line))[1:]
        if args[0] in ("bench", "demo"):
            continue
        status, err = cli(args)
        assert status == 0, (line, err)
