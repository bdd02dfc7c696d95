"""No CLI input yields a traceback: bad input is one `error:` line and exit status 2, and only
bad input: a bug inside scanlab, whatever its exception type, prints its traceback (status 1)."""

import importlib
import os
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st


def options(**values) -> st.SearchStrategy[list[str]]:
    """Argument lists: a subset of the options, each with one of its candidate values."""
    pairs = [
        st.tuples(st.just(f"--{name}"), st.sampled_from(choices))
        for name, choices in values.items()
    ]
    return st.lists(st.one_of(*pairs), max_size=4).map(
        lambda items: [a for pair in items for a in pair]
    )


INTS = ["-1", "0", "3", "2147483648", "99999999999", "1.5", "x", ""]
FLOATS = ["nan", "inf", "-1", "0", "0.7", "x"]
COMMANDS = {
    "run": options(
        seed=["-1", "0", "1099511627776", "x"],
        hidden=["-1", "0", "4", "1000000", "x"],
        T=INTS,
        x=["1,2,3,4", "nan,1,2,3", "1,2", "a,b", ""],
    ),
    "decoder generate": options(
        tokens=["1,2,3", "99999999999", "-1", "64", "a", "1,,2", ""],
        prompt=["hello", ""],
        **{"top-p": ["0", "0.9", "2", "nan"], "min-p": ["-1", "0.1", "2"]},
        **{"repetition-penalty": ["0", "1.2", "inf"]},
        weights=["quantized", "float32", "bfloat16", "float16"],
        **{"max-new-tokens": ["-1", "0", "2", "500", "x"]},
        temperature=FLOATS,
        **{"top-k": ["-1", "0", "3", "100000"]},
        seed=["-1", "0", "1099511627776"],
        preset=["tiny", "nope", ""],
        mesh=["data=2", "data=2,data=4", "model=0", "x=1", "data=99999999999"],
        model=["/nonexistent", "/proc"],
    ),
    # --model defaults to the real SmolLM2: every list gets a bad one unless it names its own.
    "chat": options(
        model=["/nonexistent", "/proc", "nope", ""],
        **{"max-new-tokens": ["-1", "0", "x"], "top-k": ["-1", "0", "3"]},
        temperature=FLOATS,
        **{"top-p": ["0", "2"], "min-p": ["-1", "2"], "repetition-penalty": ["0", "nan"]},
        weights=["float16", "int8", "quantized"],
        seed=["-1", "1099511627776"],
    ),
    "decoder shapes": options(preset=["tiny", "llama3-8b", "nope", ""]),
    "evaluate": options(**{"checkpoint-dir": ["/nonexistent", "typo_dir"]}, n=INTS, step=INTS),
    "train": options(
        steps=INTS,
        **{"chunk-steps": INTS, "batch-size": INTS, "warmup-steps": INTS},
        **{"learning-rate": FLOATS, "checkpoint-every": INTS, "resume-step": INTS},
        task=["add", "nope", ""],
        seed=["-1", "1099511627776"],
        mesh=["data=0", "x=1"],
        plot=["/proc/x/loss.png"],
    ),
    "decoder compare": options(
        layers=INTS,
        **{"d-model": ["0", "36", "400000", "x"]},
        seq=INTS,
        batch=INTS,
        mesh=["data=3", "data=0", "model=x"],
    ),
    "bench": options(devices=["-1", "0", "99999999999"], out=["/proc/x"], only=["W7", "W99", ""]),
    "finetune": options(
        steps=INTS,
        **{"chunk-steps": INTS, "batch-size": INTS, "accumulate": INTS, "seq-len": INTS},
        **{"learning-rate": FLOATS, "warmup-steps": INTS, "resume-step": INTS},
        **{"lora-rank": INTS, "lora-alpha": FLOATS, "lora-dropout": ["-1", "0.5", "1", "nan"]},
        **{"lora-targets": ["q_proj", "nope", "", "q_proj,q_proj"], "remat": ["none", "x"]},
        **{"eval-fraction": ["0", "0.5", "1", "-1"], "weights": ["float32", "int8"]},
        model=["/nonexistent", "nope"],
        seed=["-1", "1099511627776"],
    ),
}


@pytest.mark.parametrize("command", COMMANDS)
def test_no_argument_list_gives_a_traceback(command, cli):
    @settings(deadline=None, max_examples=25, database=None)
    @given(args=COMMANDS[command])
    def check(args):
        if command == "bench" and not any(a in ("-1", "0", "99999999999", "/proc/x") for a in args):
            args = [*args, "--out", "/proc/x"]  # never the real benchmarks: a bad flag stops them
        if command == "chat" and "--model" not in args:
            args = [*args, "--model", "/nonexistent"]
        # Never a real run: a bad flag checked after the others stops each one before its work.
        if command == "train":
            args = [*args, "--plot", "/proc/x/loss.png"]
        if command == "decoder compare":
            args = [*args, "--mesh", "data=0"]
        if command == "finetune":
            args = [*args, "--data", "/nonexistent.jsonl"]
        status, err, _ = cli([*command.split(), *args])
        assert "Traceback" not in err, (args, err)
        assert status in (0, 2), (args, status, err)
        if status == 2:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), (args, err)

    check()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--T", "10000000000"], "error: --T must be <= 2147483647, got 10000000000"),
        (["run", "--T", "x"], "error: Invalid value for '--T'"),
        (["run", "--T", "3000000000"], "error: --T must be <= 2147483647, got 3000000000"),
        (
            ["run", "--hidden", "100000", "--T", "1"],
            "error: lax_scan_in_module(hidden=100000, T=1) needs about 37.3 GiB",
        ),
        (
            ["run", "--x", "nan,1,2,3"],
            "error: --x must be finite, got 1 NaN/Inf value(s), first at index (0,)",
        ),
        (
            ["decoder", "generate", "--tokens", "99999999999"],
            "error: --tokens must be ids in [0, vocab_size=64), got tokens[0, 0] = 99999999999",
        ),
        (
            ["decoder", "generate", "--seed", "1099511627776"],
            "error: --seed must be in [0, 2**32), got 1099511627776",
        ),
        (["decoder", "generate", "--seed", "-1"], "error: --seed must be in [0, 2**32), got -1"),
        (
            ["decoder", "generate", "--tokens", "1", "--top-k", "3"],
            "error: --top-k needs --temperature > 0",
        ),
        (
            ["decoder", "generate", "--prompt", "hi"],
            "error: --prompt needs --model, whose tokenizer turns text into ids",
        ),
        (
            ["decoder", "generate", "--prompt", "hi", "--tokens", "1"],
            "error: pass one of --prompt (text) and --tokens (ids), got both",
        ),
        (["decoder", "generate", "--chat"], "error: --chat needs --prompt"),
        # Checked before the model loads (a missing checkpoint would be named otherwise).
        (
            ["decoder", "generate", "--model", "/nonexistent", "--max-new-tokens", "0"],
            "error: --max-new-tokens must be >= 1, got 0",
        ),
        (
            ["decoder", "generate", "--model", "/proc", "--prompt", "hi"],
            "error: /proc must contain config.json",
        ),
        (
            ["chat", "--model", "typo.gguf"],
            "error: --model must be a .gguf file, a checkpoint directory or one of "
            "['gemma3-270m', 'smollm2-135m-instruct'], got 'typo.gguf'",
        ),
        (
            ["chat", "--weights", "float16"],
            "error: --weights must be one of ['quantized', 'float32', 'bfloat16']",
        ),
        (
            ["chat", "--top-p", "2", "--temperature", "1"],
            "error: --top-p must be in (0, 1], got 2.0",
        ),
        (["chat", "--min-p", "0.1"], "error: --min-p needs --temperature > 0"),
        (
            ["decoder", "generate", "--temperature", "nan"],
            "error: --temperature must be finite, got nan",
        ),
        (
            ["decoder", "generate", "--mesh", "data=2,data=4"],
            "error: --mesh must name each axis once, got 'data' twice",
        ),
        (
            ["decoder", "generate", "--mesh", "data=99999999999"],
            "error: --mesh must ask for 1 to 1024 devices, got 99999999999",
        ),
        (["decoder", "compare", "--seq", "0"], "error: --seq must be >= 1, got 0"),
        (
            ["decoder", "compare", "--d-model", "36"],
            "error: --d-model must be a multiple of 8 (4 heads of even width), got 36",
        ),
        (  # the up-front estimate, not an out-of-memory crash after the first compile
            ["decoder", "compare", "--d-model", "400000"],
            "error: --layers 16 --d-model 400000 needs about ",
        ),
        (["bench", "--devices", "0"], "error: --devices must ask for 1 to 1024 devices, got 0"),
        (["bench", "--devices", "-1"], "error: --devices must ask for 1 to 1024 devices, got -1"),
        (
            ["bench", "--quick", "--out", "/proc/x"],
            "error: --out must be a writable directory, got '/proc/x'",
        ),
        (
            ["evaluate", "--checkpoint-dir", "typo_dir"],
            "error: --checkpoint-dir typo_dir does not exist",
        ),
        (
            ["evaluate", "--checkpoint-dir", "typo_dir", "--n", "0"],
            "error: --n must be >= 1, got 0",
        ),
        (
            ["finetune", "--data", "typo.jsonl"],
            "error: --data must be a JSONL file, got 'typo.jsonl'",
        ),
        (
            ["finetune", "--data", "x.jsonl", "--full", "--lora-rank", "4"],
            "error: --full trains every weight: drop --lora-rank",
        ),
        (
            ["finetune", "--data", "x.jsonl", "--accumulate", "3"],
            "error: --accumulate must divide --batch-size=8, got 3",
        ),
        (
            ["finetune", "--data", "x.jsonl", "--lora-targets", "q,v"],
            "error: --lora-targets must be distinct names from ['q_proj', 'k_proj', 'v_proj', "
            "'o_proj', 'gate_proj', 'up_proj', 'down_proj'], got ['q', 'v']",
        ),
        (
            ["finetune", "--data", "x.jsonl", "--full", "--weights", "quantized"],
            "error: full fine-tuning trains float32 weights: pass --weights='float32'",
        ),
        (
            ["chat", "--adapter", "typo_dir"],
            "error: --adapter typo_dir does not exist",
        ),
        (["chat", "--adapter-step", "3"], "error: --adapter-step needs --adapter"),
        (
            ["decoder", "generate", "--adapter", "typo_dir"],
            "error: --adapter needs --model, the model it was trained on",
        ),
        (
            ["decoder", "generate", "--model", "smollm2-135m-instruct", "--adapter", "typo_dir"],
            "error: --adapter typo_dir does not exist",
        ),
        (["launch", "--processes", "0", "--", "train"], "error: --processes must be >= 1, got 0"),
        (
            ["launch", "--processes", "100000", "--", "train"],
            "error: --processes 100000: as many JAX runtimes need at least 25012.2 GiB, more than",
        ),
        (
            ["launch", "--devices-per-process", "100000", "--", "train"],
            "error: --devices-per-process must ask for 1 to 1024 devices, got 100000",
        ),
        (["launch", "--processes", "2"], "error: launch needs a scanlab command after --"),
        (
            ["launch", "--processes", "2", "--", "finetune", "--data", "x.jsonl"],
            "error: launch cannot run `finetune`: fine-tuning runs on one process (no mesh yet)",
        ),
        (
            ["--num-processes", "2", "train"],
            "error: --num-processes and --process-id need --coordinator",
        ),
        (
            ["--coordinator", "127.0.0.1:1", "train"],
            "error: --coordinator needs --num-processes and --process-id",
        ),
    ],
)
def test_each_reported_case_is_one_clear_line(args, message, cli, monkeypatch):
    # Before any long work: no case fetches (or reads from the cache) a model first, which a
    # cached model would hide; on a fresh machine the fetch would come before the error.
    from scanlab.decoder.formats import pretrained

    def fetch(*_, **__):
        raise AssertionError("a model was fetched before the error")

    monkeypatch.setattr(pretrained, "fetch", fetch)
    status, err, _ = cli(args)
    assert status == 2 and err.startswith(message), err


def test_a_plot_path_matplotlib_cannot_write_is_refused_before_training(tmp_path, cli):
    status, err, _ = cli(["train", "--plot", str(tmp_path / "loss.txt")])
    assert status == 2 and err.startswith("error: --plot must end in an image format matplotlib")
    assert ".png" in err and ".svg" in err and f"got '{tmp_path / 'loss.txt'}'" in err
    status, err, _ = cli(["train", "--plot", str(tmp_path)])
    assert status == 2
    assert (
        err == f"error: --plot {tmp_path} is a directory: give a file, e.g. {tmp_path}/loss.png\n"
    )


def test_a_file_or_an_empty_folder_where_a_checkpoint_belongs_is_named_as_such(tmp_path, cli):
    data, file, empty = tmp_path / "facts.jsonl", tmp_path / "file", tmp_path / "empty"
    data.write_text('{"text": "Paris is in France."}\n')
    file.write_text("")
    empty.mkdir()
    cases = [
        (
            ["finetune", "--data", str(data), "--checkpoint-dir", str(file)],
            f"error: --checkpoint-dir must be a directory, got '{file}', a file\n",
        ),
        (
            ["evaluate", "--checkpoint-dir", str(file)],
            f"error: --checkpoint-dir {file} is a file, not a checkpoint directory\n",
        ),
        (
            ["chat", "--adapter", str(empty), "--message", "hi"],
            f"error: --adapter {empty} holds no complete checkpoint\n",
        ),
    ]
    for args, message in cases:
        assert cli(args)[:2] == (2, message)


def test_a_partial_benchmark_run_needs_a_full_run_to_update(tmp_path, cli):
    """`bench --only` re-measures real-model workloads into a full run's results.json."""
    quick = tmp_path / "quick"
    quick.mkdir()
    (quick / "results.json").write_text('{"quick": true}')
    cases = [
        (
            ["--only", "W7,W99"],
            "error: --only must name some of W7, W13, W14, W16, W17, comma-separated, got 'W7,W99'",
        ),
        (
            ["--only", "W17", "--quick"],
            "error: --only updates a full run's figures: leave out --quick",
        ),
        (
            ["--only", "W17", "--out", str(tmp_path / "new")],
            f"error: --only updates a full run's results.json, got none in '{tmp_path / 'new'}': "
            "run the whole benchmark there first",
        ),
        (
            ["--only", "W17", "--out", str(quick)],
            f"error: --only updates a full run's figures, got '{quick / 'results.json'}', "
            "a quick run's",
        ),
    ]
    for args, message in cases:
        assert cli(["bench", "--out", str(tmp_path / "new"), *args])[:2] == (2, message + "\n")
    assert (quick / "results.json").read_text() == '{"quick": true}'


def test_a_fine_tune_that_would_keep_nothing_is_refused_before_loading(tmp_path, cli):
    data = tmp_path / "facts.jsonl"
    data.write_text('{"text": "Paris is in France."}\n')
    status, err, _ = cli(["finetune", "--data", str(data), "--merge-to", str(tmp_path / "out")])
    assert status == 2 and err.startswith(
        "error: finetune keeps what it trains in --checkpoint-dir (the adapters or weights, "
        "resumable; --merge-to adds a merged model): give a new folder"
    )
    assert not (tmp_path / "out").exists()


def test_work_is_not_started_when_an_output_path_is_unwritable(tmp_path, cli):
    # The plot path is checked before training: no checkpoint appears, the error is immediate.
    status, err, _ = cli(
        [
            "train",
            "--steps",
            "20",
            "--warmup-steps",
            "5",
            "--checkpoint-dir",
            str(tmp_path / "run"),
            "--plot",
            "/proc/x/loss.png",
        ]
    )
    assert status == 2 and err.startswith(
        "error: --plot's folder must be a writable directory, got '/proc/x'"
    )
    assert not (tmp_path / "run").exists()  # nothing made, not even the directory


def test_non_finite_training_stops_and_keeps_the_last_good_checkpoint(tmp_path, cli):
    from scanlab import train

    status, err, _ = cli(
        [
            "train",
            "--steps",
            "40",
            "--chunk-steps",
            "10",
            "--warmup-steps",
            "5",
            "--learning-rate",
            "1e30",
            "--checkpoint-dir",
            str(tmp_path / "run"),
        ]
    )
    assert status == 2 and "error: the loss became" in err and "training stopped" in err, err
    status, err, _ = cli(["train", "--learning-rate", "inf"])
    assert status == 2 and err.startswith("error: --learning-rate must be finite, got inf")
    with pytest.raises(ValueError, match="d_model must be a multiple of n_heads=4"):
        train.TrainConfig(d_model=65)


def test_a_real_bug_prints_its_traceback_and_asks_for_a_report():
    script = "import sys; from scanlab import cli; cli.app = lambda **kw: [][1]; sys.argv = ['scanlab']; cli.main()"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "please report it" in result.stderr


@pytest.mark.parametrize(
    ("args", "target", "error"),
    [
        (["run", "--hidden", "4"], "scanlab.checks.recurrence_args", TypeError("unhashable")),
        (["decoder", "shapes", "--preset", "tiny"], "scanlab.render.count", ZeroDivisionError()),
        (["decoder", "shapes", "--preset", "tiny"], "scanlab.decoder.param_count", ValueError),
        (["evaluate", "--checkpoint-dir", "x"], "scanlab.checks.static_int", OSError("bad fd")),
    ],
)
def test_an_injected_bug_is_not_reported_as_bad_input(args, target, error, cli, monkeypatch):
    """TypeError, ArithmeticError, ValueError and OSError raised by a bug, not by a check."""
    module, _, name = target.rpartition(".")

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(importlib.import_module(module), name, broken)
    status, err, _ = cli(args)
    assert status == 1, (status, err)
    assert "Traceback" in err and "please report it" in err


def _raise_keyboard_interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def _send_sigterm(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler interrupts the sleep at once


@pytest.mark.parametrize(
    ("stop", "status", "line"),
    [
        (_raise_keyboard_interrupt, 130, "error: interrupted"),
        (_send_sigterm, 143, "error: terminated"),
    ],
)
def test_ctrl_c_and_sigterm_end_with_their_status_and_one_line(
    stop, status, line, cli, monkeypatch
):
    """Inside a command (typer turns Ctrl-C there into a returned 130, which must not become 0)."""
    monkeypatch.setattr("scanlab.checks.static_int", stop)
    handler = signal.getsignal(signal.SIGTERM)
    got, err, _ = cli(["evaluate", "--checkpoint-dir", "x"])
    assert (got, err.strip()) == (status, line)
    assert signal.getsignal(signal.SIGTERM) is handler  # the CLI's handler is gone again


@pytest.mark.e2e  # a real training process, signalled: `make test-e2e`
def test_sigterm_during_training_saves_the_newest_state_and_exits_143(tmp_path):
    from scanlab import train

    run = tmp_path / "run"
    args = ["--steps", "100000", "--chunk-steps", "20", "--warmup-steps", "5"]
    with subprocess.Popen(
        [sys.executable, "-m", "scanlab", "train", *args, "--checkpoint-dir", str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    ) as process:
        for line in process.stdout:  # not a terminal: one plain line per chunk
            if "step 40/100000" in line:  # two chunks done, no regular save due before chunk 100
                process.send_signal(signal.SIGTERM)
                break
        assert process.wait(timeout=120) == 143
        assert process.stderr.read().strip().splitlines()[-1] == "error: terminated"
    assert int(train.load(run).state.step) >= 40  # the newest whole state, saved on the way out
