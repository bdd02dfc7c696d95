"""An Engine behind the HTTP API, run by uvicorn: `serve` until Ctrl-C or SIGTERM (`scanlab
serve`), or `running` in a thread for as long as a `with` block lasts.

Start-up says what it does on stderr (the buckets compiled, then one ready line with the
address); each finished request is one log line. On Ctrl-C or SIGTERM uvicorn stops accepting
and gives the requests in flight `DRAIN_S` seconds; the engine then cancels what is left, and
uvicorn raises the signal again, which the CLI turns into its one line and exit status.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
import sys
import threading
from collections.abc import Callable, Iterator

import uvicorn

from scanlab.decoder.load import Model
from scanlab.errors import ArgumentError
from scanlab.serve.api import MAX_BODY_BYTES, create_app
from scanlab.serve.engine import Engine

DRAIN_S = 5.0


@dataclasses.dataclass(frozen=True)
class Settings:
    slots: int = 8
    context: int = 2048
    steps: int = 8
    queue: int = 64
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    warm_up: int = 128  # prompt buckets up to this many tokens compiled at start-up


def check_address(host: str, port: int) -> None:
    """Refuses, in one line and before any model loads, an address this process cannot listen
    on (in use, not this machine's, a privileged port): probed as uvicorn binds, SO_REUSEADDR."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.create_server((host, port), family=family):
            pass
    except OSError as error:
        raise ArgumentError(
            f"--host {host} --port {port}: cannot listen there ({error.strerror or error})"
        ) from None


def serve(model: Model, name: str, settings: Settings, on_progress: Callable[[str], None]):
    """Serves `model` as `name` until a signal ends it."""
    engine = Engine(
        model,
        slots=settings.slots,
        context=settings.context,
        steps=settings.steps,
        queue_size=settings.queue,
    )
    on_progress(f"compiling ({settings.slots} slots of {engine.context} positions)...")
    engine.warm_up(
        engine.buckets(up_to=settings.warm_up), on_compiled=lambda what: on_progress(f"  {what}")
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log = logging.getLogger("scanlab.serve")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    app = create_app(engine, name, api_key=settings.api_key)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        timeout_graceful_shutdown=int(DRAIN_S),
    )
    server = _Server(
        config,
        lambda port: on_progress(f"ready: {name} at http://{settings.host}:{port} (Ctrl-C stops)"),
    )
    engine.start()
    try:
        server.run()
    finally:
        engine.close(deadline_s=0)
        log.removeHandler(handler)


class _Server(uvicorn.Server):
    """uvicorn's server, saying when it listens (and on which port: `--port 0` picks one)."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[int], None]):
        super().__init__(config)
        self.on_ready = on_ready

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            self.on_ready(self.servers[0].sockets[0].getsockname()[1])


@contextlib.contextmanager
def running(
    engine: Engine,
    name: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> Iterator[str]:
    """Serves `engine`'s model as `name` from a thread while the block runs; yields the base
    URL (`port` 0: a free port). On leaving, the engine closes (what is in flight is cancelled)
    and the server stops."""
    app = create_app(engine, name, api_key=api_key, max_body_bytes=max_body_bytes)
    bound: list[int] = []
    server = _Server(uvicorn.Config(app, host=host, port=port, log_level="warning"), bound.append)
    thread = threading.Thread(target=server.run, name="scanlab-server", daemon=True)
    thread.start()
    while not bound:
        if not thread.is_alive():
            raise OSError(f"the server could not listen on {host}:{port}")
        thread.join(0.01)
    try:
        yield f"http://{host}:{bound[0]}"
    finally:
        engine.close(deadline_s=0)  # first: answers still streaming end (cancelled)
        server.should_exit = True
        thread.join()
