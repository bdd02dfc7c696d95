"""The benchmark report as markdown: one section per workload, every table through `table`."""

from __future__ import annotations

from collections.abc import Sequence

from scanlab.bench import decoding as w7
from scanlab.bench import gemma3 as w13
from scanlab.bench import serving as w16
from scanlab.bench.contender import DECODE_PROMPT, LLAMA_CPP, SCANLAB
from scanlab.bench.results import bound, by_shape, contender, decode_rate, first_token_s
from scanlab.bench.targets import judge


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """A markdown table's lines: the header, the rule, one line per row of cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def render(results: dict) -> str:
    """The whole report."""
    sections = [
        _header(results),
        _targets(results),
        _latency(results),
        _recurrence(results),
        _layers(results),
        _training(results),
        _generation(results),
        _decoding(results),
        _gemma3(results),
        _sizes(results),
        _serving(results),
        _finetuning(results),
        _sharding(results),
        _processes(results),
        _loops(results),
        _nnx(results),
    ]
    return "\n\n".join(sections) + "\n"


def _header(results: dict) -> str:
    e = results["env"]
    versions = ", ".join(f"{k} {v}" for k, v in e["versions"].items())
    quick = (
        " — **quick mode: smoke-test sizes, not the figures to quote**" if results["quick"] else ""
    )
    return (
        f"# scanlab benchmarks{quick}\n\n"
        f"- date: {e['date']}\n- machine: {e['cpu']}, {e['cores']} cores; JAX backend "
        f"{e['jax_backend']} ({e['device_kind']}), {len(e['devices'])} device(s)\n"
        f"- {versions}; Python {e['python']}\n\n"
        "Times are medians of repeated runs after a warm-up; first calls (tracing and compilation "
        "included) are listed apart. Ratios compare peers measured side by side in this run."
    )


def _targets(results: dict) -> str:
    rows = [(t.name, t.measured, "met" if t.met else "**missed**") for t in judge(results)]
    return "\n".join(["## Targets", "", *table(("target", "measured", ""), rows)])


def _latency(results: dict) -> str:
    lat = results["latency"]
    rows = [
        ("`lax_scan_in_module` (cached)", f"{lat['scanlab_s'] * 1e3:.3f} ms", "1"),
        (
            "hand-jitted `apply`, params reused",
            f"{lat['hand_jit_s'] * 1e3:.3f} ms",
            f"{lat['hand_jit_s'] / lat['scanlab_s']:.2f}×",
        ),
        (
            "textbook `init` + `apply` per call",
            f"{lat['textbook_s'] * 1e3:.1f} ms",
            f"{lat['textbook_s'] / lat['scanlab_s']:.0f}×",
        ),
    ]
    return "\n".join(
        [
            "## W1 — the seed function, called repeatedly",
            "",
            *table(("call", "median", "vs scanlab"), rows),
        ]
    )


def _recurrence(results: dict) -> str:
    limit = max(results["matmul_flops"].values())
    rates = ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in results["matmul_flops"].items())
    lines = [
        "## W2 — the recurrence h ← tanh(h @ W) against its peers",
        "",
        f"Machine limit, one large float32 matmul: {rates}. The flax nn.scan twin lowers to "
        "the same XLA while loop as scanlab, so their gap is the machine's noise: compare it "
        "with the quartiles.",
        "",
        "![recurrence](recurrence.png)",
        "",
    ]
    header = (
        "peer",
        "first call",
        "median (quartiles)",
        "vs scanlab",
        "GFLOP/s",
        "of matmul limit",
        "max diff",
    )
    for shape, timings in by_shape(results).items():
        scanlab = next(t for t in timings if t["peer"] == "scanlab")
        rows = []
        for t in sorted(timings, key=lambda t: t["median_s"]):
            rate = shape.flops / t["median_s"]
            rows.append(
                (
                    t["peer"],
                    f"{t['first_s'] * 1e3:.1f} ms",
                    f"{t['median_s'] * 1e3:.2f} ms ({t['p25_s'] * 1e3:.2f}–{t['p75_s'] * 1e3:.2f})",
                    f"{t['median_s'] / scanlab['median_s']:.2f}×",
                    f"{rate / 1e9:.1f}",
                    f"{rate / limit:.0%}",
                    f"{t['max_abs_diff']:.1e}",
                )
            )
        lines += [f"### B={shape.B}, H={shape.H}, T={shape.T}", "", *table(header, rows), ""]
    return "\n".join(lines).rstrip()


def _layers(results: dict) -> str:
    rows = [
        (
            p["n_layers"],
            f"{p['scan_compile_s']:.2f} s",
            f"{p['loop_compile_s']:.2f} s",
            f"{p['scan_compile_s'] / p['loop_compile_s']:.3f}",
            f"{p['scan_run_s'] * 1e3:.1f} ms",
            f"{p['loop_run_s'] * 1e3:.1f} ms",
            f"{p['scan_run_s'] / p['loop_run_s']:.2f}",
        )
        for p in results["layers"]
    ]
    remat_rows = []
    for p in results["remat"]:
        none = next(
            q for q in results["remat"] if q["n_layers"] == p["n_layers"] and q["policy"] == "none"
        )
        remat_rows.append(
            (
                p["n_layers"],
                p["policy"],
                f"{p['temp_bytes'] / 2**20:.1f} MiB",
                f"{p['temp_bytes'] / none['temp_bytes']:.2f}×",
                f"{p['grad_s'] * 1e3:.1f} ms",
            )
        )
    return "\n".join(
        [
            "## W3 — scan over layers vs a Python loop over layers",
            "",
            "RMSNorm + attention + SwiGLU blocks; compile = lower + compile of the jitted "
            "forward; run = steady forward.",
            "",
            "![layers](layers.png)",
            "",
            *table(
                (
                    "layers",
                    "scan compile",
                    "loop compile",
                    "scan/loop",
                    "scan run",
                    "loop run",
                    "scan/loop",
                ),
                rows,
            ),
            "",
            "A training gradient per remat policy: temporary memory (XLA's compiled memory "
            "analysis) and steady step time. none: keep every activation; full: keep each "
            "layer's input; dots: keep the matmul outputs; sqrt: √L nested segments of the layer "
            "scan.",
            "",
            *table(("layers", "policy", "temp memory", "vs none", "gradient step"), remat_rows),
        ]
    )


def _training(results: dict) -> str:
    rows = [
        (
            name,
            p["steps"],
            f"{p['scan_steps_per_s']:.0f}",
            f"{p['loop_steps_per_s']:.0f}",
            f"{p['scan_steps_per_s'] / p['loop_steps_per_s']:.2f}×",
        )
        for name, p in results["training"].items()
    ]
    return "\n".join(
        [
            "## W4 — training: K steps per scanned call vs a Python loop of jitted steps",
            "",
            *table(("model", "steps", "scanned steps/s", "loop steps/s", "scan/loop"), rows),
        ]
    )


def _generation(results: dict) -> str:
    rows = [
        (
            p["batch"],
            p["prompt"],
            p["new_tokens"],
            f"{p['cached_tokens_per_s']:.0f}",
            f"{p['recompute_tokens_per_s']:.0f}",
            f"{p['cached_tokens_per_s'] / p['recompute_tokens_per_s']:.1f}×",
            p["same_tokens"],
        )
        for p in results["generation"]
    ]
    header = (
        "batch",
        "prompt",
        "new tokens",
        "cached tokens/s",
        "recompute tokens/s",
        "speed-up",
        "same tokens",
    )
    return "\n".join(
        ["## W5 — generation: KV cache vs recomputing the prefix", "", *table(header, rows)]
    )


def _decoding(results: dict) -> str:
    decoding = results.get("decoding")
    if not decoding:
        return "## W7 — decoding a real model\n\nNot run in quick mode (it loads the real model)."
    n = decoding["new_tokens"]
    lines = [
        f"## W7 — decoding {decoding['model']}, {n} new tokens per row, greedy",
        "",
        f"Measured {decoding['date']}. Copy bandwidth in the same run: "
        f"{decoding['copy_bandwidth_gb_s']:.1f} GB/s. "
        "The bound is batch × bandwidth ÷ bytes read per step (every weight, plus the KV cache).",
        "",
        *_contender_table(decoding, w7.TRANSFORMERS),
    ]
    ours = contender(decoding, w7.SCANLAB_F32, 1)
    streamed = contender(decoding, w7.SCANLAB_STREAMED, 1)
    if ours and streamed:
        per_token = (streamed["median_s"] - ours["median_s"]) / n
        verb = "costs" if per_token >= 0 else "saves"
        lines += [
            "",
            f"Streaming each token as it is produced {verb} {abs(per_token) * 1e3:.2f} ms per "
            f"token at batch 1 (per-token compiled scans vs one while_loop).",
        ]
    lines += _not_installed(decoding)
    if "memory" in decoding:  # runs before weights were kept quantized have none
        lines += ["", *_memory(decoding["memory"])]
    for key, what in (
        ("bf16", "bf16"),
        ("q8", "int8 blocks of 32 quantized from the f32 weights (`decoder.quantize`)"),
        ("kernel", "The kernel (f32 arithmetic, the default)"),
        ("kernel_int8", "The kernel with int8 activations (llama.cpp's arithmetic)"),
    ):
        figures = decoding.get(key)
        if figures is None:
            continue
        prompts = figures.get("prompts", 1)
        on = "a chat prompt" if prompts == 1 else f"the {prompts} chat prompts"
        # The canonical kernel figures were measured when a prompt's rows took XLA's matmul of
        # the dequantized weights, not the kernel: their logits say nothing of its arithmetic.
        logits = (
            ""
            if key.startswith("kernel")
            else f"max |logit difference| {figures['max_logit_diff']:.2f} (logits up to "
            f"{figures['max_logit']:.1f}); "
        )
        lines += [
            "",
            f"{what} against f32 on {on}: {logits}"
            f"{figures['tokens_agreeing']} of {figures['new_tokens']} greedy tokens agree, "
            + (
                f"the first {figures['tokens_agreeing_before_first_difference']} in a row."
                if prompts == 1
                else "in a row per prompt before the first difference: "
                + ", ".join(map(str, figures["agreeing_before_first_difference_per_prompt"]))
                + "."
            ),
        ]
    lines += _kernel_lines(decoding, w7.SCANLAB_KERNEL)
    return "\n".join(lines)


def _kernel_lines(decoding: dict, kernel_name: str) -> list[str]:
    """Which quantized path ran, the kernel's per-call cost and the bandwidth it reaches."""
    if "quantized_path" not in decoding:  # runs before the kernel have none
        return []
    lines = ["", f"Quantized path in this run: {decoding['quantized_path']}."]
    call = decoding.get("kernel_call")
    if call:
        lines[-1] += (
            f" One kernel call on a (1, 32) × (32, 128) product (two tasks on the thread pool) "
            f"costs {call['kernel_us']:.1f} µs inside a scan (XLA's own dot of that shape: "
            f"{call['xla_us']:.1f} µs)."
        )
    for batch in (1, 8):
        kernel = contender(decoding, kernel_name, batch)
        if kernel is None:
            continue
        step = next(b for b in decoding["bounds"] if b["dtype"] == "kernel" and b["batch"] == batch)
        reached = kernel["tokens_per_s"] / batch * step["bytes_per_step"] / 1e9
        lines.append(
            f"At batch {batch} the kernel reads {step['bytes_per_step'] / 1e6:.0f} MB per step: "
            f"{reached:.1f} GB/s of the {decoding['copy_bandwidth_gb_s']:.1f} GB/s copy bandwidth."
        )
    return lines


def _contender_table(decoding: dict, transformers: str) -> list[str]:
    """W7's and W13's table: each contender's figures, against transformers and, for scanlab's
    and transformers', its bandwidth bound; then the bounds themselves."""
    rows: list[tuple[object, ...]] = []
    for c in decoding["contenders"]:
        theirs = contender(decoding, transformers, c["batch"])
        form = weight_form(c["name"])
        bounded = c["name"].startswith("scanlab") or c["name"] == transformers
        rows.append(
            (
                c["name"],
                c["batch"],
                f"{c['tokens_per_s']:.1f}",
                f"{c['median_s']:.2f}",
                f"{c['first_s']:.2f}",
                f"{c['tokens_per_s'] / theirs['tokens_per_s']:.2f}×" if theirs else "—",
                f"{c['tokens_per_s'] / bound(decoding, form, c['batch']):.0%} ({form})"
                if bounded
                else "—",
            )
        )
    header = (
        "contender",
        "batch",
        "tokens/s",
        "s per run",
        "first call s",
        "vs transformers",
        "of its bound (weights)",
    )
    return table(header, rows + _bound_rows(decoding))


def weight_form(contender_name: str) -> str:
    """The bound a scanlab contender is held to: "kernel" (GGUF blocks in the kernel's layout),
    "kept" (GGUF blocks as int8), "bf16" or "f32"."""
    if "kernel" in contender_name:
        return "kernel"
    if "kept" in contender_name:
        return "kept"
    return "bf16" if "bf16" in contender_name else "f32"


def _memory(memory: dict) -> list[str]:
    """Each weight form's resident bytes against the file's, and its load time."""
    file_bytes = memory["file_bytes"]
    rows = [
        (
            weights,
            f"{resident / 1e6:.0f}",
            f"{resident / file_bytes:.2f}×",
            f"{memory['load_s'][weights]:.1f}",
        )
        for weights, resident in memory["resident_bytes"].items()
    ]
    header = ("weights", "resident MB", "vs the file", "load s")
    return [f"The file: {file_bytes / 1e6:.0f} MB.", "", *table(header, rows)]


def _bound_rows(decoding: dict) -> list[tuple[object, ...]]:
    """The bandwidth bounds as rows of the contender table."""
    return [
        (
            f"bandwidth bound, {b['dtype']}",
            b["batch"],
            f"{b['tokens_per_s']:.1f}",
            "",
            "",
            "",
            f"{b['bytes_per_step'] / 1e6:.0f} MB per step",
        )
        for b in decoding["bounds"]
    ]


def _not_installed(decoding: dict) -> list[str]:
    missing = [name for name, present in decoding["installed"].items() if not present]
    if not missing:
        return []
    return ["", f"Not installed in this run, so not measured: {', '.join(missing)}."]


def _gemma3(results: dict) -> str:
    gemma3 = results.get("gemma3")
    if not gemma3:
        return "## W13 — Gemma 3 270M\n\nNot run in quick mode (it loads the real model)."
    context_rows = []
    for ring in (p for p in gemma3["contexts"] if p["ring"]):
        full = next(
            p for p in gemma3["contexts"] if p["context"] == ring["context"] and not p["ring"]
        )
        context_rows.append(
            (
                ring["context"],
                f"{ring['cache_bytes'] / 2**20:.0f}",
                f"{full['cache_bytes'] / 2**20:.0f}",
                f"{ring['cache_bytes'] / full['cache_bytes']:.3f}",
                f"{ring['tokens_per_s']:.2f}",
                f"{full['tokens_per_s']:.2f}",
                f"{ring['tokens_per_s'] / full['tokens_per_s']:.2f}×",
            )
        )
    context_header = (
        "context",
        "ring MiB",
        "full-length MiB",
        "ring / full",
        "ring tokens/s",
        "full tokens/s",
        "speedup",
    )
    compile_s = gemma3["compile"]
    lines = [
        f"## W13 — {gemma3['model']}: layers that differ, in one scan",
        "",
        f"Measured {gemma3['date']}. Copy bandwidth in the same run: "
        f"{gemma3['copy_bandwidth_gb_s']:.1f} GB/s. Decoding {gemma3['new_tokens']} new tokens "
        "per row, greedy, from plain-text prompts (a base model); the f32 weights are read "
        "every step, the tied 262,144-token embedding included.",
        "",
        *_contender_table(gemma3, w13.TRANSFORMERS),
        "",
        "Decoding steps at long contexts, batch 1, f32: the sliding layers' caches as 512-slot "
        "rings against full-length caches on every layer (the window only in the mask).",
        "",
        *table(context_header, context_rows),
        "",
        f"First-call compile of the forward pass: one scan body over the 15 sliding and 3 full "
        f"layers {compile_s['scan']:.1f} s, a Python loop over the 18 layers "
        f"{compile_s['loop']:.1f} s ({compile_s['scan'] / compile_s['loop']:.2f}×).",
    ]
    if "memory" in gemma3:
        lines += ["", *_memory(gemma3["memory"])]
    lines += _kernel_lines(gemma3, w13.SCANLAB_KERNEL)
    lines += _not_installed(gemma3)
    return "\n".join(lines)


def _sizes(results: dict) -> str:
    sizes = results.get("sizes")
    if not sizes:
        return "## W17 — real sizes\n\nNot run in quick mode (it writes and loads files of 1–8B)."
    names = sizes["contenders"]
    ours = [name for name in names if name != LLAMA_CPP]
    against = ours if LLAMA_CPP in names else []  # the ratios to llama.cpp, where it ran
    load_rows, first_rows, decode_rows = [], [], []
    for file in sizes["files"]:
        name, nbytes, figures = file["name"], file["file_bytes"], file["contenders"]
        for who, mine in figures.items():
            load_rows.append(
                (
                    name,
                    f"{file['params'] / 1e9:.2f}",
                    f"{nbytes / 2**20:,.0f}",
                    who,
                    f"{mine['load_s']:.2f}",
                    f"{mine['load_s'] / (nbytes / 1e9):.2f}",
                    _mib_and_ratio(mine["load_peak_bytes"], nbytes),
                    _mib_and_ratio(mine["peak_bytes"], nbytes),
                )
            )
        for row in figures[SCANLAB]["first_token"]:
            seconds = {who: first_token_s(figures[who], row["prompt"]) for who in names}
            first_rows.append(
                (
                    name,
                    row["prompt"],
                    *(_or_dash(seconds[who], ".3f") for who in names),
                    *(_ratio(seconds[LLAMA_CPP], seconds[who]) for who in against),
                    f"{row['first_call_s']:.2f}",
                )
            )
        one = {who: decode_rate(figures[who], 1) for who in names}
        eight = {who: decode_rate(figures[who], 8) for who in ours}
        decode_rows.append(
            (
                name,
                *(_or_dash(one[who], ".1f") for who in names),
                *(_ratio(one[who], one[LLAMA_CPP]) for who in against),
                *(_or_dash(eight[who], ".1f") for who in ours),
                _ratio(eight[SCANLAB], one[SCANLAB]),
            )
        )
    plan = sizes["files"][0]["plan"]
    return "\n".join(
        [
            "## W17 — real sizes: scanlab against llama.cpp on the same GGUF files",
            "",
            f"Measured {sizes['date']}, contenders: {', '.join(names)} (scanlab's default is the "
            "kernel's exact f32 arithmetic). The Llama-shaped files are written at benchmark "
            "time with random blocks (real shapes, SmolLM2's 49,152-token vocabulary); SmolLM2 "
            "and Gemma 3 are the real files. Each contender loads the file in a process of its "
            "own; memory is its peak resident size above that process's start (its library "
            "loaded; for scanlab, JAX's devices, the kernel's library and one trivial program "
            "compiled), while loading and over the whole run. Medians of "
            f"{plan['rounds']} calls after a first one, contenders taking turns round by round.",
            "",
            *table(
                (
                    "file",
                    "params (B)",
                    "file MiB",
                    "contender",
                    "load s",
                    "s per GB",
                    "load peak MiB (× file)",
                    "run peak MiB (× file)",
                ),
                load_rows,
            ),
            "",
            "Time to the first token: one call from a prompt of random token ids to one token; "
            "a speed ratio is llama.cpp's seconds over scanlab's (above 1: scanlab faster). "
            "scanlab's first call includes its compilation.",
            "",
            *table(
                (
                    "file",
                    "prompt",
                    *(f"{who} s" for who in names),
                    *(f"{who} vs llama.cpp" for who in against),
                    "scanlab first call s",
                ),
                first_rows,
            ),
            "",
            f"Decoding after a {DECODE_PROMPT}-token prompt, greedy: tokens/s of the tokens "
            "after the first (scanlab: its `generate` of N tokens less its `generate` of 1; "
            "llama.cpp: from its first token to its last). llama-cpp-python decodes one "
            "sequence per call, so batch 8 is scanlab's alone.",
            "",
            *table(
                (
                    "file",
                    *(f"{who}, batch 1" for who in names),
                    *(f"{who} vs llama.cpp" for who in against),
                    *(f"{who}, batch 8" for who in ours),
                    "scanlab batch 8 vs batch 1",
                ),
                decode_rows,
            ),
            "",
            "![tokens/s and memory against model size](sizes.png)",
        ]
    )


def _serving(results: dict) -> str:
    serving = results.get("serving")
    if not serving:
        return "## W16 — many users at once\n\nNot run in quick mode (it starts two servers)."
    plan = serving["plan"]
    rows = []
    for file in serving["files"]:
        theirs = {row["clients"]: row for row in file["servers"].get(w16.LLAMA_SERVER, [])}
        for who, figures in file["servers"].items():
            for row in figures:
                peer = theirs.get(row["clients"])
                rows.append(
                    (
                        file["name"],
                        who,
                        row["clients"],
                        f"{row['tokens_per_s']:.1f}",
                        _ratio(row["tokens_per_s"], peer["tokens_per_s"]) if peer else "–",
                        _quantile_pair(row["first_token_s"], 1000),
                        _quantile_pair(row["inter_token_s"], 1000),
                    )
                )
        rows.append(
            (
                file["name"],
                "one at a time (scanlab chat's path)",
                "any",
                f"{file['one_at_a_time_tokens_per_s']:.1f}",
                "",
                "",
                "",
            )
        )
    return "\n".join(
        [
            "## W16 — many users at once: scanlab serve against llama-server",
            "",
            f"Measured {serving['date']}, servers: {', '.join(serving['servers'])}, each a "
            f"process of its own on the same GGUF file, {plan['slots']} slots of "
            f"{plan['context']} positions each (llama-server: `-np {plan['slots']} -c "
            f"{plan['slots'] * plan['context']}`, continuous batching, 2 threads, built from "
            f"the llama.cpp that llama-cpp-python 0.3.36 vendors; scanlab: {plan['steps']} "
            "decoding steps per dispatch). Every client is a thread with the official `openai` "
            f"package streaming one chat answer of {plan['new_tokens']} tokens (greedy, "
            "`ignore_eos`, llama-server's prompt cache off), each client its own question; "
            f"after an uncounted round, {plan['rounds']} rounds, the servers taking turns. "
            "Aggregate tokens/s: every answer's tokens over the time from the first request to "
            "the last token (median over rounds); first token: from sending a request to its "
            "first text; inter-token: a request's (last − first token time) / (tokens − 1); "
            "medians and 95th percentiles over every request. One at a time: `scanlab chat`'s "
            "decoding (one token per step, the prompt's prefill included) — what users served "
            "one after another get, in aggregate, whatever their number.",
            "",
            *table(
                (
                    "file",
                    "server",
                    "clients",
                    "tokens/s (all clients)",
                    "vs llama-server",
                    "first token ms, median / p95",
                    "inter-token ms, median / p95",
                ),
                rows,
            ),
            "",
            "![aggregate tokens/s and time to first token against the clients](serving.png)",
        ]
    )


def _quantile_pair(quantiles: dict, scale: float) -> str:
    return f"{quantiles['median'] * scale:.0f} / {quantiles['p95'] * scale:.0f}"


def _mib_and_ratio(nbytes: int, file_bytes: int) -> str:
    return f"{nbytes / 2**20:,.0f} ({nbytes / file_bytes:.2f}×)"


def _or_dash(value: float | None, spec: str) -> str:
    """`value` formatted, or "—" where it was not measured."""
    return "—" if value is None else f"{value:{spec}}"


def _ratio(numerator: float | None, denominator: float | None) -> str:
    return "—" if numerator is None or denominator is None else f"{numerator / denominator:.2f}×"


def _finetuning(results: dict) -> str:
    tuning = results.get("finetuning")
    title = "## W14 — fine-tuning a real model: K steps per scanned call"
    if not tuning:
        return f"{title}\n\nNot run in quick mode (it loads the real model)."
    points = tuning["points"]
    forms = {"lora-int8": "LoRA, int8 base", "lora-f32": "LoRA, f32 base", "full": "full, f32"}

    def ratio(point: dict) -> str:
        scanned = next(
            p
            for p in points
            if (p["form"], p["remat"], p["way"]) == (point["form"], point["remat"], "scanned")
        )
        return f"{scanned['steps_per_s'] / point['steps_per_s']:.2f}×"

    rows = [
        (
            forms[p["form"]],
            p["remat"],
            p["way"],
            f"{p['steps_per_s']:.2f}",
            f"{p['tokens_per_s']:.0f}",
            f"{p['first_call_extra_s']:.1f}" if p["way"] in ("scanned", "loop") else "–",
            ratio(p),
        )
        for p in points
    ]
    memory_rows = [
        (forms[form], remat, f"{nbytes / 2**20:.0f}")
        for form, per_remat in tuning["memory"].items()
        for remat, nbytes in per_remat.items()
    ]
    header = ("form", "remat", "way", "steps/s", "tokens/s", "compile s", "scanned / this")
    return "\n".join(
        [
            title,
            "",
            f"Measured {tuning['date']}. {tuning['model']}, batch {tuning['batch']} × "
            f"{tuning['seq_len']} tokens of chat "
            f"rows, {tuning['steps_per_call']} AdamW steps per timed call (scanlab: one scanned "
            f"chunk, or a Python loop of jitted steps), LoRA rank {tuning['lora_rank']} on all "
            "seven projections; medians of interleaved rounds. tokens/s counts every position of "
            "the padded rows; compile s is the first call's extra time over a steady one.",
            "",
            *table(header, rows),
            "",
            "XLA's compiled temporary memory of one chunk, per remat policy:",
            "",
            *table(("form", "remat", "temporary MiB"), memory_rows),
        ]
    )


def _processes(results: dict) -> str:
    title = "## W15 — one training run as several processes (jax.distributed)"
    runs = results.get("processes")
    if not runs:
        return f"{title}\n\nNot measured in this run."
    by = {(p["devices"], p["way"]): p for p in runs["points"]}
    rows = []
    for n in sorted({p["devices"] for p in runs["points"]}):
        apart, together = by[(n, "processes")], by[(n, "one process")]
        rows.append(
            (
                n,
                f"{apart['steps_per_s']:.1f}",
                f"{together['steps_per_s']:.1f}",
                f"{apart['steps_per_s'] / together['steps_per_s']:.2f}×",
                f"{apart['compile_s']:.1f}",
                f"{together['compile_s']:.1f}",
            )
        )
    header = (
        "devices",
        "N processes, steps/s",
        "1 process, N devices, steps/s",
        "processes / one",
        "compile s (processes)",
        "compile s (one)",
    )
    return "\n".join(
        [
            title,
            "",
            f"{'Measured ' + runs['date'] + '. ' if 'date' in runs else ''}"
            f"The default training run (tiny decoder, global batch {runs['global_batch']}, mesh "
            f"data=N, {runs['steps_per_call']} steps per scanned call), as N processes of one "
            "device each on this machine (gloo collectives over loopback, every process "
            "compiling on its own) against one process presenting N host devices; steady "
            "steps/s and the first call's extra time. On a real cluster the collectives run "
            "over the network (or the accelerators' links) and each process has its own cores.",
            "",
            *table(header, rows),
        ]
    )


def _sharding(results: dict) -> str:
    shard = results.get("sharding")
    if not shard:
        return "## W6 — several devices\n\nNot measured: this run had one device."
    forward, train = shard["forward"], shard["training"]
    one_s, mesh_s = forward["one device"]["run_s"], forward["mesh"]["run_s"]
    one_rate = train["one device"]["scan_steps_per_s"]
    mesh_rate = train["mesh"]["scan_steps_per_s"]
    mesh = ", ".join(f"{k}={v}" for k, v in shard["mesh"].items())
    rows = [
        (
            f"scanned forward, {forward['batch']} sequences",
            f"{one_s * 1e3:.1f} ms",
            f"{mesh_s * 1e3:.1f} ms",
            f"{one_s / mesh_s:.2f}×",
            f"{forward['mesh']['max_abs_diff']:.1e}",
        ),
        (
            "training, scanned chunks",
            f"{one_rate:.0f} steps/s",
            f"{mesh_rate:.0f} steps/s",
            f"{mesh_rate / one_rate:.2f}×",
            "",
        ),
    ]
    return "\n".join(
        [
            f"## W6 — several devices (mesh {mesh}; on a CPU, host devices)",
            "",
            *table(("workload", "one device", "mesh", "speed-up", "max diff"), rows),
        ]
    )


def _loops(results: dict) -> str:
    figures = results["loops"]
    masked = [
        (
            p["B"],
            p["H"],
            p["T"],
            f"{p['masked_s'] * 1e3:.3f} ms",
            f"{p['plain_s'] * 1e3:.3f} ms",
            f"{p['masked_s'] / p['plain_s']:.2f}×",
        )
        for p in figures["masked"]
    ]
    while_rows = [
        (
            f"{p['steps_taken']} / {p['max_steps']}",
            f"{p['bounded_while_s'] * 1e3:.3f} ms",
            f"{p['while_loop_s'] * 1e3:.3f} ms",
            f"{p['scan_max_steps_s'] * 1e3:.3f} ms",
        )
        for p in figures["while"]
    ]
    remat_rows = [
        (
            p["T"],
            p["policy"],
            p["segments"],
            f"{p['temp_bytes'] / 2**20:.2f} MiB",
            f"{p['grad_s'] * 1e3:.1f} ms" if p["grad_s"] is not None else "—",
        )
        for p in figures["remat"]
    ]
    linear_rows = []
    for p in figures["linear"]:
        scan_s, assoc_s = p["scan_s"], p["associative_s"]
        winner = "scan" if scan_s <= assoc_s else "associative"
        linear_rows.append(
            (
                p["T"],
                p["D"],
                f"{scan_s * 1e3:.3f} ms",
                f"{assoc_s * 1e3:.3f} ms",
                f"{winner}, {max(scan_s, assoc_s) / min(scan_s, assoc_s):.2f}×",
            )
        )
    return "\n".join(
        [
            "## W8–W11 — scanlab.loops",
            "",
            "### W8 — masked_scan over a padded batch (lengths drawn in [T/2, T])",
            "",
            *table(("B", "H", "T", "masked_scan", "lax.scan, all padded steps", "ratio"), masked),
            "",
            "### W9 — a loop that stops early: bounded_while vs lax.while_loop vs a masked scan",
            "",
            "Forward only (`lax.while_loop` has no reverse-mode derivative; the other two do). "
            "Tanh step on (8, 64).",
            "",
            *table(
                (
                    "steps taken / max",
                    "bounded_while",
                    "lax.while_loop",
                    "scan of max_steps, masked",
                ),
                while_rows,
            ),
            "",
            "### W10 — gradient memory per remat policy (h ← tanh(h @ W), B=4, H=256)",
            "",
            "Temporary memory of the compiled `jit(grad)` (XLA's memory analysis) and one steady "
            "gradient.",
            "",
            "![memory per policy](loops-memory.png)",
            "",
            *table(("T", "policy", "segments", "temp memory", "gradient"), remat_rows),
            "",
            "### W11 — linear_scan regime map: sequential vs associative",
            "",
            *table(("T", "width", "scan", "associative", "winner, by"), linear_rows),
        ]
    )


def _nnx(results: dict) -> str:
    figures = results["nnx"]
    recurrence_rows = []
    for p in figures["recurrence"]:
        base = next(
            q
            for q in figures["recurrence"]
            if q["form"] == "linen, raw lax.scan"
            and (q["B"], q["H"], q["T"]) == (p["B"], p["H"], p["T"])
        )
        recurrence_rows.append(
            (
                f"{p['B']}, {p['H']}, {p['T']}",
                p["form"],
                f"{p['first_s'] * 1e3:.1f} ms",
                f"{p['median_s'] * 1e3:.3f} ms",
                f"{p['median_s'] / base['median_s']:.2f}×",
            )
        )
    functional = next(p for p in figures["layers"] if p["form"] == "functional, lax.scan")
    layer_rows = [
        (
            p["form"],
            f"{p['first_s']:.2f} s",
            f"{p['median_s'] * 1e3:.2f} ms",
            f"{p['median_s'] / functional['median_s']:.2f}×",
        )
        for p in figures["layers"]
    ]
    return "\n".join(
        [
            "## W12 — the same loops in linen, Flax NNX and plain JAX",
            "",
            "The recurrence on one W, each form called the way its users call it: "
            "`jax.jit(apply)` for linen, `nnx.jit` for NNX modules; first call = trace + compile "
            "+ run.",
            "",
            *table(
                ("B, H, T", "form", "first call", "steady call", "vs linen raw lax.scan"),
                recurrence_rows,
            ),
            "",
            f"The decoder's layer stack ({functional['n_layers']} layers, the W3 block), forward:",
            "",
            *table(("form", "first call", "steady call", "vs functional"), layer_rows),
        ]
    )
