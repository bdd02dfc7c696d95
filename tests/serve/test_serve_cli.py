"""`scanlab serve` as a process: its start-up lines, an answer over HTTP, and Ctrl-C and SIGTERM
ending it with one line and the CLI's exit status."""

import json
import signal
import subprocess
import sys
import urllib.request

import jax
import pytest
from tests.tiny import TINY, fast_compile_env, tiny_tokenizer

from scanlab import distributed
from scanlab.decoder import init_params, save_checkpoint
from scanlab.decoder.formats.tokenizer import save_tokenizer

pytestmark = pytest.mark.slow  # a real server process: not in `make test-fast`
SMALL = ["--slots", "2", "--context", "64", "--warm-up", "16", "--port"]  # then the port


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny-chat"
    save_checkpoint(path, TINY, init_params(TINY, jax.random.PRNGKey(0)))
    save_tokenizer(tiny_tokenizer(), path)
    return path


def started(tiny_dir, port: int) -> tuple[subprocess.Popen, list[str]]:
    """A `scanlab serve` process, once it says it is ready, and the lines it said."""
    server = subprocess.Popen(
        [sys.executable, "-m", "scanlab", "serve", "--model", str(tiny_dir), *SMALL, str(port)],
        stderr=subprocess.PIPE,
        text=True,
        env=fast_compile_env(),
    )
    lines = []
    assert server.stderr is not None
    for line in server.stderr:
        lines.append(line)
        if line.startswith("ready:"):
            return server, lines
    raise AssertionError(f"the server ended before it was ready: {''.join(lines)}")


@pytest.mark.parametrize(
    ("signum", "status", "line"),
    [(signal.SIGINT, 130, "error: interrupted"), (signal.SIGTERM, 143, "error: terminated")],
)
def test_serve_answers_then_a_signal_ends_it_with_one_line(tiny_dir, signum, status, line):
    port = distributed.free_port()
    server, lines = started(tiny_dir, port)
    try:
        assert lines[0].startswith(f"loading {tiny_dir}")
        assert "prompt bucket 16" in "".join(lines) and "decoding step (2 slots" in "".join(lines)
        assert lines[-1] == f"ready: tiny-chat at http://127.0.0.1:{port} (Ctrl-C stops)\n"
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.load(response)
        assert answer["usage"]["completion_tokens"] == 5
        server.send_signal(signum)
        _, rest = server.communicate(timeout=60)
    finally:
        server.kill()
        server.wait()
    assert server.returncode == status
    assert "5 completion tokens" in rest  # the request's log line
    assert rest.endswith(f"{line}\n") and rest.count("error:") == 1
