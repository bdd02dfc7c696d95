"""`scanlab serve` as a process, for the tests that run it as users do."""

import json
import subprocess
import sys
import urllib.request

from tests.tiny import fast_compile_env


def start(args: list[str], *, fast_compile: bool = False) -> tuple[subprocess.Popen, list[str]]:
    """`scanlab serve ARGS` once it says it is ready, and the lines it said (stderr)."""
    server = subprocess.Popen(
        [sys.executable, "-m", "scanlab", "serve", *args],
        stderr=subprocess.PIPE,
        text=True,
        env=fast_compile_env() if fast_compile else None,
    )
    lines = []
    assert server.stderr is not None
    for line in server.stderr:
        lines.append(line)
        if line.startswith("ready:"):
            return server, lines
    server.wait()
    raise AssertionError(f"the server ended before it was ready: {''.join(lines)}")


def ask(port: int, question: str, max_tokens: int, **options) -> dict:
    """The server's whole answer to one user message (greedy unless told)."""
    body = {
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        **options,
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)
