"""W7: decoding a real model (SmolLM2-135M-Instruct) against transformers, llama.cpp and the
machine's memory bandwidth.

Every contender generates exactly `new_tokens` tokens per row (end-of-sequence off) from the
same chat-templated prompts, greedy; runs are interleaved round by round. Decoding one token
reads every weight once per step (plus the KV cache), so tokens/s is bounded by
batch × copy bandwidth ÷ bytes read per step, with the bandwidth measured in the same run.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from scanlab.bench import env
from scanlab.decoder import (
    chat,
    forward,
    generate,
    load,
    param_bytes,
    param_count,
    qmatvec,
    quant,
    quantize,
    stream,
)
from scanlab.decoder.config import DecoderConfig
from scanlab.decoder.formats import pretrained
from scanlab.timing import interleaved, seconds

QUESTIONS = [
    "What is the capital of France?",
    "Explain what a for loop does.",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "What is 12 times 12?",
    "Why is the sky blue?",
    "Give me a tip for learning to code.",
    "What does a compiler do?",
]
STREAM_CHUNK = 16  # the chunked-scan contender's tokens per compiled call

# The contenders' names, as results.json and the report carry them.
SCANLAB_F32 = "scanlab f32 (while_loop)"
SCANLAB_CHUNKED = f"scanlab f32 (scans of {STREAM_CHUNK})"
SCANLAB_STREAMED = "scanlab f32 (streamed per token)"
SCANLAB_BF16 = "scanlab bf16 (while_loop)"
SCANLAB_KEPT = "scanlab GGUF blocks kept as int8 (while_loop)"
SCANLAB_KERNEL = "scanlab GGUF blocks, jax.ffi kernel (while_loop)"
SCANLAB_KERNEL_INT8 = "scanlab GGUF blocks, jax.ffi kernel, int8 activations (while_loop)"
KERNEL_CONTENDERS = (SCANLAB_KERNEL, SCANLAB_KERNEL_INT8)
TRANSFORMERS = "transformers f32"
LLAMA_CPP = "llama.cpp (Q4_1 file)"


class Contender(NamedTuple):
    name: str
    batch: int
    first_s: float  # the first call: tracing and compilation (or warm-up) included
    median_s: float  # median of interleaved runs
    tokens_per_s: float


def copy_bandwidth(n_bytes: int = 1 << 29, repeats: int = 5) -> float:
    """Bytes/s of a large array copy (each byte read once and written once: 2 × n_bytes)."""
    source = np.ones(n_bytes // 4, np.float32)
    target = np.empty_like(source)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(target, source)
        times.append(time.perf_counter() - start)
    return 2 * n_bytes / statistics.median(times)


# The bounds' weight forms: the bytes per cache entry and, for dense forms, per weight.
KV_BYTES = {"f32": 4, "bf16": 2, "kept": 4, "kernel": 4}

# The weight forms the contenders load: name -> (load_model's weights, its kernel flag).
FORMS = {
    "kernel": ("quantized", True),
    "quantized": ("quantized", False),
    "float32": ("float32", False),
    "bfloat16": ("bfloat16", False),
}


def bytes_per_step(
    config: DecoderConfig, weight_bytes: int, kv_bytes: int, batch: int, context: int
) -> int:
    """Weights read once per decoding step, plus each row's KV cache up to `context` slots."""
    kv = 2 * config.n_layers * batch * context * config.n_kv_heads * config.head_dim
    return weight_bytes + kv * kv_bytes


def prompts(tokenizer, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, S) chat-templated questions, left-padded with the tokenizer's pad id, and the mask."""
    ids = [
        tokenizer.encode(tokenizer.chat([{"role": "user", "content": q}]), add_special_tokens=False)
        for q in QUESTIONS
    ]
    return chat.left_padded(ids[:batch], tokenizer.pad_id)


def scanlab_contenders(models: dict, tokens, mask, new_tokens) -> dict[str, Callable]:
    """scanlab's contenders on the f32, bf16, kept-blocks and kernel models (`load_models`)."""
    config, params, _ = models["float32"]

    def whole(weights: str):
        params = models[weights].params
        return lambda: generate(params, tokens, config, new_tokens, attn_mask=mask).tokens

    def collect(chunk: int):
        return lambda: np.concatenate(
            list(stream(params, tokens, config, new_tokens, chunk=chunk, attn_mask=mask)), 1
        )

    contenders = {
        SCANLAB_F32: whole("float32"),
        SCANLAB_CHUNKED: collect(STREAM_CHUNK),
        SCANLAB_STREAMED: collect(1),
        SCANLAB_BF16: whole("bfloat16"),
        SCANLAB_KEPT: whole("quantized"),
    }
    if "kernel" in models:
        contenders[SCANLAB_KERNEL] = whole("kernel")
        int8 = quant.with_activations(models["kernel"].params, "int8")
        contenders[SCANLAB_KERNEL_INT8] = lambda: (
            generate(int8, tokens, config, new_tokens, attn_mask=mask).tokens
        )
    return contenders


def transformers_contender(path, tokens, mask, new_tokens) -> Callable | None:
    if importlib.util.find_spec("transformers") is None:
        return None
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    input_ids, attention_mask = torch.tensor(tokens), torch.tensor(mask.astype(np.int64))

    def run():
        with torch.no_grad():
            return model.generate(
                input_ids,
                attention_mask=attention_mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=int(tokens[0, 0]),
            )

    return run


def llama_cpp_contender(path, tokens, new_tokens) -> Callable | None:
    """llama.cpp's Python binding on the same GGUF (batch 1: its API decodes one sequence)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=512, n_threads=os.cpu_count() or 1, verbose=False)
    prompt = tokens[0].tolist()

    def run():
        llm.reset()
        out = []
        for token in llm.generate(prompt, temp=0.0, reset=True):
            out.append(token)
            if len(out) == new_tokens:
                return out
        return out

    return run


def run_record(model: str, new_tokens: int, bandwidth: float) -> dict[str, Any]:
    """A decoding workload's figures before any is measured: when, what, the bandwidth."""
    return {
        "date": env.describe()["date"],
        "model": model,
        "new_tokens": new_tokens,
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "contenders": [],
        "bounds": [],
        "installed": {
            "transformers": importlib.util.find_spec("transformers") is not None,
            "llama.cpp": importlib.util.find_spec("llama_cpp") is not None,
        },
    }


def timed_contenders(
    fns: dict[str, Callable], batch: int, new_tokens: int, rounds: int
) -> list[dict[str, Any]]:
    """Each contender's first call, then `rounds` interleaved runs: a Contender row each."""
    first = {name: seconds(fn) for name, fn in fns.items()}
    medians = {name: statistics.median(runs) for name, runs in interleaved(fns, rounds).items()}
    return [
        Contender(name, batch, first[name], median, batch * new_tokens / median)._asdict()
        for name, median in medians.items()
    ]


def bandwidth_bound(
    config: DecoderConfig, dtype: str, batch: int, context: int, bandwidth: float, weight_bytes=None
) -> dict[str, Any]:
    """The bound's row: batch × bandwidth ÷ the bytes a step reads with `dtype`'s weights ("f32",
    "bf16", or "kept" with the kept tree's `weight_bytes`)."""
    if weight_bytes is None:
        weight_bytes = param_count(config) * KV_BYTES[dtype]
    step_bytes = bytes_per_step(config, weight_bytes, KV_BYTES[dtype], batch, context)
    return dict(
        batch=batch,
        dtype=dtype,
        bytes_per_step=step_bytes,
        tokens_per_s=batch * bandwidth / step_bytes,
    )


def load_models(path, forms=tuple(FORMS)) -> tuple[dict[str, load.Model], dict[str, Any]]:
    """The file loaded in each weight form of `FORMS` (the kernel's where it is available), and
    the memory record: the file's bytes, each form's resident bytes and load time (the file's
    metadata already read once)."""
    load.load_config(path)
    models, resident, load_s = {}, {}, {}
    for form in forms:
        weights, kernel = FORMS[form]
        if kernel and not qmatvec.available():
            continue
        start = time.perf_counter()
        models[form] = load.load_model(path, weights, kernel=kernel)
        load_s[form] = time.perf_counter() - start
        resident[form] = param_bytes(models[form].params)
    return models, dict(file_bytes=path.stat().st_size, resident_bytes=resident, load_s=load_s)


def measure(new_tokens: int = 128, batches=(1, 8), rounds: int = 3) -> dict[str, Any]:
    """W7's figures: tokens/s per contender and batch, the bandwidth bounds, memory, the
    accuracy of bf16 and of int8 blocks quantized from f32."""
    path = pretrained.fetch(pretrained.SMOLLM2)
    models, memory = load_models(path)
    config, tokenizer = models["float32"].config, models["float32"].tokenizer
    bandwidth = copy_bandwidth()
    results = run_record(pretrained.SMOLLM2.name, new_tokens, bandwidth)
    results["memory"] = memory
    results["quantized_path"] = qmatvec.describe()
    if "kernel" in models:
        results["kernel_call"] = kernel_call_overhead()
    for batch in batches:
        tokens, mask = prompts(tokenizer, batch)
        fns = scanlab_contenders(models, tokens, mask, new_tokens)
        for name, fn in (
            (TRANSFORMERS, transformers_contender(path, tokens, mask, new_tokens)),
            (
                LLAMA_CPP,
                llama_cpp_contender(path, tokens, new_tokens) if batch == 1 else None,
            ),
        ):
            if fn is not None:
                fns[name] = fn
        results["contenders"] += timed_contenders(fns, batch, new_tokens, rounds)
        context = tokens.shape[1] + new_tokens // 2  # the average cache length read per step
        for dtype in ("f32", "bf16"):
            results["bounds"].append(bandwidth_bound(config, dtype, batch, context, bandwidth))
        for form, name in (("kept", "quantized"), ("kernel", "kernel")):
            if name in models:
                kept_bytes = memory["resident_bytes"][name]
                results["bounds"].append(
                    bandwidth_bound(config, form, batch, context, bandwidth, kept_bytes)
                )
    f32 = models["float32"]
    results["bf16"] = accuracy(f32, models["bfloat16"].params, new_tokens)
    results["q8"] = accuracy(f32, quantize(f32.params, config), new_tokens)
    if "kernel" in models:
        kernel = models["kernel"].params
        results["kernel"] = accuracy(f32, kernel, new_tokens, batch=8)
        int8 = quant.with_activations(kernel, "int8")
        results["kernel_int8"] = accuracy(f32, int8, new_tokens, batch=8)
    return results


def kernel_call_overhead(calls: int = 2000, rounds: int = 5) -> dict[str, float]:
    """The cost of one kernel call beyond its work: a (1, 32) x (32, N) product `calls` times in
    one scan, per call, against XLA's own dot of the same shape in the same scan; N = 128 is
    two tasks of 64 rows, so the thread pool's hand-off is in it."""
    import jax

    x = jnp.ones((1, 32), jnp.float32)
    weight = qmatvec.pack_rows(
        np.ones((128, 32), np.int8), np.ones((128, 1), np.float16), None, (32,), (128,)
    )
    dense = jnp.ones((32, 128), jnp.float32)

    def repeated(product):
        def run(x):
            def body(carry, _):
                return carry + product(x + carry[0, 0])[:, :1], None

            return jax.lax.scan(body, jnp.zeros((1, 1)), None, length=calls)[0]

        return jax.jit(run)

    kernel, xla = repeated(lambda x: qmatvec.matvec(x, weight)), repeated(lambda x: x @ dense)
    fns = {
        "kernel": lambda: kernel(x).block_until_ready(),
        "xla": lambda: xla(x).block_until_ready(),
    }
    for fn in fns.values():
        fn()
    medians = {name: statistics.median(runs) for name, runs in interleaved(fns, rounds).items()}
    return {f"{name}_us": 1e6 * median / calls for name, median in medians.items()}


def accuracy(model, other_params, new_tokens: int, batch: int = 1) -> dict[str, Any]:
    """Max |logit difference| of other weights vs the f32 model's on the first `batch` chat
    prompts, and greedy tokens in agreement (per prompt: in all and before the first
    difference)."""
    config, params, tokenizer = model
    tokens, mask = prompts(tokenizer, batch)
    f32 = forward(params, tokens, config, attn_mask=mask)
    other = forward(other_params, tokens, config, attn_mask=mask)
    greedy = generate(params, tokens, config, new_tokens, attn_mask=mask).tokens
    greedy_other = generate(other_params, tokens, config, new_tokens, attn_mask=mask).tokens
    same = np.asarray(greedy == greedy_other)[:, tokens.shape[1] :]
    before = [int(np.argmin(row)) if not row.all() else len(row) for row in same]
    real = np.asarray(mask)[..., None]
    return dict(
        max_logit_diff=float(jnp.max(jnp.where(real, jnp.abs(f32 - other), 0))),
        max_logit=float(jnp.max(jnp.where(real, jnp.abs(f32), 0))),
        tokens_agreeing_before_first_difference=min(before),
        tokens_agreeing=int(same.sum()),
        new_tokens=new_tokens * batch,
        prompts=batch,
        agreeing_before_first_difference_per_prompt=before,
    )
