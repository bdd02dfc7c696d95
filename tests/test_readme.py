"""The README runs as written.

Every ```python block runs, in order, in one namespace (blocks build on each other), in a fresh
process in a scratch directory. A block whose first line is "# In a fresh Python process" runs
alone in its own process. A statement commented "# raises:" must raise the error written on the
next comment line ("# ValueError: <the message's start>").
"""

import re
import subprocess
import sys
import textwrap
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"
FRESH = "# In a fresh Python process"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def checked(block: str) -> str:
    """The block with each `# raises:` statement wrapped in a check of the documented error."""
    lines, out = block.splitlines(), []
    for i, line in enumerate(lines):
        if "# raises:" not in line:
            out.append(line)
            continue
        statement = line.split("# raises:")[0].rstrip()
        error_type, message = re.match(r"# (\w+): (.*)", lines[i + 1].strip()).groups()
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


def run(script: str, cwd: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_every_python_block_runs_as_written(tmp_path):
    blocks = python_blocks()
    assert len(blocks) >= 10
    shared = [checked(b) for b in blocks if not b.startswith(FRESH)]
    run("\n\n".join(shared), tmp_path)
    for block in (b for b in blocks if b.startswith(FRESH)):
        run(checked(block), tmp_path)


def test_a_raises_block_fails_when_nothing_is_raised():
    script = checked("x = 1   # raises:\n# ValueError: never")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 1 and "expected ValueError" in result.stderr
