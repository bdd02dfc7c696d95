"""A W17 contender in a process of its own: `python -m scanlab.bench.contender NAME PATH` loads
the GGUF file at PATH with scanlab or llama.cpp, answers its load time and peak memory, then
one JSON line on stdout per request line on stdin (`[method, args]`) until stdin closes, and
last its peak memory over the whole run.

Its memory is its own: peak resident memory is counted above the process's start, its library
imported and initialized (for scanlab: JAX's devices, the kernel's library, one trivial program
compiled), before the file is opened. It imports nothing it does not measure.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

SCANLAB, SCANLAB_INT8, LLAMA_CPP = "scanlab", "scanlab, int8 activations", "llama.cpp"
CONTEXT = 1024  # llama.cpp's context: the longest prompt plus the decoded tokens fit
PROMPT_IDS = 1000  # prompts draw ids below this: ordinary tokens in every vocabulary
DECODE_PROMPT = 32  # the prompt's length before the decoded tokens


def serve(name: str, path: str) -> None:
    """The worker's side: load, report, then run each request until stdin closes."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything else a library prints goes to stderr, not into the answers

    def answer(value) -> None:
        answers.write(json.dumps(value) + "\n")
        answers.flush()

    runner_type, options = _RUNNERS[name]
    runner_type.initialize()
    start = _peak_bytes()
    began = time.perf_counter()
    runner = runner_type(Path(path), **options)
    answer(dict(load_s=time.perf_counter() - began, load_peak_bytes=_peak_bytes() - start))
    for line in sys.stdin:
        method, args = json.loads(line)
        answer(getattr(runner, method)(*args))
    answer(_peak_bytes() - start)


def _peak_bytes() -> int:
    """This process's peak resident memory so far: Linux's VmHWM, which starts afresh at exec
    (ru_maxrss does not: a child starts from the peak of the process that forked it), else
    ru_maxrss (bytes on macOS)."""
    status = Path("/proc/self/status")
    if status.exists():
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM"))
        return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _prompt(length: int, batch: int = 1) -> np.ndarray:
    """(batch, length) random token ids, the same in every process."""
    return np.random.default_rng(length).integers(0, PROMPT_IDS, (batch, length))


class _ScanlabRunner:
    """scanlab's default load of a GGUF file (blocks in the CPU kernel's layout where it
    builds), and its `generate`; the kernel's arithmetic one of `qmatvec.ACTIVATIONS`."""

    @staticmethod
    def initialize() -> None:
        import jax
        import jax.numpy as jnp

        from scanlab.decoder import generate, load, qmatvec  # noqa: F401

        # The runtime's own memory is the process's start, not the model's: the devices, the
        # kernel's library, and XLA's compiler, which takes its memory at the first program.
        qmatvec.available()
        jax.jit(lambda x: x + 1)(jnp.zeros(())).block_until_ready()

    def __init__(self, path: Path, activations: str = "f32"):
        import jax

        from scanlab.decoder import load, quant

        self.model = load.load_model(path)
        if activations != "f32":
            params = quant.with_activations(self.model.params, activations)
            self.model = self.model._replace(params=params)
        jax.block_until_ready(self.model.params)

    def _seconds(self, tokens: np.ndarray, new_tokens: int) -> float:
        from scanlab.decoder import generate
        from scanlab.timing import seconds

        config, params = self.model.config, self.model.params
        return seconds(lambda: generate(params, tokens, config, new_tokens).tokens)

    def first_token(self, length: int) -> float:
        return self._seconds(_prompt(length), 1)

    def decode(self, batch: int, new_tokens: int) -> float:
        tokens = _prompt(DECODE_PROMPT, batch)
        whole, first = self._seconds(tokens, new_tokens), self._seconds(tokens, 1)
        return batch * (new_tokens - 1) / (whole - first)


class _LlamaCppRunner:
    """llama.cpp through llama-cpp-python, one thread per core, greedy."""

    @staticmethod
    def initialize() -> None:
        import llama_cpp  # noqa: F401  (loads and initializes the library)

    def __init__(self, path: Path):
        from llama_cpp import Llama

        threads = os.cpu_count() or 1
        self.llm = Llama(str(path), n_ctx=CONTEXT, n_threads=threads, verbose=False)

    def _tokens(self, length: int):
        self.llm.reset()  # no prompt reused from the last call
        return self.llm.generate(_prompt(length)[0].tolist(), temp=0.0, reset=True)

    def first_token(self, length: int) -> float:
        began = time.perf_counter()
        next(self._tokens(length))
        return time.perf_counter() - began

    def decode(self, batch: int, new_tokens: int) -> float | None:
        if batch != 1:
            return None
        tokens = self._tokens(DECODE_PROMPT)
        next(tokens)
        began = time.perf_counter()
        for _ in range(new_tokens - 1):
            next(tokens)
        return (new_tokens - 1) / (time.perf_counter() - began)


_RUNNERS: dict[str, tuple[Any, dict]] = {
    SCANLAB: (_ScanlabRunner, {}),
    SCANLAB_INT8: (_ScanlabRunner, {"activations": "int8"}),
    LLAMA_CPP: (_LlamaCppRunner, {}),
}

if __name__ == "__main__":
    serve(*sys.argv[1:])
