"""W16: many users at once — `scanlab serve` against llama.cpp's `llama-server` on the same GGUF.

Both servers run as processes of their own over the same file with the same slots and context
per slot (llama-server: `-np SLOTS -c SLOTS×CONTEXT`, continuous batching on, 2 threads), started
side by side. For each count of clients, round by round, the same clients ask each server in
turn: one thread each with the official `openai` package, streaming a chat answer of exactly
NEW_TOKENS tokens (`ignore_eos`, greedy), every client its own question, after a first round
that is not counted.

Per server and client count: aggregate tokens/s (all answers' tokens over the time from the
first request to the last token), time to first token (per request, from sending it) and
inter-token latency (per request, (last token − first token) / (tokens − 1)), medians and 95th
percentiles over every request of every round. One at a time, for scale: `scanlab chat`'s path
(`decoder.stream`, one token per step) on one question in this process — what N users get
served one after another, in aggregate.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from scanlab import distributed
from scanlab.bench import env, llama_cpp_sources, scaling
from scanlab.decoder import load_model, stream
from scanlab.decoder.chat import PROMPT_BUCKET, left_padded
from scanlab.decoder.formats import pretrained

SCANLAB, LLAMA_SERVER = "scanlab serve", "llama-server"
QUESTIONS = [
    "Tell me a long story about a lighthouse keeper.",
    "Explain how a steam engine works.",
    "Describe the water cycle in detail.",
    "Write a letter to a friend about your summer.",
    "What are the main causes of the French Revolution?",
    "Explain photosynthesis to a child.",
    "Describe a walk through a busy market.",
    "How do airplanes stay in the air?",
    "Write a poem about autumn leaves.",
    "Explain what a database index is.",
    "Describe the life of a honeybee.",
    "What makes a good cup of coffee?",
    "Tell me about the history of the bicycle.",
    "Explain how vaccines work.",
    "Describe a thunderstorm over the sea.",
    "What should I pack for a week of hiking?",
]


class Plan(NamedTuple):
    clients: tuple[int, ...] = (1, 4, 8, 16)
    new_tokens: int = 128
    slots: int = 16
    context: int = 256  # per slot: a chat prompt's bucket and the answer
    steps: int = 8  # scanlab's decoding steps per dispatch
    rounds: int = 2


FILES = (
    scaling.File(pretrained.SMOLLM2.name, None, None, scaling.Plan()),
    scaling.File("Llama-1B-shaped Q4_0", "1b", "Q4_0", scaling.Plan()),
)


PLAN = Plan()


def measure(files=FILES, plan: Plan = PLAN, on_progress=lambda message: None) -> dict[str, Any]:
    """W16's figures for each file: per server and client count, and one at a time."""
    binary = llama_cpp_sources.llama_server()
    results: dict[str, Any] = {
        "date": env.describe()["date"],
        "plan": plan._asdict(),
        "servers": [SCANLAB] + ([LLAMA_SERVER] if binary else []),
        "files": [],
    }
    for file in files:
        on_progress(f"W16 {file.name}")
        path = scaling.file_path(file)
        results["files"].append({"name": file.name, **measure_file(path, plan, binary)})
    return results


def measure_file(path: Path, plan: Plan, binary: Path | None) -> dict[str, Any]:
    servers = [_Server.scanlab(path, plan)]
    try:
        if binary is not None:
            servers.append(_Server.llama(binary, path, plan))
        figures: dict[str, list] = {server.name: [] for server in servers}
        for clients in plan.clients:
            runs: dict[str, list] = {server.name: [] for server in servers}
            for server in servers:  # a round to warm up (scanlab: programs compiled on first use)
                _clients(server.port, clients, plan.new_tokens)
            for _ in range(plan.rounds):
                for server in servers:
                    runs[server.name].append(_clients(server.port, clients, plan.new_tokens))
            for name, rounds in runs.items():
                figures[name].append(_summary(clients, rounds))
    finally:
        for server in servers:
            server.stop()
    return {"servers": figures, "one_at_a_time_tokens_per_s": _one_at_a_time(path, plan)}


class _Answer(NamedTuple):
    sent: float
    first: float
    last: float
    tokens: int


def _clients(port: int, clients: int, new_tokens: int) -> list[_Answer]:
    """Every client's answer, the clients asking at once (one thread each)."""
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    model = client.models.list().data[0].id
    answers: list[_Answer | None] = [None] * clients

    def ask(i: int) -> None:
        sent = time.perf_counter()
        first = last = 0.0
        tokens = pieces = 0
        chunks = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            max_tokens=new_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            # llama-server would reuse the KV of a prompt seen in an earlier round: not here.
            extra_body={"ignore_eos": True, "cache_prompt": False},
        )
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                last = time.perf_counter()
                first = first or last
                pieces += 1
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        # Without a usage chunk, llama-server's chunks are one token each.
        answers[i] = _Answer(sent, first, last, tokens or pieces)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if any(answer is None for answer in answers):
        raise RuntimeError(f"W16: a client got no answer from the server on port {port}")
    return [answer for answer in answers if answer is not None]


def _summary(clients: int, rounds: list[list[_Answer]]) -> dict[str, Any]:
    """One client count's figures over its rounds."""
    rates = [
        sum(a.tokens for a in answers)
        / (max(a.last for a in answers) - min(a.sent for a in answers))
        for answers in rounds
    ]
    every = [answer for answers in rounds for answer in answers]
    first = [a.first - a.sent for a in every]
    between = [(a.last - a.first) / (a.tokens - 1) for a in every if a.tokens > 1]
    return {
        "clients": clients,
        "tokens_per_s": statistics.median(rates),
        "first_token_s": _quantiles(first),
        "inter_token_s": _quantiles(between),
        "tokens": [a.tokens for a in every],
    }


def _quantiles(values: list[float]) -> dict[str, float]:
    return {"median": float(np.median(values)), "p95": float(np.percentile(values, 95))}


def _one_at_a_time(path: Path, plan: Plan) -> float:
    """`scanlab chat`'s decoding path on one question: tokens/s of a whole answer (prefill too),
    the median of three after a first call that compiles."""
    model = load_model(path)
    tokenizer = model.tokenizer
    text = tokenizer.chat([{"role": "user", "content": QUESTIONS[0]}])
    ids = tokenizer.encode(text, add_special_tokens=False)
    tokens, mask = map(jnp.asarray, left_padded([ids], tokenizer.pad_id, PROMPT_BUCKET))

    def answer() -> float:
        start = time.perf_counter()
        for _ in stream(
            model.params, tokens, model.config, plan.new_tokens, attn_mask=mask, chunk=1
        ):
            pass
        return plan.new_tokens / (time.perf_counter() - start)

    answer()
    return statistics.median(answer() for _ in range(3))


class _Server:
    """A server process on a free port, ready to answer."""

    def __init__(self, name: str, command: Callable[[int], list[str]], ready: Callable):
        self.name = name
        self.port = distributed.free_port()
        self.log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(
            command(self.port), stdout=self.log, stderr=subprocess.PIPE, text=True
        )
        try:
            ready(self)
        except BaseException:
            self.stop()
            raise

    @classmethod
    def scanlab(cls, path: Path, plan: Plan) -> _Server:
        def command(port: int) -> list[str]:
            settings = dict(slots=plan.slots, context=plan.context, steps=plan.steps, port=port)
            flags = [f"--{flag}={value}" for flag, value in settings.items()]
            return [sys.executable, "-m", "scanlab", "serve", "--model", str(path), *flags]

        return cls(SCANLAB, command, _said_ready)

    @classmethod
    def llama(cls, binary: Path, path: Path, plan: Plan) -> _Server:
        def command(port: int) -> list[str]:
            slots, context = str(plan.slots), str(plan.slots * plan.context)
            return [str(binary), "-m", str(path), "--port", str(port), "-t", "2", "-tb", "2",
                    "-np", slots, "-c", context, "--no-webui"]  # fmt: skip

        return cls(LLAMA_SERVER, command, _healthy)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()
        self.log.close()


def _said_ready(server: _Server) -> None:
    """Waits for scanlab's `ready:` line."""
    assert server.process.stderr is not None
    said = []
    for line in server.process.stderr:
        said.append(line)
        if line.startswith("ready:"):
            threading.Thread(target=server.process.stderr.read, daemon=True).start()  # drain
            return
    raise RuntimeError(f"W16: scanlab serve ended before it was ready:\n{''.join(said)[-4000:]}")


def _healthy(server: _Server, timeout_s: float = 600.0) -> None:
    """Waits until llama-server's /health answers 200 (its model loaded)."""
    assert server.process.stderr is not None
    threading.Thread(target=server.process.stderr.read, daemon=True).start()  # drain
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if server.process.poll() is not None:
            raise RuntimeError(f"W16: llama-server exited with {server.process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/health", timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"W16: llama-server was not ready in {timeout_s:.0f} s")
