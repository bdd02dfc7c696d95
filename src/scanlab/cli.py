"""The `scanlab` command. Parses arguments, calls the library, prints; errors become one line.

Each command imports what it needs when it runs: `scanlab --help`, every `--help` and the
argument checks that need no model answer without importing JAX, Flax or the format readers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from scanlab.errors import ArgumentError, ScanlabError

app = typer.Typer(
    help="Loops the JAX way: jax.lax.scan over time, layers, tokens and training steps.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
decoder_app = typer.Typer(
    help="Scan over the stacked layers of a Llama-architecture decoder.", no_args_is_help=True
)
app.add_typer(decoder_app, name="decoder")
console = Console()


# The run named by --coordinator or $JAX_*, joined once the command's own flags have parsed:
# --help and a flag error then answer at once, whatever the environment says.
_run_to_join: list[tuple[Any, float, str | None]] = []


@app.callback()
def read_run_settings(
    coordinator: Annotated[
        str | None,
        typer.Option(
            help="Join a multi-process run: process 0's host:port "
            "[$JAX_COORDINATOR_ADDRESS]. `scanlab launch` sets it for local runs."
        ),
    ] = None,
    num_processes: Annotated[
        int | None,
        typer.Option(help="With --coordinator: processes in the run [$JAX_NUM_PROCESSES]."),
    ] = None,
    process_id: Annotated[
        int | None, typer.Option(help="With --coordinator: this process's id [$JAX_PROCESS_ID].")
    ] = None,
    join_timeout_s: Annotated[
        float,
        typer.Option(
            "--join-timeout",
            envvar="SCANLAB_JOIN_TIMEOUT",
            help="Seconds to wait for every process of the run to join.",
        ),
    ] = 60.0,
) -> None:
    """Reads a multi-process run's settings (jax.distributed); `JoinsRun` commands join it."""
    from scanlab import distributed

    if coordinator is None and (num_processes is not None or process_id is not None):
        raise ArgumentError("--num-processes and --process-id need --coordinator")
    settings = distributed.from_env()
    if coordinator is not None:
        if num_processes is None or process_id is None:
            raise ArgumentError("--coordinator needs --num-processes and --process-id")
        settings = distributed.checked(distributed.Settings(coordinator, num_processes, process_id))
    if settings is None:
        return
    if not join_timeout_s > 0:
        raise ArgumentError(f"--join-timeout must be > 0, got {join_timeout_s:g}")
    devices = os.environ.get(distributed.HOST_DEVICES_ENV)
    if devices is not None:
        if not devices.isdigit():
            raise ArgumentError(
                f"{distributed.HOST_DEVICES_ENV} must be a whole number of devices, got {devices!r}"
            )
        distributed.check_host_devices(distributed.HOST_DEVICES_ENV, int(devices))
    _run_to_join.append((settings, join_timeout_s, devices))


class JoinsRun(typer.core.TyperCommand):
    """A command that does JAX work: in a multi-process run it joins the run first, once its
    flags have parsed (before any JAX computation, as `jax.distributed` requires)."""

    def invoke(self, ctx):
        if _run_to_join:
            from scanlab.launch import NOT_DISTRIBUTED

            if self.name in NOT_DISTRIBUTED:
                raise ArgumentError(
                    f"{self.name} cannot join a multi-process run: {NOT_DISTRIBUTED[self.name]}; "
                    "run it without --coordinator and the JAX_* variables"
                )
            _join(*_run_to_join.pop())
        return super().invoke(ctx)


def _join(settings, join_timeout_s: float, devices: str | None) -> None:
    from scanlab import distributed, sharding

    if devices is not None:  # started by `scanlab launch`
        sharding.host_devices(int(devices))
        # The launcher is this process's terminal: the Ctrl-C it forwards must arrive, even
        # where the launcher itself was started with SIGINT ignored (a background job).
        signal.signal(signal.SIGINT, signal.default_int_handler)
    distributed.initialize(settings, join_timeout_s=join_timeout_s)
    if not distributed.is_primary():
        console.quiet = True  # the first process speaks for the run


@app.command(cls=JoinsRun)
def run(
    seed: Annotated[int, typer.Option(help="PRNGKey seed for W, in [0, 2**32).")] = 0,
    hidden: Annotated[int, typer.Option(help="State width H.")] = 4,
    T: Annotated[int, typer.Option("--T", "-T", help="Recurrence steps after the first.")] = 10,
    x: Annotated[
        str | None, typer.Option(help="Comma-separated input of length H (default: ones).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print lax_scan_in_module(seed, x, hidden, T): the final hidden state."""
    import json

    import numpy as np

    from scanlab import checks

    # max(.., 1): a bad --hidden is then reported by the check, naming the argument.
    x_values = np.ones(max(hidden, 1), np.float32) if x is None else _parse_floats("--x", x)
    # Checked before JAX loads (finiteness once, here); lax_scan_in_module adds the memory check.
    checks.recurrence_args(seed, x_values, hidden, T)
    checks.all_finite("x", x_values)
    from scanlab.recurrence import lax_scan_in_module

    final = np.asarray(lax_scan_in_module(seed, x_values, hidden, T)).tolist()
    if as_json:
        print(json.dumps({"seed": seed, "hidden": hidden, "T": T, "final": final}))
    else:
        console.print(final)


@app.command("explain", cls=JoinsRun)
def explain_command() -> None:
    """Walk through the blog example scan(lambda c, x: (c + x, x + 2), 0, [1, 2, 3])."""
    from scanlab import explain, render

    steps = explain.trace(explain.blog_body, 0, explain.BLOG_XS)
    console.print(
        render.steps_table(steps, title="scan(lambda c, x: (c + x, x + 2), 0, [1, 2, 3])")
    )
    console.print(f"result: ({steps[-1].carry_out.item()}, {[s.y.item() for s in steps]})")


@app.command("pitfalls", cls=JoinsRun)
def pitfalls_command() -> None:
    """Reproduce each pitfall: the wrong code, the error it raises today, the fix."""
    import numpy as np
    from rich.syntax import Syntax

    from scanlab import pitfalls

    for number, pitfall in enumerate(pitfalls.PITFALLS, start=1):
        result = pitfalls.reproduce(pitfall)
        console.rule(f"{number}. {pitfall.title}")
        console.print("[red]wrong:[/red]")
        console.print(Syntax(pitfall.wrong_code, "python"))
        console.print(f"[red]raises {type(result.error).__name__}:[/red]")
        console.print(pitfalls.error_summary(result.error), markup=False, highlight=False)
        console.print("[green]fix:[/green]")
        console.print(Syntax(pitfall.fixed_code, "python"))
        fixed = result.fixed_result
        fixed = fixed[0] if isinstance(fixed, tuple) else fixed
        console.print(f"[green]fixed result:[/green] {np.asarray(fixed)}")
        console.print(f"why: {pitfall.why}")


@app.command(cls=JoinsRun)
def bench(
    quick: Annotated[
        bool,
        typer.Option(help="Smoke-test sizes, no real models: seconds, not figures to quote."),
    ] = False,
    out: Annotated[
        str, typer.Option(help="Folder for report.md, results.json and plots.")
    ] = "results/bench",
    devices: Annotated[
        int, typer.Option(help="CPU devices to present (for the sharded peer); default: cores.")
    ] = os.cpu_count() or 1,
    only: Annotated[
        str | None,
        typer.Option(
            help="Re-measure only these real-model workloads (comma-separated: W7, W13, W14, "
            "W16, W17) into --out's results.json, a full run's, and rewrite its report."
        ),
    ] = None,
) -> None:
    """Run the benchmarks W1–W17 (--quick leaves out W7, W13, W14, W16 and W17: they load real
    models); write a markdown report with plots."""
    from rich.table import Table

    from scanlab import checks, distributed

    distributed.check_host_devices("--devices", devices)
    checks.writable_dir("--out", out)  # before minutes of measuring
    from scanlab.bench import report, runner, targets

    if only is not None:
        previous, workloads = runner.full_run_to_update(Path(out), only, quick)
    from scanlab import sharding

    sharding.host_devices(devices)  # before any JAX computation in this process
    with console.status("benchmarks") as status:

        def on_progress(message: str) -> None:
            status.update(message)
            console.log(message)

        if only is None:
            results = runner.run(quick=quick, on_progress=on_progress)
        else:
            results = runner.rerun(previous, workloads, on_progress)
    path = report.write(results, out)
    table = Table(title="targets")
    for column in ("target", "measured", ""):
        table.add_column(column)
    for name, measured, ok in targets.judge(results):
        table.add_row(name, measured, "[green]met[/green]" if ok else "[red]missed[/red]")
    console.print(table)
    console.print(f"report: {path}")


@app.command(cls=JoinsRun)
def demo() -> None:
    """The tour: every part of scanlab, end to end."""
    from scanlab import tour

    tour.run(console)


@decoder_app.command("shapes", cls=JoinsRun)
def decoder_shapes(
    preset: Annotated[
        str, typer.Option(help="A preset name: tiny, llama2-7b, llama3-8b.")
    ] = "llama2-7b",
) -> None:
    """The stacked parameter shapes, the per-layer slices seen inside the scan, the count."""
    from scanlab.decoder import config as decoder_config

    config = decoder_config.preset(preset)
    from scanlab import decoder, render

    console.print(
        f"[bold]{preset}[/bold]: stacked parameters (leading axis: {config.n_layers} layers)"
    )
    console.print(render.shape_listing(decoder.param_shapes(config).blocks), highlight=False)
    console.print("inside the scan body, one layer's slice:")
    console.print(render.shape_listing(decoder.layer_shapes(config)), highlight=False)
    count = render.count(decoder.param_count(config))
    console.print(f"parameters: {count} (from the declared shapes)")


MESH_HELP = "Run on a device mesh, e.g. data=4,model=2 (on a CPU, host devices are made to fit)."


@decoder_app.command("compare", cls=JoinsRun)
def decoder_compare(
    layers: Annotated[int, typer.Option(help="Number of layers L.")] = 16,
    d_model: Annotated[int, typer.Option(help="Model width D.")] = 256,
    seq: Annotated[int, typer.Option(help="Sequence length S.")] = 128,
    batch: Annotated[int, typer.Option(help="Batch size B.")] = 1,
    mesh: Annotated[str | None, typer.Option(help=MESH_HELP)] = None,
) -> None:
    """Scan over layers vs a Python loop: same logits, compile and run times."""
    from scanlab import checks, sharding

    for name, value in (
        ("--layers", layers),
        ("--d-model", d_model),
        ("--seq", seq),
        ("--batch", batch),
    ):
        checks.static_int(name, value, minimum=1)
    if d_model % 8:  # the compared block has 4 heads, each of an even width (rotary pairs)
        raise ArgumentError(
            f"--d-model must be a multiple of 8 (4 heads of even width), got {d_model}"
        )
    device_mesh = _mesh(mesh)  # first: it sets the host devices before JAX starts
    from scanlab.bench import layers as layer_bench
    from scanlab.decoder import spec

    weights = spec.param_count(layer_bench.block_config(layers, d_model, seq)) * 4  # float32
    checks.fits_in_memory(f"--layers {layers} --d-model {d_model}", weights)
    if device_mesh is not None and batch % device_mesh.shape[sharding.DATA_AXIS]:
        # Checked before the single-device comparison runs, not after.
        raise ArgumentError(
            f"--batch must be divisible by the mesh's data axis size "
            f"{device_mesh.shape[sharding.DATA_AXIS]}, got {batch}"
        )
    from scanlab import render

    point = layer_bench.measure(layers, d_model=d_model, seq=seq, batch=batch)
    console.print(render.layer_table(point))
    if device_mesh is not None:
        sharded = layer_bench.measure_sharded(
            layers, device_mesh, d_model=d_model, seq=seq, batch=batch
        )
        console.print(
            f"on mesh {dict(device_mesh.shape)}: scanned forward {render.ms(sharded.run_s)}, "
            f"max |logit diff| vs one device {sharded.max_abs_diff:.1e}"
        )


SERVE_CONTEXT = 2048  # `serve`'s default context: every slot holds this many positions
MODEL_HELP = (
    "A .gguf file, a transformers checkpoint directory, or a known model's name (fetched on "
    "first use): smollm2-135m-instruct (chat), gemma3-270m (a base model: plain completion)."
)
DEFAULT_TOKENS = "1,2,3,4"


# The sampling flags of `decoder generate` and `chat`, declared once.
Temperature = Annotated[float, typer.Option(help="0 for greedy decoding.")]
TopK = Annotated[int | None, typer.Option(help="Sample among the k most likely.")]
TopP = Annotated[float, typer.Option(help="Sample among the top_p most likely.")]
MinP = Annotated[float, typer.Option(help="Drop tokens below min_p x the top one.")]
RepetitionPenalty = Annotated[float, typer.Option(help="> 1 discourages repeats.")]
Verbose = Annotated[
    bool, typer.Option(help="Say how the weights are held and which matmul path runs.")
]
Weights = Annotated[
    str | None,
    typer.Option(
        help="How the weights are held: quantized (int8 blocks, a GGUF file's own; the default "
        "for .gguf files and known models), float32 (the default for directories and presets) "
        "or bfloat16."
    ),
]


# The run flags of `train` and `finetune`, declared once.
RunSeed = Annotated[int | None, typer.Option(help="The run's seed [0].")]
CheckpointDir = Annotated[str | None, typer.Option(help="Save orbax checkpoints here.")]
CheckpointEvery = Annotated[int, typer.Option(help="Save every this many chunks.")]
Resume = Annotated[
    bool, typer.Option(help="Continue the run in --checkpoint-dir, with its saved settings.")
]
ResumeStep = Annotated[
    int | None, typer.Option(help="With --resume: continue from this saved step, not the newest.")
]
Plot = Annotated[
    str | None,
    typer.Option(help="Loss curve PNG; default: loss.png beside the checkpoints, else results/."),
]


def _given(**flags) -> dict[str, Any]:
    """The flags given on the command line: those left unset (None) dropped, so a saved run's
    settings or the config's defaults stand for them."""
    return {name: value for name, value in flags.items() if value is not None}


def _sampling(temperature, top_k, top_p, min_p, repetition_penalty) -> dict:
    """generate's sampling keywords from the shared flags."""
    return dict(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
    )


Adapter = Annotated[
    str | None,
    typer.Option(
        help="With what a `scanlab finetune` checkpoint directory, or a PEFT adapter "
        "directory, trained."
    ),
]
AdapterStep = Annotated[
    int | None, typer.Option(help="With --adapter: a saved step; default: the newest.")
]


@decoder_app.command("generate", cls=JoinsRun)
def decoder_generate(
    model: Annotated[str | None, typer.Option(help=MODEL_HELP)] = None,
    preset: Annotated[
        str, typer.Option(help="Random weights of this preset, without --model.")
    ] = "tiny",
    prompt: Annotated[
        str | None, typer.Option(help="Text to continue (needs --model's tokenizer).")
    ] = None,
    chat: Annotated[
        bool, typer.Option(help="Send --prompt as a user message, in the chat template.")
    ] = False,
    tokens: Annotated[
        str | None, typer.Option(help=f"Comma-separated token ids (default {DEFAULT_TOKENS}).")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 16,
    temperature: Temperature = 0.0,
    top_k: TopK = None,
    top_p: TopP = 1.0,
    min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = 1.0,
    weights: Weights = None,
    seed: Annotated[int, typer.Option(help="Seed for sampling and random weights.")] = 0,
    mesh: Annotated[str | None, typer.Option(help=MESH_HELP)] = None,
    adapter: Adapter = None,
    adapter_step: AdapterStep = None,
    verbose: Verbose = False,
) -> None:
    """Generate from a prompt: text (streamed, ending at the end-of-sequence token) or ids."""
    import numpy as np

    from scanlab import checks
    from scanlab.decoder.config import check_weights

    raw_key = checks.seed_key(seed)  # the same seed rule as run and train
    checks.static_int("--max-new-tokens", max_new_tokens, minimum=1)  # before a model loads
    if prompt is not None and tokens is not None:
        raise ArgumentError("pass one of --prompt (text) and --tokens (ids), got both")
    if chat and prompt is None:
        raise ArgumentError("--chat needs --prompt, the user's message")
    if prompt is not None and model is None:
        raise ArgumentError("--prompt needs --model, whose tokenizer turns text into ids")
    if prompt is None:
        token_ids = _parse_ints("--tokens", tokens or DEFAULT_TOKENS)[None]
    if adapter is not None and model is None:
        raise ArgumentError("--adapter needs --model, the model it was trained on")
    check_weights(weights)
    settings = _sampling(temperature, top_k, top_p, min_p, repetition_penalty)
    checks.sampling_options(checks.INT32_MAX, **settings)  # every flag before the model loads
    device_mesh = _mesh(mesh)
    import jax

    from scanlab import decoder
    from scanlab.decoder import load

    key = jax.numpy.asarray(raw_key)
    trained_on = _trained_on(adapter, adapter_step)
    if model is not None:  # the sampling flags against its vocabulary, before the weights
        path = load.resolve(model, weights, on_progress=_progress)
        _check_same_model(adapter, trained_on, model, path)
        checks.sampling_options(load.load_config(path).vocab_size, **settings)
    if model is not None and (prompt is not None or adapter is not None):  # text, or adapted
        with _loading(model, weights):
            config, params, tokenizer = load.load_model(path, weights)
    elif model is not None:  # ids in, ids out: the model's tokenizer is not needed
        with _loading(model, weights):
            (config, params), tokenizer = load.load_weights(path, weights), None
    else:
        (config, params), tokenizer = load.random_weights(preset, key, weights), None
    if adapter is not None and tokenizer is not None:
        params = _with_adapter(load.Model(config, params, tokenizer), adapter, adapter_step).params
    if verbose:
        _describe_weights(params)
    if device_mesh is not None:  # one prompt: parameters sharded, the batch of 1 replicated
        params = decoder.shard_params(params, config, device_mesh)
    if tokenizer is None or prompt is None:
        out = decoder.generate(params, token_ids, config, max_new_tokens, key=key, **settings)
        console.print(f"prompt:    {token_ids[0].tolist()}")
        console.print(f"generated: {np.asarray(out.tokens[0, token_ids.shape[1] :]).tolist()}")
        return
    if chat:
        ids = decoder.Chat(load.Model(config, params, tokenizer)).prompt_ids(prompt)
    else:
        ids = tokenizer.encode(prompt)
    chunks = decoder.stream(
        params,
        np.array([ids]),
        config,
        max_new_tokens,
        key=key,
        stop_tokens=tokenizer.eos_ids,
        pad_token=tokenizer.pad_id,
        **settings,
    )
    if not chat:
        _write(prompt)
    from scanlab.decoder.chat import decode_stream

    for piece in decode_stream(tokenizer, chunks):
        _write(piece)
    _write("\n")


def _describe_weights(params) -> None:
    """What the weights are held as, their bytes, and which quantized matmul path runs."""
    import jax

    from scanlab.decoder import param_bytes, qmatvec, quant, weights

    leaves = jax.tree.leaves(params, is_leaf=weights.is_form)
    kinds = sorted({type(leaf).__name__ for leaf in leaves})
    quantized = any(quant.is_quantized(leaf) for leaf in leaves)
    path = qmatvec.describe() if quantized else "none (dense)"
    _progress(
        f"weights: {', '.join(kinds)}, {param_bytes(params) / 1e6:.0f} MB; quantized path: {path}"
    )


def _progress(message: str) -> None:
    """What scanlab is busy with, on stderr: standard output carries only the results."""
    if not console.quiet:
        print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _loading(model: str, weights: str | None) -> Iterator[None]:
    """One line on stderr while a model's weights load (seconds), ended by the time taken."""
    print(
        f"loading {model} ({weights or 'default'} weights)...", end="", file=sys.stderr, flush=True
    )
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        print(file=sys.stderr)
        raise
    print(f" {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def _write(text: str) -> None:
    if console.quiet:  # a process of a multi-process run other than the first
        return
    sys.stdout.write(text)
    sys.stdout.flush()


@app.command("chat", cls=JoinsRun)
def chat_command(
    model: Annotated[str, typer.Option(help=MODEL_HELP)] = "smollm2-135m-instruct",
    message: Annotated[
        list[str] | None,
        typer.Option(help="Send this message instead of asking (repeat for more turns)."),
    ] = None,
    system: Annotated[str | None, typer.Option(help="A system message.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="The longest answer, in tokens.")] = 256,
    temperature: Temperature = 0.0,
    top_k: TopK = None,
    top_p: TopP = 1.0,
    min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = 1.0,
    weights: Weights = None,
    seed: Annotated[int, typer.Option(help="Seed for sampling.")] = 0,
    adapter: Adapter = None,
    adapter_step: AdapterStep = None,
    verbose: Verbose = False,
) -> None:
    """Chat with a model, answers streamed as they are generated. Empty line or Ctrl-D ends."""
    from scanlab import checks
    from scanlab.decoder.config import check_weights

    checks.static_int("--max-new-tokens", max_new_tokens, minimum=1)
    checks.seed_key(seed)
    check_weights(weights)
    settings = _sampling(temperature, top_k, top_p, min_p, repetition_penalty)
    checks.sampling_options(checks.INT32_MAX, **settings)  # every flag before the model loads
    from scanlab.decoder import chat as chat_lib
    from scanlab.decoder import load
    from scanlab.decoder.formats import tokenizer as tokenizer_lib

    trained_on = _trained_on(adapter, adapter_step)
    path = load.resolve(model, weights, on_progress=_progress)
    _check_same_model(adapter, trained_on, model, path)
    tokenizer = tokenizer_lib.load_tokenizer(path)
    # Said before the weights load.
    if tokenizer.chat_template is None:
        raise ArgumentError(f"--model {model}: {tokenizer_lib.NO_CHAT_TEMPLATE}")
    config = load.load_config(path)
    checks.static_int(
        "--max-new-tokens", max_new_tokens, minimum=1, maximum=chat_lib.longest_answer(config)
    )
    checks.sampling_options(config.vocab_size, **settings)
    with _loading(model, weights):
        config, params = load.load_weights(path, weights)
    tuned = load.Model(config, params, tokenizer)
    if adapter is not None:
        tuned = _with_adapter(tuned, adapter, adapter_step)
    if verbose:
        _describe_weights(tuned.params)
    conversation = chat_lib.Chat(
        tuned,
        system=system,
        max_new_tokens=max_new_tokens,
        sampling=settings,
        seed=seed,
    )
    for text in message if message else _typed_messages():
        if message:
            console.print(f"[bold]you>[/bold] {text}", highlight=False)
        _write("model> ")
        for piece in conversation.reply(text):
            _write(piece)
        _write("\n")


def _trained_on(adapter: str | None, step: int | None) -> str | None:
    """The model an --adapter checkpoint was trained on, the checkpoint verified first (before
    any model is fetched or loaded); None without --adapter."""
    if step is not None and adapter is None:
        raise ArgumentError("--adapter-step needs --adapter")
    if adapter is None:
        return None
    from scanlab import finetune

    if _is_peft(adapter):  # its shapes are checked against the model as it loads
        if step is not None:
            raise ArgumentError(f"--adapter-step picks a checkpoint's step: {adapter} is PEFT's")
        return None
    return finetune.saved_run(adapter, step, ("adapter", "adapter_step"))[1]


def _is_peft(adapter: str) -> bool:
    """Whether --adapter names a PEFT adapter directory (else a fine-tuning checkpoint)."""
    from scanlab.finetune import adapter_files

    return (Path(adapter) / adapter_files.CONFIG_FILE).is_file()


def _with_adapter(model, adapter: str, step: int | None):
    """The loaded `model` with what the --adapter checkpoint (or PEFT directory) trained."""
    from scanlab import finetune

    if _is_peft(adapter):
        return finetune.load_adapter(adapter, model)
    return finetune.with_trained(model, adapter, step)


def _check_same_model(adapter: str | None, trained_on: str | None, model: str, path: Path) -> None:
    """Adapters apply to the model they were trained on: another of the same shapes would take
    them without an error and answer nonsense. Compared as files, however each was named."""
    from scanlab import storage
    from scanlab.decoder.formats import pretrained

    if adapter is None or trained_on is None:
        return
    if trained_on in pretrained.MODELS:  # where it is cached (never fetched to compare)
        recorded = storage.default_cache() / pretrained.MODELS[trained_on].filename
    elif Path(trained_on).exists():
        recorded = Path(trained_on)
    else:  # a model given in memory, or a file since moved: nothing to compare with
        return
    if recorded.resolve() != path.resolve():
        raise ArgumentError(
            f"--adapter {adapter} was trained on {trained_on}, not on --model {model}: pass "
            f"--model {trained_on}"
        )


def _typed_messages():
    """Lines the user types, until an empty line or the end of input."""
    while True:
        try:
            text = console.input("[bold]you>[/bold] ").strip()
        except EOFError:
            return
        if not text:
            return
        yield text


@app.command("serve", cls=JoinsRun)
def serve_command(
    model: Annotated[str, typer.Option(help=MODEL_HELP)] = "smollm2-135m-instruct",
    slots: Annotated[int, typer.Option(help="Requests decoded together (one compiled scan).")] = 8,
    context: Annotated[
        int | None,
        typer.Option(
            help="Positions per slot: a prompt's bucket plus its answer.",
            show_default="the model's context, at most 2048",
        ),
    ] = None,
    steps: Annotated[
        int, typer.Option(help="Decoding steps per dispatch: requests join or leave between.")
    ] = 8,
    queue: Annotated[int, typer.Option(help="Requests that may wait for a slot (then 429).")] = 64,
    host: Annotated[str, typer.Option(help="The address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="The port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="SCANLAB_API_KEY", help="Ask clients for this key (Bearer)."),
    ] = None,
    warm_up: Annotated[
        int,
        typer.Option(help="Compile the prompt buckets up to this many tokens at start-up."),
    ] = 128,
    weights: Weights = None,
) -> None:
    """Serve a model over HTTP with OpenAI's API (/v1/chat/completions, /v1/completions),
    many requests decoded together; a chat page at /. Ctrl-C or SIGTERM stops it."""
    from scanlab import checks

    checks.static_int("--slots", slots, minimum=1)
    checks.static_int("--steps", steps, minimum=1)
    checks.static_int("--queue", queue, minimum=0)
    checks.static_int("--port", port, minimum=0, maximum=65535)
    checks.static_int("--warm-up", warm_up, minimum=0)
    if context is not None:
        checks.static_int("--context", context, minimum=2)
    from scanlab.decoder import config as config_lib
    from scanlab.decoder import load

    config_lib.check_weights(weights)
    path = load.resolve(model, weights, on_progress=_progress)
    config = load.load_config(path)
    context = min(config.max_seq_len, SERVE_CONTEXT) if context is None else context
    checks.static_int("--context", context, minimum=2, maximum=config.max_seq_len)
    from scanlab.serve import engine, server

    engine.check_fits(config, slots, context)  # before the weights load
    server.check_address(host, port)
    with _loading(model, weights):
        loaded = load.load_model(path, weights)
    server.serve(
        loaded,
        Path(model).name if Path(model).exists() else model,
        server.Settings(slots, context, steps, queue, host, port, api_key, warm_up),
        on_progress=_progress,
    )


@app.command("train", cls=JoinsRun)
def train_command(
    # The run's settings default to None: "not given", so --resume can take the saved run's.
    task: Annotated[str | None, typer.Option(help="reverse or add \\[reverse].")] = None,
    steps: Annotated[
        int | None,
        typer.Option(help="Total optimizer steps (add: 6000 at --learning-rate 1e-3) [600]."),
    ] = None,
    chunk_steps: Annotated[
        int | None, typer.Option(help="Steps per compiled lax.scan call [100].")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Examples per step [64].")] = None,
    learning_rate: Annotated[
        float | None, typer.Option(help="Peak AdamW learning rate [0.003].")
    ] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear warm-up steps [100].")] = None,
    seed: RunSeed = None,
    checkpoint_dir: CheckpointDir = None,
    checkpoint_every: CheckpointEvery = 5,
    resume: Resume = False,
    resume_step: ResumeStep = None,
    plot: Plot = None,
    mesh: Annotated[str | None, typer.Option(help=MESH_HELP)] = None,
) -> None:
    """Train a small decoder with the whole loop inside lax.scan; report accuracy and samples."""
    from scanlab import checks

    checks.static_int("--checkpoint-every", checkpoint_every, minimum=1)
    from scanlab import train

    given = _given(
        task=task,
        steps=steps,
        chunk_steps=chunk_steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        warmup_steps=warmup_steps,
        seed=seed,
    )
    if resume and checkpoint_dir is not None:
        # The saved run's settings; a flag given again must agree (train() says where not).
        config = train.saved_config(checkpoint_dir, resume_step).replace(**given)
    else:
        config = train.TrainConfig(**given)
    device_mesh = _mesh(mesh)
    plot_path = _loss_plot(plot, checkpoint_dir, "train-loss.png")
    from scanlab import plots, render

    with render.training_progress(console, f"train {config.task}", config.steps) as on_chunk:
        result = train.train(
            config,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=checkpoint_every,
            resume=resume,
            resume_step=resume_step,
            mesh=device_mesh,
            on_chunk=on_chunk,
        )
    evaluation = train.evaluate(result.state.params, result.config)
    console.print(*render.evaluation(evaluation, int(result.state.step)), sep="\n")
    failed: list[str] = []
    if not console.quiet:  # the first process of a multi-process run writes it
        with _extra("the loss curve", failed):
            path = plots.loss_curve(result.losses, plot_path, f"{config.task}: loss per step")
            console.print(f"loss curve: {path}")
    if failed:
        kept = f"; the run is saved in {checkpoint_dir}" if checkpoint_dir else ""
        raise ScanlabError(f"{failed[0]}{kept}")


@app.command("finetune", cls=JoinsRun)
def finetune_command(
    data_file: Annotated[
        str,
        typer.Option(
            "--data",
            help='A JSONL file, one example per line: {"messages": [...]} conversations (the '
            'loss on the answers) or {"text": "..."} texts.',
        ),
    ],
    # The run's settings default to None: "not given", so --resume can take the saved run's.
    model: Annotated[
        str | None, typer.Option(help=MODEL_HELP + " \\[smollm2-135m-instruct]")
    ] = None,
    lora_rank: Annotated[int | None, typer.Option(help="LoRA's rank r [8].")] = None,
    lora_alpha: Annotated[
        float | None, typer.Option(help="LoRA's alpha: updates scaled by alpha / r [16].")
    ] = None,
    lora_dropout: Annotated[
        float | None, typer.Option(help="Dropout on the adapted inputs [0].")
    ] = None,
    lora_targets: Annotated[
        str | None,
        typer.Option(help="Adapted projections, comma-separated \\[all: q,k,v,o,gate,up,down]."),
    ] = None,
    full: Annotated[
        bool, typer.Option(help="Train every weight (float32) instead of LoRA adapters.")
    ] = False,
    steps: Annotated[int | None, typer.Option(help="Total optimizer steps [100].")] = None,
    chunk_steps: Annotated[
        int | None, typer.Option(help="Steps per compiled lax.scan call [10].")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Examples per step [8].")] = None,
    accumulate: Annotated[
        int | None, typer.Option(help="Micro-batches per step, gradients summed [1].")
    ] = None,
    seq_len: Annotated[
        int | None, typer.Option(help="Row length in tokens \\[the longest example's].")
    ] = None,
    learning_rate: Annotated[
        float | None, typer.Option(help="Peak AdamW learning rate [0.0002].")
    ] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear warm-up steps [10].")] = None,
    eval_fraction: Annotated[
        float | None, typer.Option(help="Share of examples held out for the eval loss [0.1].")
    ] = None,
    remat: Annotated[
        str | None,
        typer.Option(help="Backward-pass recomputation: none, full, dots, sqrt \\[full]."),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            help="The frozen base: quantized (int8) or float32 \\[quantized; --full: float32]."
        ),
    ] = None,
    seed: RunSeed = None,
    checkpoint_dir: CheckpointDir = None,
    checkpoint_every: CheckpointEvery = 5,
    resume: Resume = False,
    resume_step: ResumeStep = None,
    plot: Plot = None,
    merge_to: Annotated[
        str | None,
        typer.Option(
            help="Also write the merged model here: a transformers directory, or a .gguf file "
            "(Q8_0; from a .gguf --model)."
        ),
    ] = None,
    adapter_out: Annotated[
        str | None,
        typer.Option(
            help="Also write the LoRA adapters here as PEFT's adapter directory "
            "(peft.PeftModel.from_pretrained, scanlab chat --adapter)."
        ),
    ] = None,
) -> None:
    """Fine-tune a pretrained model on your examples, K optimizer steps per lax.scan call."""
    from scanlab import checks

    checks.static_int("--checkpoint-every", checkpoint_every, minimum=1)
    lora_given = _given(
        rank=lora_rank,
        alpha=lora_alpha,
        dropout=lora_dropout,
        targets=None if lora_targets is None else tuple(lora_targets.split(",")),
    )
    if full and lora_given:
        raise ArgumentError(f"--full trains every weight: drop --lora-{next(iter(lora_given))}")
    given = _given(
        steps=steps,
        chunk_steps=chunk_steps,
        batch_size=batch_size,
        accumulate=accumulate,
        seq_len=seq_len,
        learning_rate=learning_rate,
        warmup_steps=warmup_steps,
        eval_fraction=eval_fraction,
        remat=remat,
        weights=weights,
        seed=seed,
    )
    import dataclasses

    from scanlab import finetune

    if resume and checkpoint_dir is not None:
        # The saved run's settings; a flag given again must agree (finetune() says where not).
        saved, saved_model = finetune.saved_run(checkpoint_dir, resume_step)
        model = model or saved_model
    else:
        saved, model = finetune.FinetuneConfig(), model or "smollm2-135m-instruct"
    if full:
        given = {"weights": "float32", **given, "lora": None}
    elif lora_given or saved.lora is not None:
        given["lora"] = dataclasses.replace(saved.lora or finetune.LoraConfig(), **lora_given)
    config = saved.replace(**given)
    finetune.data.read_jsonl(data_file)  # a bad file is said before anything is made
    if checkpoint_dir is None:
        raise ArgumentError(
            "finetune keeps what it trains in --checkpoint-dir (the adapters or weights, "
            "resumable; --merge-to adds a merged model): give a new folder"
        )
    plot_path = _loss_plot(plot, checkpoint_dir, "finetune-loss.png")
    like = None
    if merge_to is not None:
        like = _merge_source(Path(merge_to), model)
    if adapter_out is not None:
        if config.lora is None:
            raise ArgumentError("--adapter-out writes LoRA adapters: --full trains no adapters")
        _check_new_path("--adapter-out", Path(adapter_out))
    from scanlab import plots, render

    with render.training_progress(
        console, f"finetune {Path(model).name}", config.steps
    ) as on_chunk:
        result = finetune.finetune(
            model,
            data_file,
            config,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=checkpoint_every,
            resume=resume,
            resume_step=resume_step,
            on_chunk=on_chunk,
            on_loading=lambda what: _progress(f"loading {what} ({config.weights} weights)"),
        )
    # The checkpoint holds the result now; the extras follow, each failure reported after them.
    console.print(
        f"saved: {checkpoint_dir} (step {int(result.state.step)})", highlight=False, soft_wrap=True
    )
    if result.eval_loss is not None:
        console.print(f"held-out loss: {result.eval_loss:.4f}")
    failed: list[str] = []
    if merge_to is not None:
        with _extra("--merge-to", failed):
            written = finetune.save_merged(merge_to, result.tuned, like=like)
            console.print(f"merged model: {written}")
    if adapter_out is not None:
        with _extra("--adapter-out", failed):
            written = finetune.save_adapter(adapter_out, result.tuned, base_model=model)
            console.print(f"PEFT adapter: {written}", highlight=False, soft_wrap=True)
    with _extra("the loss curve", failed):
        title = f"fine-tuning {Path(model).name}: loss"
        console.print(f"loss curve: {plots.loss_curve(result.losses, plot_path, title)}")
    use = (  # a base model (no chat template) continues text instead
        f"chat with it: scanlab chat --model {model} --adapter {checkpoint_dir}"
        if result.tuned.tokenizer.chat_template is not None
        else f"continue text with it: scanlab decoder generate --model {model} --adapter "
        f"{checkpoint_dir} --prompt TEXT"
    )
    console.print(use, highlight=False, soft_wrap=True)
    if failed:
        raise ScanlabError(f"{'; '.join(failed)}; what was trained is saved in {checkpoint_dir}")


def _loss_plot(plot: str | None, checkpoint_dir: str | None, default_name: str) -> Path:
    """Where a run's loss curve goes (--plot; else beside the checkpoints; else results/),
    checked before training: a failed plot must not cost the run."""
    from scanlab import checks, plots

    if plot is not None:
        return plots.checked_path("--plot", plot)
    if checkpoint_dir is not None:
        return checks.writable_dir("--checkpoint-dir", checkpoint_dir) / "loss.png"
    return checks.writable_dir("the results folder", "results") / default_name


@contextlib.contextmanager
def _extra(flag: str, failed: list[str]) -> Iterator[None]:
    """Runs an output made after the result was saved; its failure (a full disk) is recorded
    in `failed` for one line at the end rather than ending the command before the others."""
    try:
        yield
    except (OSError, ScanlabError) as error:
        failed.append(f"{flag} failed: {' '.join(str(error).split())}")


def _check_new_path(flag: str, path: Path) -> None:
    """An output written after training: new (or an empty folder), in a writable folder."""
    from scanlab import checks
    from scanlab.errors import PathExistsError

    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise PathExistsError(f"{flag} {path} exists and is not empty: choose a new path")
    checks.writable_dir(f"{flag}'s folder", path.parent)


def _merge_source(path: Path, model: str) -> Path | None:
    """Checks --merge-to before training: new, in a writable folder, a .gguf only from a GGUF
    model (whose metadata it copies). Returns that GGUF file, or None for a directory."""
    from scanlab.decoder import load

    _check_new_path("--merge-to", path)
    if path.suffix != ".gguf":
        return None
    source = load.resolve(model)
    if source.suffix != ".gguf":
        raise ArgumentError(
            f"--merge-to {path}: a .gguf file copies the metadata of a GGUF --model, got "
            f"{model}; merge to a directory instead"
        )
    return source


@app.command(
    "launch",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    options_metavar="[OPTIONS] -- COMMAND [ARGS]...",
)
def launch_command(
    ctx: typer.Context,
    processes: Annotated[int, typer.Option(help="Processes to start on this machine.")] = 2,
    devices_per_process: Annotated[
        int, typer.Option(help="CPU devices each process presents.")
    ] = 1,
    all_output: Annotated[
        bool, typer.Option(help="Show every process's output, not only process 0's.")
    ] = False,
) -> None:
    """Run a scanlab command as local processes of one JAX program (jax.distributed over
    localhost), e.g. scanlab launch --processes 2 -- train --mesh data=2."""
    if not ctx.args:
        raise ArgumentError("launch needs a scanlab command after --, e.g. -- train --mesh data=2")
    from scanlab import launch

    status = launch.launch(ctx.args, processes, devices_per_process, all_output)
    if status:
        raise typer.Exit(status)


@app.command("evaluate", cls=JoinsRun)
def evaluate_command(
    checkpoint_dir: Annotated[str, typer.Option(help="A `scanlab train` checkpoint directory.")],
    n: Annotated[int, typer.Option(help="Held-out examples to render.")] = 8,
    step: Annotated[int | None, typer.Option(help="A saved step; default: the newest.")] = None,
) -> None:
    """A trained run's held-out accuracy, and its answers to held-out questions."""
    from scanlab import checks

    checks.static_int("--n", n, minimum=1)  # before JAX starts
    from scanlab.train.evaluation import ACCURACY_EXAMPLES

    checks.static_int("--n", n, minimum=1, maximum=ACCURACY_EXAMPLES)
    from scanlab import render, train

    result = train.load(checkpoint_dir, step=step)
    evaluation = train.evaluate(result.state.params, result.config, n)
    console.print(*render.evaluation(evaluation, int(result.state.step)), sep="\n")


def _mesh(spec: str | None):
    """The mesh for --mesh; on a CPU the host is first presented as enough devices."""
    if spec is None:
        return None
    from scanlab import distributed, sharding

    sizes = sharding.parse_mesh(spec)
    distributed.check_host_devices("--mesh", sizes[sharding.DATA_AXIS] * sizes[sharding.MODEL_AXIS])
    try:
        sharding.host_devices(sizes[sharding.DATA_AXIS] * sizes[sharding.MODEL_AXIS])
    except RuntimeError:
        # JAX already runs (called from Python, or a process of a multi-process run, whose
        # devices are set as it joins): make_mesh checks the devices it has.
        pass
    return sharding.make_mesh(spec)


def _parse_floats(name: str, text: str):
    import numpy as np

    try:
        return np.array([float(item) for item in text.split(",")], np.float32)
    except ValueError:
        raise ArgumentError(f"{name} must be comma-separated numbers, got {text!r}") from None


def _parse_ints(name: str, text: str):
    import numpy as np

    # int64: an id too large for int32 reaches the range check and is named there.
    try:
        return np.array([int(item) for item in text.split(",")], np.int64)
    except ValueError:
        raise ArgumentError(f"{name} must be comma-separated integers, got {text!r}") from None


INTERRUPTED = 128 + signal.SIGINT  # the shell's status for a process ended by Ctrl-C


def main() -> None:
    """Entry point: one error path for every command.

    scanlab's own errors (`scanlab.errors.ScanlabError`: bad arguments, unreadable or unwritable
    files, requests the machine cannot hold) print as `error: ...` on one line and exit with
    status 2, and so does a device running out of memory. Ctrl-C prints `error: interrupted` and
    exits with 130; SIGTERM (what `timeout` and schedulers send) does what Ctrl-C does — the
    command's clean-up runs, a training run saves its newest whole state — and exits with 143.
    Anything else is a bug in scanlab: its traceback is printed with a request to report it, exit
    status 1.
    """
    received: list[int] = []

    def interrupt(signum: int, frame) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    from scanlab.checks import spelled_as

    try:
        # typer answers Ctrl-C inside a command by returning 130 when not standalone.
        with spelled_as(_flags(sys.argv[1:])):
            status = app(standalone_mode=False)
        if status == INTERRUPTED:
            _interrupted(received)
        if isinstance(status, int) and status:  # a command's own status (launch: its run's)
            _exit(status)
    except (KeyboardInterrupt, typer.Abort):  # Ctrl-C while typer itself waits (a prompt)
        _interrupted(received)
    except typer.exceptions.TyperException as error:  # parsing: unknown flag, bad value
        message = error.format_message() if hasattr(error, "format_message") else str(error)
        if not message.strip():  # a bare command: its help is already on the screen
            sys.exit(2)
        _fail(message)
    except ScanlabError as error:
        _fail(str(error))
    except Exception as error:
        if _device_out_of_memory(error):
            _fail(f"out of memory: {str(error).splitlines()[0]}")
        if _peer_lost(error):
            _fail(f"a process of this multi-process run was lost: {str(error).splitlines()[0]}")
        _report_bug()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _flags(argv: list[str]) -> dict[str, str]:
    """The invoked command's parameters (and the run-joining ones before it), Python name ->
    flag: library messages then name the flags the user typed (`--max-new-tokens`, not
    `max_new_tokens`)."""
    command = typer.main.get_command(app)
    params = list(command.params)
    words = iter(argv)
    for word in words:
        if word.startswith("--"):  # an option of the group before the command, and its value
            if "=" not in word:
                next(words, None)
            continue
        subcommands = getattr(command, "commands", {})
        if word not in subcommands:
            break
        command = subcommands[word]
        params += command.params
    return {
        param.name: param.opts[0]
        for param in params
        if param.name is not None and param.opts[0].startswith("-")
    }


def _interrupted(received: list[int]) -> None:
    """Exit as the shell reports a signal's end: 128 + its number, with one line saying which."""
    terminated = signal.SIGTERM in received
    print(f"error: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
    _exit(128 + (signal.SIGTERM if terminated else signal.SIGINT))


def _device_out_of_memory(error: Exception) -> bool:
    """Whether `error` is XLA failing to allocate (JAX is imported by then, if it ran at all)."""
    from scanlab import checks

    jax = checks.imported_jax()
    return (
        jax is not None
        and isinstance(error, jax.errors.JaxRuntimeError)
        and ("out of memory" in str(error).lower() or "RESOURCE_EXHAUSTED" in str(error))
    )


def _peer_lost(error: Exception) -> bool:
    """Whether `error` is a collective or the coordination service failing on a lost peer."""
    from scanlab import checks, distributed

    jax = checks.imported_jax()
    return (
        distributed.joined() is not None
        and jax is not None
        and isinstance(error, jax.errors.JaxRuntimeError)
        and any(sign in str(error) for sign in ("Gloo", "peer", "CoordinationService", "heartbeat"))
    )


def _fail(message: str) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    _exit(2)


def _report_bug() -> None:
    traceback.print_exc()
    print(
        "scanlab hit a bug (the traceback above): please report it with the command you ran.",
        file=sys.stderr,
    )
    _exit(1)


def _exit(status: int) -> NoReturn:
    """Ends the process with `status`. A failing process of a multi-process run leaves at once:
    JAX's exit would first wait in a shutdown barrier for its peers, which wait for it; so does
    one whose training chunk still computes (stopped by a second Ctrl-C)."""
    from scanlab import distributed

    loop = sys.modules.get("scanlab.train.loop")  # imported if a run started
    if status and (distributed.joined() is not None or (loop and loop.chunk_running())):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
