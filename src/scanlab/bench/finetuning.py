"""W14: fine-tuning the real SmolLM2-135M-Instruct, K optimizer steps per scanned call vs one
jitted step per Python iteration vs transformers + PEFT (torch), on the same rows (batch, sequence
length) and LoRA settings; XLA's compiled temporary memory of a chunk per remat policy."""

from __future__ import annotations

import functools
import importlib.util
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from scanlab.bench import env
from scanlab.decoder import load
from scanlab.decoder.formats import pretrained
from scanlab.finetune import FinetuneConfig, LoraConfig, data, finetune_chunk, finetune_loop
from scanlab.finetune.adapters import TARGETS
from scanlab.finetune.step import compiled_chunk, init_state
from scanlab.timing import temp_bytes

BATCH, SEQ_LEN, STEPS, RANK = 4, 64, 5, 8
LEARNING_RATE = 2e-4
REMATS = ("none", "full", "dots")


def conversations(n: int = 64) -> list[tuple[int, dict]]:
    """n short made-up question-and-answer chats, as `data.read_jsonl` returns records."""
    records = []
    for i in range(n):
        messages = [
            {"role": "user", "content": f"What is the code name of project {i}?"},
            {"role": "assistant", "content": f"Project {i} is code-named Aurora-{i * 7 % 100}."},
        ]
        records.append((i + 1, {"messages": messages}))
    return records


def bench_rows(tokenizer) -> data.Rows:
    examples = data.encode("chat", conversations(), tokenizer, "<W14 conversations>")
    return data.to_rows(examples, tokenizer.pad_id, SEQ_LEN, SEQ_LEN, "<W14 conversations>")


def config_of(form: str, remat: str = "none") -> FinetuneConfig:
    """ "lora-int8", "lora-f32" or "full", at the benchmark's sizes."""
    lora = None if form == "full" else LoraConfig(rank=RANK, alpha=2.0 * RANK)
    return FinetuneConfig(
        lora=lora,
        steps=1000,
        batch_size=BATCH,
        seq_len=SEQ_LEN,
        learning_rate=LEARNING_RATE,
        warmup_steps=1,
        eval_fraction=0.0,
        remat=remat,
        weights="quantized" if form == "lora-int8" else "float32",
    )


def _timed(runs: dict[str, Callable[[], Any]], rounds: int) -> dict[str, tuple[float, float]]:
    """(median steady seconds, first call's extra seconds) of each run of STEPS steps, one call
    of each per round (interleaved); each run builds its own fresh inputs untimed."""
    first = {name: _seconds(run) for name, run in runs.items()}
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            samples[name].append(_seconds(run))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    return {name: (medians[name], first[name] - medians[name]) for name in runs}


def _seconds(run: Callable[[], Any]) -> float:
    """`run()` returns a thunk (its inputs made); only the thunk is timed."""
    thunk = run()
    start = time.perf_counter()
    jax.block_until_ready(thunk())
    return time.perf_counter() - start


def scanlab_runs(path, rows: data.Rows, form: str, remat: str = "none") -> dict[str, Callable]:
    """The scanned chunk and the Python loop of jitted steps, STEPS steps from a fresh state."""
    config = config_of(form, remat)
    model_config, params = load.load_weights(path, config.weights, kernel=False)
    frozen = None if config.lora is None else params
    rows_on_device = jax.tree.map(jnp.asarray, rows)

    def way(run):
        def prepared():
            state = init_state(config, model_config, params)
            return lambda: run(
                state, frozen, rows_on_device, config=config, model_config=model_config, steps=STEPS
            )

        return prepared

    return {"scanned": way(finetune_chunk), "loop": way(finetune_loop)}


def memory(path, rows: data.Rows, form: str) -> dict[str, int]:
    """Compiled temporary bytes of one chunk per remat policy (XLA's memory analysis)."""
    out = {}
    rows_on_device = jax.tree.map(jnp.asarray, rows)
    weights = config_of(form).weights
    model_config, params = load.load_weights(path, weights, kernel=False)
    for remat in REMATS:
        config = config_of(form, remat)
        frozen = None if config.lora is None else params
        state = jax.eval_shape(functools.partial(init_state, config, model_config), params)
        compiled = compiled_chunk(
            state, frozen, rows_on_device, config=config, model_config=model_config, steps=STEPS
        )
        out[remat] = temp_bytes(compiled)
    return out


def torch_run(path, rows: data.Rows, lora: bool) -> Callable | None:
    """transformers + PEFT (LoRA) or transformers alone (full): STEPS AdamW steps, clipped as
    scanlab clips, on rows drawn as scanlab draws them (B of N, without replacement)."""
    if importlib.util.find_spec("transformers") is None or (
        lora and importlib.util.find_spec("peft") is None
    ):
        return None
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    if lora:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        settings = PeftLoraConfig(
            r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=list(TARGETS)
        )
        model = get_peft_model(model, settings)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=0.0)
    tokens = torch.tensor(rows.tokens.astype(np.int64))
    mask = torch.tensor(rows.mask.astype(np.int64))
    labels = torch.tensor(np.where(rows.targets, rows.tokens, -100).astype(np.int64))
    rng = np.random.default_rng(0)

    def prepared():
        picks = [torch.tensor(rng.permutation(len(rows))[:BATCH]) for _ in range(STEPS)]

        def steps():
            for rows_of_step in picks:
                loss = model(
                    input_ids=tokens[rows_of_step],
                    attention_mask=mask[rows_of_step],
                    labels=labels[rows_of_step],
                ).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                optimizer.zero_grad()
            return None

        return steps

    return prepared


def measure(rounds: int = 3) -> dict[str, Any]:
    """W14's figures: steps/s and tokens/s per form and way, compile time, memory per remat."""
    path = pretrained.fetch(pretrained.SMOLLM2)
    rows = bench_rows(load.load_model(path, kernel=False).tokenizer)
    tokens_per_step = BATCH * (SEQ_LEN - 1)
    points = []
    cases = [
        ("lora-int8", "none"),
        ("lora-int8", "full"),
        ("lora-f32", "none"),
        ("full", "none"),
    ]
    for form, remat in cases:
        runs = scanlab_runs(path, rows, form, remat)
        # The torch peers train over f32 weights: beside scanlab's f32 forms.
        peer = torch_run(path, rows, lora=form != "full") if form in ("lora-f32", "full") else None
        if peer is not None:
            runs["transformers + PEFT" if form != "full" else "transformers"] = peer
        for way, (seconds, compile_s) in _timed(runs, rounds).items():
            points.append(
                {
                    "form": form,
                    "remat": remat,
                    "way": way,
                    "steps_per_s": STEPS / seconds,
                    "tokens_per_s": tokens_per_step * STEPS / seconds,
                    "first_call_extra_s": compile_s,
                }
            )
    return {
        "date": env.describe()["date"],
        "model": "SmolLM2-135M-Instruct (Q4_1/Q8_0 GGUF)",
        "batch": BATCH,
        "seq_len": SEQ_LEN,
        "steps_per_call": STEPS,
        "lora_rank": RANK,
        "points": points,
        "memory": {form: memory(path, rows, form) for form in ("lora-int8", "full")},
    }
