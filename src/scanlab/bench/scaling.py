"""W17: scanlab against llama.cpp on GGUF files of the sizes people run — load time, peak
memory, time to the first token at several prompt lengths, decoding tokens/s at batch 1 and 8.

Each contender loads the file in a process of its own (`contender`), so that its memory is
its own. This process hands the same requests to every contender in turn,
round by round, so a slow patch of the machine hits both alike, and takes medians.

Prompts are random token ids (speed only; the synthetic files' tokens mean nothing). Time to
the first token is one whole call from the prompt's ids to one sampled token. Decoding tokens/s
is (N − 1) further tokens per row over the time they add: scanlab's `generate` of N tokens
less its `generate` of 1 (each one compiled call), llama.cpp's time from its first yielded
token to its N-th (its Python binding decodes one sequence, so batch 1 only).
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

from scanlab.bench import contender, env, sizes
from scanlab.bench.contender import LLAMA_CPP, SCANLAB, SCANLAB_INT8
from scanlab.decoder import load, param_count
from scanlab.decoder.formats import pretrained
from scanlab.storage import default_cache


class Plan(NamedTuple):
    """What one file is measured for."""

    prompt_lengths: tuple[int, ...] = (16, 64, 500)
    new_tokens: int = 64
    batches: tuple[int, ...] = (1, 8)
    rounds: int = 3


class File(NamedTuple):
    """A W17 row: a synthetic Llama of `shape` in `tensor_type` (sizes.SHAPES, written at
    benchmark time), or a known model's file (`pretrained.MODELS`) where `shape` is None."""

    name: str
    shape: str | None
    tensor_type: str | None
    plan: Plan


# A 500-token prompt at 8B takes a minute or more per call: 8B is measured at 16 and 64 only.
FILES = (
    File(pretrained.SMOLLM2.name, None, None, Plan()),
    File(pretrained.GEMMA3_270M.name, None, None, Plan()),
    File("Llama-1B-shaped Q4_0", "1b", "Q4_0", Plan()),
    File("Llama-1B-shaped Q8_0", "1b", "Q8_0", Plan()),
    File("Llama-8B-shaped Q4_0", "8b", "Q4_0", Plan((16, 64), new_tokens=16, rounds=2)),
)


def measure(files=FILES, on_progress=lambda message: None) -> dict[str, Any]:
    """W17's figures: each of `files` (written first where synthetic) per contender."""
    results: dict[str, Any] = {
        "date": env.describe()["date"],
        "contenders": list(contenders()),
        "files": [],
    }
    for file in files:
        on_progress(f"W17 {file.name}")
        path = file_path(file)
        figures = measure_file(path, file.plan)
        params = param_count(load.load_config(path))
        results["files"].append({"name": file.name, "params": params, **figures})
    return results


def file_path(file: File) -> Path:
    """The file of a W17 row: fetched (a known model), or written once into the cache."""
    if file.shape is None or file.tensor_type is None:
        return pretrained.fetch(pretrained.MODELS[file.name])
    path = default_cache() / "synthetic" / f"llama-{file.shape}-{file.tensor_type}.gguf"
    if not path.exists():
        like = pretrained.fetch(pretrained.SMOLLM2)  # the tokenizer and chat template
        path.parent.mkdir(parents=True, exist_ok=True)
        sizes.write_synthetic_gguf(path, sizes.SHAPES[file.shape], file.tensor_type, like)
    return path


def contenders() -> tuple[str, ...]:
    """scanlab (its default, and the kernel with int8 activations, llama.cpp's arithmetic), and
    llama.cpp where its Python binding is installed."""
    installed = importlib.util.find_spec("llama_cpp") is not None
    return (SCANLAB, SCANLAB_INT8) + ((LLAMA_CPP,) if installed else ())


def measure_file(path: Path, plan: Plan, names=None) -> dict[str, Any]:
    """One file's figures per contender (`contenders()` unless `names`): load_s,
    load_peak_bytes and peak_bytes (above the process's start), `first_token` rows (prompt,
    seconds, first_call_s: the first call, compilation included) and `decode` rows (batch,
    tokens_per_s: None where the contender cannot decode that batch)."""
    workers: dict[str, _Worker] = {}
    try:
        for name in names or contenders():
            workers[name] = _Worker(name, path)
        figures = {n: w.loaded | {"first_token": [], "decode": []} for n, w in workers.items()}
        for n in plan.prompt_lengths:
            for name, (first, runs) in _rounds(workers, "first_token", (n,), plan.rounds).items():
                row = dict(prompt=n, seconds=_median(runs), first_call_s=first)
                figures[name]["first_token"].append(row)
        for batch in plan.batches:
            args = (batch, plan.new_tokens)
            for name, (_, runs) in _rounds(workers, "decode", args, plan.rounds).items():
                figures[name]["decode"].append(dict(batch=batch, tokens_per_s=_median(runs)))
        for name, worker in workers.items():
            figures[name]["peak_bytes"] = worker.close()
    finally:
        for worker in workers.values():
            worker.kill()
    return {"file_bytes": path.stat().st_size, "plan": plan._asdict(), "contenders": figures}


def _rounds(workers: dict, method: str, args: tuple, rounds: int) -> dict[str, tuple]:
    """(first call, [the `rounds` calls after it]) per worker, every round in turn."""
    first = {name: worker.ask(method, *args) for name, worker in workers.items()}
    steady: dict[str, list] = {name: [] for name in workers}
    for _ in range(rounds):
        for name, worker in workers.items():
            steady[name].append(worker.ask(method, *args))
    return {name: (first[name], steady[name]) for name in workers}


def _median(values: list) -> float | None:
    return None if None in values else statistics.median(values)


class _Worker:
    """A contender's process (`scanlab.bench.contender`), asked over its stdin and stdout."""

    def __init__(self, name: str, path: Path):
        self.errors = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", contender.__name__, name, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.errors,
            text=True,
        )
        self.name = name
        try:
            self.loaded = self._answer()
        except BaseException:
            self.kill()
            raise

    def ask(self, method: str, *args):
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps([method, args]) + "\n")
        self.process.stdin.flush()
        return self._answer()

    def close(self) -> int:
        """The process's peak bytes above its start; it exits."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        peak = self._answer()
        self.process.wait(timeout=60)
        return peak

    def kill(self) -> None:
        """Ends the process (where it still runs) and closes its pipes."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        for pipe in (self.process.stdin, self.process.stdout, self.errors):
            if pipe is not None:
                pipe.close()

    def _answer(self):
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self.errors.seek(0)
            raise RuntimeError(f"W17's {self.name} process failed:\n{self.errors.read()[-4000:]}")
        return json.loads(line)
