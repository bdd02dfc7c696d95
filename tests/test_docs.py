"""The README and every page of docs/ run as written.

Every ```python block runs in a namespace of its own, so a block copied alone into a file runs:
the blocks share one fresh process (JAX is imported once), each block starting from empty globals.
A block that sets the host's device count (`sharding.host_devices`) or joins a multi-process run
(`distributed.initialize`) must run before JAX's first computation, so it gets a process of its
own. A statement commented "# raises:" must raise the
error written on the next comment line ("# ValueError: <the message's start>").
"""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # every block of every page, run: `make test-e2e`

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

# Runs the blocks given as a JSON list, each from empty globals in an empty directory of its own
# (two blocks may write the same paths); names the one that fails.
RUNNER = """
import json, os, sys, traceback
root = os.getcwd()
for i, (name, source) in enumerate(json.loads(sys.argv[1])):
    os.chdir(root)
    os.makedirs(f"block-{i}")
    os.chdir(f"block-{i}")
    try:
        exec(compile(source, name, "exec"), {"__name__": "__main__"})
    except BaseException:
        traceback.print_exc()
        sys.exit(f"{name} failed")
"""


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), re.S)


def process_groups() -> list:
    """The blocks each fresh process runs: all that share one, then each that starts JAX itself."""
    named = [
        (f"{page.relative_to(ROOT)}, block {i}", block)
        for page in PAGES
        for i, block in enumerate(python_blocks(page), start=1)
    ]
    # Both fix the process's devices before JAX's first computation.
    alone = [item for item in named if "host_devices(" in item[1] or "initialize(" in item[1]]
    shared = [item for item in named if item not in alone]
    return [pytest.param(shared, id="shared process")] + [
        pytest.param([item], id=item[0]) for item in alone
    ]


def checked(block: str) -> str:
    """The block with each `# raises:` statement wrapped in a check of the documented error."""
    lines, out = block.splitlines(), []
    for i, line in enumerate(lines):
        if "# raises:" not in line:
            out.append(line)
            continue
        statement = line.split("# raises:")[0].rstrip()
        match = re.match(r"# (\w+): (.*)", lines[i + 1].strip())
        assert match, f"no '# ErrorType: message' line after: {line}"
        error_type, message = match.groups()
        message = message.removesuffix("...").strip()
        out.append(
            textwrap.dedent(f"""\
            try:
                {statement.strip()}
            except {error_type} as error:
                assert str(error).startswith({message!r}), str(error)
            else:
                raise AssertionError("expected {error_type}: " + {statement.strip()!r})""")
        )
    return "\n".join(out)


def run(blocks: list[tuple[str, str]], cwd: Path) -> subprocess.CompletedProcess:
    sources = json.dumps([(name, checked(block)) for name, block in blocks])
    return subprocess.run(
        [sys.executable, "-c", RUNNER, sources],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def test_every_page_has_examples():
    assert len(python_blocks(ROOT / "README.md")) >= 6
    assert sum(len(python_blocks(page)) for page in PAGES) >= 20


@pytest.mark.parametrize("blocks", process_groups())
def test_each_python_block_runs_on_its_own(blocks, tmp_path):
    result = run(blocks, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_raises_block_fails_when_nothing_is_raised(tmp_path):
    result = run([("block", "x = 1   # raises:\n# ValueError: never")], tmp_path)
    assert result.returncode == 1 and "expected ValueError" in result.stderr


def test_each_block_starts_from_empty_globals(tmp_path):
    result = run([("first", "x = 1"), ("second", "print(x)")], tmp_path)
    assert result.returncode == 1 and "NameError" in result.stderr
