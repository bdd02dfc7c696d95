"""`scanlab serve` as a process: its start-up lines, an answer over HTTP, and Ctrl-C and SIGTERM
ending it with one line and the CLI's exit status."""

import signal
import socket

import jax
import pytest
from tests.serve import processes
from tests.tiny import TINY, tiny_tokenizer

from scanlab import distributed
from scanlab.decoder import init_params, save_checkpoint
from scanlab.decoder.formats.tokenizer import save_tokenizer

pytestmark = pytest.mark.slow  # a real server process: not in `make test-fast`
SMALL = ["--slots", "2", "--context", "64", "--warm-up", "16"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny-chat"
    save_checkpoint(path, TINY, init_params(TINY, jax.random.PRNGKey(0)))
    save_tokenizer(tiny_tokenizer(), path)
    return path


@pytest.mark.parametrize(
    ("signum", "status", "line"),
    [(signal.SIGINT, 130, "error: interrupted"), (signal.SIGTERM, 143, "error: terminated")],
)
def test_serve_answers_then_a_signal_ends_it_with_one_line(tiny_dir, signum, status, line):
    port = distributed.free_port()
    server, lines = processes.start(
        ["--model", str(tiny_dir), *SMALL, "--port", str(port)], fast_compile=True
    )
    try:
        assert lines[0].startswith(f"loading {tiny_dir}")
        assert "prompt bucket 16" in "".join(lines) and "decoding step (2 slots" in "".join(lines)
        assert lines[-1] == f"ready: tiny-chat at http://127.0.0.1:{port} (Ctrl-C stops)\n"
        assert processes.ask(port, "Hi", 5)["usage"]["completion_tokens"] == 5
        server.send_signal(signum)
        _, rest = server.communicate(timeout=60)
    finally:
        server.kill()
        server.wait()
    assert server.returncode == status
    assert "5 completion tokens" in rest  # the request's log line
    assert rest.endswith(f"{line}\n") and rest.count("error:") == 1


def test_an_address_in_use_or_slots_past_memory_are_one_line_before_loading(tiny_dir, cli):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        status, err, _ = cli(["serve", "--model", str(tiny_dir), "--port", str(port)])
    assert status == 2
    assert err.startswith(f"error: --host 127.0.0.1 --port {port}: cannot listen there (")
    status, err, _ = cli(["serve", "--model", str(tiny_dir), "--slots", "100000000"])
    assert status == 2 and err.startswith("error: 100000000 slots of 64 positions (their KV")
    assert "loading" not in err  # refused before the weights load
