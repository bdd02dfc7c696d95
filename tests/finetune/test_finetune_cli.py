"""`scanlab finetune` end to end on a tiny decoder saved as a transformers directory (with the
tiny ChatML tokenizer of `tests/tiny.py`): train, merge, resume with the saved settings, chat with the adapters
and with the merged model; bad input is one line before any work."""

import dataclasses
import json

import jax
import pytest
from tests.tiny import TINY, TINY_TRAIN, tiny_tokenizer

from scanlab.decoder import Model, init_params
from scanlab.finetune import save_merged

pytestmark = pytest.mark.e2e  # whole runs of the command: `make test-e2e`

CONFIG = dataclasses.replace(TINY, max_seq_len=128)  # chat keeps a 64-token prompt bucket


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model = Model(CONFIG, init_params(CONFIG, jax.random.PRNGKey(0)), tiny_tokenizer())
    return save_merged(tmp_path_factory.mktemp("tiny") / "model", model)  # no adapters: as is


@pytest.fixture
def chat_file(tmp_path):
    path = tmp_path / "chat.jsonl"
    lines = [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"Say {i}."},
                    {"role": "assistant", "content": f"{i}."},
                ]
            }
        )
        for i in range(8)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_finetune_merge_resume_and_chat(cli, model_dir, chat_file, tmp_path):
    run, merged, adapter = tmp_path / "run", tmp_path / "merged", tmp_path / "adapter"
    common = ["--data", str(chat_file), "--checkpoint-dir", str(run)]
    settings = "--steps 4 --chunk-steps 2 --batch-size 2 --warmup-steps 1 --eval-fraction 0.25"
    settings += f" --lora-rank 2 --merge-to {merged} --adapter-out {adapter}"
    status, err, out = cli(["finetune", "--model", str(model_dir), *common, *settings.split()])
    assert status == 0, err
    assert "step 4/4" in out and "held-out loss" in out and (run / "loss.png").is_file()
    assert f"chat with it: scanlab chat --model {model_dir} --adapter {run}" in out
    assert (merged / "tokenizer.json").is_file() and (merged / "config.json").is_file()
    assert f"PEFT adapter: {adapter}" in out
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 2
    # --resume takes the saved settings (the model, rank 2, batch 2...): only --steps grows.
    status, err, out = cli(["finetune", *common, "--resume", "--steps", "6"])
    assert status == 0, err
    assert "step 6/6" in out
    answers = []
    for model in (
        ["--model", str(model_dir), "--adapter", str(run)],
        ["--model", str(merged)],
        ["--model", str(model_dir), "--adapter", str(run), "--adapter-step", "4"],
        ["--model", str(model_dir), "--adapter", str(adapter)],  # step 4's, as PEFT's files
    ):
        status, err, out = cli(["chat", *model, "--message", "Say 3.", "--max-new-tokens", "3"])
        assert status == 0 and "model> " in out, err
        answers.append(out)
    assert answers[2] == answers[3]


def test_a_bad_file_or_a_used_output_is_said_before_any_work(cli, model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    status, err, _ = cli(["finetune", "--model", str(model_dir), "--data", str(bad)])
    assert status == 2 and err == f"error: {bad}:2: text must be a non-empty string\n"
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "fine"}\n')
    used = tmp_path / "used"
    used.mkdir()
    (used / "file").write_text("x")
    status, err, _ = cli(
        [
            *["finetune", "--model", str(model_dir), "--data", str(good)],
            *["--checkpoint-dir", str(tmp_path / "run"), "--merge-to", str(used)],
        ]
    )
    assert status == 2 and err.startswith(f"error: --merge-to {used} exists and is not empty")
    for extra, says in (
        (["--adapter-out", str(used)], f"error: --adapter-out {used} exists and is not empty"),
        (["--full", "--adapter-out", str(tmp_path / "a")], "error: --adapter-out writes LoRA"),
    ):
        status, err, _ = cli(
            [
                *["finetune", "--model", str(model_dir), "--data", str(good)],
                *["--checkpoint-dir", str(tmp_path / "run"), *extra],
            ]
        )
        assert status == 2 and err.startswith(says), err


def test_a_failed_merge_or_plot_after_training_keeps_the_run_and_says_where(
    cli, model_dir, chat_file, tmp_path, monkeypatch
):
    from scanlab import finetune, plots

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(finetune, "save_merged", full_disk)
    monkeypatch.setattr(plots, "loss_curve", full_disk)
    run = tmp_path / "run"
    settings = "--steps 2 --chunk-steps 2 --batch-size 2 --warmup-steps 1 --eval-fraction 0"
    status, err, out = cli(
        [
            "finetune",
            "--model",
            str(model_dir),
            "--data",
            str(chat_file),
            "--checkpoint-dir",
            str(run),
            "--merge-to",
            str(tmp_path / "merged"),
            *settings.split(),
        ]
    )
    assert status == 2
    assert err.splitlines()[-1] + "\n" == (
        "error: --merge-to failed: [Errno 28] No space left on device; the loss curve failed: [Errno 28] "
        f"No space left on device; what was trained is saved in {run}\n"
    )
    assert f"saved: {run} (step 2)" in out
    assert int(finetune.saved_run(run)[0].steps) == 2  # the checkpoint is whole
    status, err, out = cli(
        [
            "chat",
            "--model",
            str(model_dir),
            "--adapter",
            str(run),
            "--message",
            "Say 3.",
            "--max-new-tokens",
            "2",
        ]
    )
    assert status == 0 and "model> " in out, err


def test_a_checkpoint_of_the_other_kind_or_model_is_one_line_before_the_weights_load(
    cli, model_dir, chat_file, tmp_path
):
    from scanlab import train

    tuned, trained = tmp_path / "tuned", tmp_path / "trained"
    settings = "--steps 2 --chunk-steps 2 --batch-size 2 --warmup-steps 1 --eval-fraction 0"
    status, err, _ = cli(
        [
            "finetune",
            "--model",
            str(model_dir),
            "--data",
            str(chat_file),
            "--checkpoint-dir",
            str(tuned),
            *settings.split(),
        ]
    )
    assert status == 0, err
    config = train.TrainConfig(steps=2, chunk_steps=2, warmup_steps=1, batch_size=2, **TINY_TRAIN)
    train.train(config, checkpoint_dir=trained)
    other = save_merged(
        tmp_path / "other",
        Model(CONFIG, init_params(CONFIG, jax.random.PRNGKey(1)), tiny_tokenizer()),
    )  # the same shapes, other weights
    chat = ["chat", "--message", "Say 3.", "--max-new-tokens", "2"]
    cases = [
        (
            ["evaluate", "--checkpoint-dir", str(tuned)],
            f"error: {tuned} holds a `scanlab finetune` run, not the `scanlab train` run this "
            f"needs: use it with scanlab chat --model {model_dir} --adapter {tuned} (a base "
            "model: scanlab decoder generate, the same flags, --prompt)",
        ),
        (
            [*chat, "--model", str(model_dir), "--adapter", str(trained)],
            f"error: {trained} holds a `scanlab train` run, not the `scanlab finetune` run this "
            f"needs: read it with scanlab evaluate --checkpoint-dir {trained}",
        ),
        (
            [*chat, "--model", str(other), "--adapter", str(tuned)],
            f"error: --adapter {tuned} was trained on {model_dir}, not on --model {other}: pass "
            f"--model {model_dir}",
        ),
        (
            [*chat, "--model", str(model_dir), "--adapter", str(tuned), "--adapter-step", "7"],
            f"error: --adapter-step must be a saved step of {tuned}, one of [2], got 7",
        ),
    ]
    for args, message in cases:
        status, err, _ = cli(args)
        assert status == 2 and err.splitlines() == [message], err  # nothing loaded: one line
