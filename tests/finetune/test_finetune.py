"""Fine-tuning on a tiny random decoder with the tiny ChatML tokenizer (`tests/tiny.py`, no file
fetched): adapters through the seam against their merged weights, the rows a file becomes, the step's accumulation and scan
twins, resume, the merged export (read back by scanlab and by transformers), every bad input."""

import dataclasses
import json
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tests.tiny import TINY, tiny_tokenizer

from scanlab.decoder import (
    Model,
    forward,
    generate,
    init_params,
    load_model,
    quantize,
)
from scanlab.decoder.spec import check_params
from scanlab.errors import (
    ArgumentError,
    ArgumentTypeError,
    DivergedError,
    MissingPathError,
    PathExistsError,
)
from scanlab.finetune import (
    DataError,
    FinetuneConfig,
    LoraConfig,
    adapt,
    finetune,
    finetune_chunk,
    finetune_loop,
    init_adapters,
    merged,
    save_merged,
    saved_run,
    with_trained,
)
from scanlab.finetune import data as data_lib
from scanlab.finetune.step import init_state
from scanlab.train.checkpoints import CheckpointReadError

LORA = LoraConfig(rank=4, alpha=8.0)
TOKENS = jnp.array([[1, 5, 9, 200, 300, 7], [4, 4, 8, 16, 23, 42]])


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return Model(TINY, init_params(TINY, jax.random.PRNGKey(0)), tokenizer)


def random_adapters(lora=LORA, seed=1):
    """Adapters with b nonzero, so the update shows."""
    fresh = init_adapters(TINY, lora, jax.random.PRNGKey(seed))
    return {
        target: {
            "a": pair["a"],
            "b": 0.1 * jax.random.normal(jax.random.PRNGKey(i), pair["b"].shape),
        }
        for i, (target, pair) in enumerate(fresh.items())
    }


def chat_line(question, answer, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return json.dumps({"messages": messages})


@pytest.fixture
def chat_file(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(
        "\n".join(chat_line(f"What is {i} + {i}?", f"{2 * i}.") for i in range(8)) + "\n"
    )
    return path


# --- adapters ---------------------------------------------------------------------------------


def test_fresh_adapters_leave_the_model_equal_to_its_base(tiny):
    adapted = adapt(tiny.params, init_adapters(TINY, LORA, jax.random.PRNGKey(1)), LORA)
    np.testing.assert_array_equal(
        forward(adapted, TOKENS, TINY), forward(tiny.params, TOKENS, TINY)
    )


FAMILIES = {
    "llama": TINY,
    "qwen2": dataclasses.replace(TINY, family="qwen2"),
    "gemma3": dataclasses.replace(TINY, family="gemma3", n_layers=6, sliding_window=4),
}


@pytest.mark.parametrize(
    ("family", "base"),
    [("llama", "dense"), ("llama", "quantized"), ("qwen2", "dense"), ("gemma3", "quantized")],
)
def test_an_adapted_model_equals_its_merged_weights(family, base):
    """W x + s B A x against (W + s A B) x, within 1e-5; a quantized base dequantized."""
    config = FAMILIES[family]
    params = init_params(config, jax.random.PRNGKey(0))
    params = params if base == "dense" else quantize(params, config)
    fresh = init_adapters(config, LORA, jax.random.PRNGKey(1))
    adapters = jax.tree.map(
        lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(2), x.shape), fresh
    )
    adapted = adapt(params, adapters, LORA)
    ours = forward(adapted, TOKENS, config)
    assert np.abs(ours - forward(params, TOKENS, config)).max() > 1e-2  # the update shows
    np.testing.assert_allclose(ours, forward(merged(adapted), TOKENS, config), atol=1e-5, rtol=1e-5)


def test_adapters_over_the_kernel_layout_generate_what_they_do_over_int8_blocks(tiny):
    """Inference over the kernel's PackedArrays (`chat --adapter`) equals the QuantArray base."""
    from scanlab.decoder import qmatvec

    if not qmatvec.available():
        pytest.skip(f"no kernel here: {qmatvec.describe()}")
    adapters = random_adapters()
    runs = [
        generate(
            adapt(quantize(tiny.params, TINY, kernel=kernel), adapters, LORA), TOKENS, TINY, 8
        ).tokens
        for kernel in (False, True)
    ]
    np.testing.assert_array_equal(*runs)


def test_only_the_targets_are_adapted(tiny):
    lora = LoraConfig(rank=2, targets=("q_proj", "down_proj"))
    adapted = adapt(tiny.params, init_adapters(TINY, lora, jax.random.PRNGKey(0)), lora)
    assert type(adapted.blocks.attention.q_proj).__name__ == "Adapted"
    assert type(adapted.blocks.down_proj).__name__ == "Adapted"
    assert adapted.blocks.attention.k_proj is tiny.params.blocks.attention.k_proj
    assert adapted.blocks.up_proj is tiny.params.blocks.up_proj


def test_dropout_draws_from_its_key_and_is_off_without_one(tiny):
    lora = dataclasses.replace(LORA, dropout=0.5)
    adapters = random_adapters(lora)
    without = forward(adapt(tiny.params, adapters, lora), TOKENS, TINY)
    np.testing.assert_array_equal(
        without, forward(adapt(tiny.params, adapters, LORA), TOKENS, TINY)
    )
    dropped = [
        forward(adapt(tiny.params, adapters, lora, jax.random.PRNGKey(k)), TOKENS, TINY)
        for k in (0, 0, 1)
    ]
    np.testing.assert_array_equal(dropped[0], dropped[1])
    assert (
        np.abs(dropped[0] - dropped[2]).max() > 1e-3 and np.abs(dropped[0] - without).max() > 1e-3
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rank": 0}, "lora_rank must be >= 1, got 0"),
        ({"alpha": 0.0}, "lora_alpha must be > 0"),
        ({"dropout": 1.0}, "lora_dropout must be < 1, got 1.0"),
        ({"targets": ("q_proj", "attn")}, "lora_targets must be distinct names from ['q_proj'"),
        ({"targets": ("q_proj", "q_proj")}, "lora_targets must be distinct names"),
        ({"targets": ()}, "lora_targets must be distinct names"),
    ],
)
def test_bad_lora_settings_are_refused(changes, message):
    with pytest.raises(ArgumentError) as error:
        LoraConfig(**changes)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: LoraConfig(targets="q_proj"),
            "lora_targets must be a sequence of names from ['q_proj', 'k_proj'",
        ),
        (
            lambda: FinetuneConfig(lora={"rank": 4}),
            "lora must be a LoraConfig, got dict: e.g. LoraConfig(rank=4)",
        ),
        (
            lambda: finetune("model.gguf", "data.jsonl", {"steps": 2}),
            "config must be a FinetuneConfig, got dict: e.g. FinetuneConfig(steps=2)",
        ),
    ],
)
def test_a_setting_of_the_wrong_type_is_named(build, message):
    with pytest.raises(ArgumentTypeError) as error:
        build()
    assert str(error.value).startswith(message), error.value


def test_adapters_of_the_wrong_shape_are_refused_naming_the_leaf(tiny):
    adapters = random_adapters()
    adapters["v_proj"]["b"] = adapters["v_proj"]["b"][:, :2]
    with pytest.raises(
        ArgumentError,
        match=r"params\.blocks\.attention\.v_proj\.b has shape \(2, 2, 1, 32\), expected \(2, 4, 1, 32\)",
    ):
        check_params(adapt(tiny.params, adapters, LORA), TINY)


# --- data -------------------------------------------------------------------------------------


def test_text_rows_train_every_token_and_end_with_end_of_text(tmp_path, tokenizer):
    path = tmp_path / "text.jsonl"
    path.write_text(
        json.dumps({"text": "Scan the layers."})
        + "\n\n"
        + json.dumps({"text": "Twice over."})
        + "\n"
    )
    kind, examples = data_lib.encode_file(path, tokenizer)
    rows = data_lib.to_rows(examples, tokenizer.pad_id, 65, None, path)
    ids = [*tokenizer.encode("Scan the layers."), tokenizer.eos_ids[0]]
    assert kind == "text" and [e.line for e in examples] == [1, 3]
    assert rows.seq_len == data_lib.LENGTH_MULTIPLE
    np.testing.assert_array_equal(rows.tokens[0, : len(ids)], ids)
    expected_targets = (np.arange(16) < len(ids)) & (np.arange(16) > 0)
    np.testing.assert_array_equal(rows.targets[0], expected_targets)
    np.testing.assert_array_equal(rows.mask[0], np.arange(16) < len(ids))


def test_chat_rows_train_every_answer_and_nothing_else(tmp_path, tokenizer):
    path = tmp_path / "chat.jsonl"
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "One?"},
        {"role": "assistant", "content": "Uno."},
        {"role": "user", "content": "Two?"},
        {"role": "assistant", "content": "Dos."},
    ]
    path.write_text(json.dumps({"messages": messages}) + "\n")
    rows = data_lib.to_rows(
        data_lib.encode_file(path, tokenizer)[1], tokenizer.pad_id, 65, None, path
    )
    whole = tokenizer.encode(
        tokenizer.chat(messages, add_generation_prompt=False), add_special_tokens=False
    )
    np.testing.assert_array_equal(rows.tokens[0, : len(whole)], whole)
    trained = tokenizer.backend.decode(
        rows.tokens[0][rows.targets[0]].tolist(), skip_special_tokens=False
    )
    assert trained == "Uno.<|im_end|>\nDos.<|im_end|>\n"


def test_a_split_holds_out_rows_by_the_seed(tokenizer, chat_file):
    rows = data_lib.to_rows(
        data_lib.encode_file(chat_file, tokenizer)[1], tokenizer.pad_id, 65, None, chat_file
    )
    train, held = data_lib.split(rows, 0.25, seed=0)
    assert (len(train), len(held)) == (6, 2)
    again = data_lib.split(rows, 0.25, seed=0)
    np.testing.assert_array_equal(again[1].tokens, held.tokens)
    assert data_lib.split(rows, 0.0, seed=0)[1] is None
    # A large set holds out at most MAX_HELD_OUT rows (measured after every chunk), the rest train.
    many = rows.take(np.arange(10_000) % len(rows))
    train, held = data_lib.split(many, 0.1, seed=0)
    assert (len(train), len(held)) == (10_000 - data_lib.MAX_HELD_OUT, data_lib.MAX_HELD_OUT)


BAD_FILES = [
    ("{not json\n", "bad.jsonl:1: not JSON"),
    (
        '["a list"]\n',
        'bad.jsonl:1: an example must be {"messages": [...]} or {"text": "..."}, got list',
    ),
    (
        '{"prompt": "x", "completion": "y"}\n',
        'bad.jsonl:1: an example must be {"messages": [...]} or {"text": "..."}, got [\'completion\', \'prompt\']',
    ),
    ("\n\n", "bad.jsonl: no examples"),
    ('{"text": ""}\n', "bad.jsonl:1: text must be a non-empty string"),
    ('{"messages": []}\n', "bad.jsonl:1: messages must be a non-empty list"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}\n', "bad.jsonl:1: messages[0] must be"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "bad.jsonl:1: no assistant message"),
    (
        '{"text": "a"}\n' + chat_line("q", "a") + "\n",
        "bad.jsonl:2: a chat example in a file of text examples (line 1)",
    ),
]


@pytest.mark.parametrize(("content", "message"), BAD_FILES)
def test_a_bad_file_is_one_error_naming_its_file_and_line(tmp_path, tokenizer, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as error:
        data_lib.encode_file(path, tokenizer)
    assert message in str(error.value)


def test_data_errors_are_raised_before_the_model_loads(tmp_path, tokenizer, tiny):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=re.escape("bad.jsonl: not UTF-8 text")):
        data_lib.encode_file(path, tokenizer)
    long = tmp_path / "long.jsonl"
    text = "Scan the layers. " * 20
    long.write_text(json.dumps({"text": text}) + "\n")
    count = len(tokenizer.encode(text)) + 1  # and the end-of-text token
    assert count > 65
    with pytest.raises(
        DataError, match=rf"long.jsonl:1: {count} tokens, longer than the model's context \(65\)"
    ):
        finetune(tiny, long, FinetuneConfig(steps=2, warmup_steps=0, batch_size=1, eval_fraction=0))
    with pytest.raises(DataError, match=rf"long.jsonl:1: {count} tokens, longer than seq_len=32"):
        finetune(
            tiny,
            long,
            FinetuneConfig(steps=2, warmup_steps=0, batch_size=1, eval_fraction=0, seq_len=32),
        )
    with pytest.raises(
        MissingPathError, match=re.escape("data_file must be a JSONL file, got 'nowhere.jsonl'")
    ):
        finetune(tiny, "nowhere.jsonl")


def test_chat_data_for_a_model_without_a_chat_template_is_refused(chat_file, tokenizer):
    base_tokenizer = dataclasses.replace(tokenizer, chat_template=None)
    with pytest.raises(
        DataError, match=re.escape("chat.jsonl: chat examples, but this model has no chat template")
    ):
        data_lib.encode_file(chat_file, base_tokenizer)


# --- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"batch_size": 6, "accumulate": 4}, "accumulate must divide batch_size=6, got 4"),
        ({"lora": None}, "full fine-tuning trains float32 weights: pass weights='float32'"),
        ({"warmup_steps": 100}, "warmup_steps must be < steps=100, got 100"),
        ({"remat": "some"}, "remat must be one of ['none', 'full', 'dots', 'sqrt'], got 'some'"),
        ({"eval_fraction": 1.0}, "eval_fraction must be < 1, got 1.0"),
        ({"weights": "bfloat16"}, "weights must be 'quantized' or 'float32', got 'bfloat16'"),
        ({"seq_len": 1}, "seq_len must be >= 2"),
    ],
)
def test_bad_settings_are_refused(changes, message):
    with pytest.raises(ArgumentError) as error:
        FinetuneConfig(**changes)
    assert message in str(error.value)


def test_a_config_round_trips_through_its_dict():
    config = FinetuneConfig(lora=LoraConfig(rank=2, targets=("v_proj",)), steps=7, warmup_steps=1)
    assert FinetuneConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


# --- the step ---------------------------------------------------------------------------------


def rows_of(path, tokenizer):
    rows = data_lib.to_rows(
        data_lib.encode_file(path, tokenizer)[1], tokenizer.pad_id, 65, None, path
    )
    return jax.tree.map(jnp.asarray, rows)


def test_accumulated_micro_batches_take_the_step_the_whole_batch_takes(tiny, chat_file):
    data = rows_of(chat_file, tiny.tokenizer)
    states = []
    for accumulate in (1, 4):
        config = FinetuneConfig(
            lora=LORA,
            steps=3,
            warmup_steps=0,
            batch_size=4,
            accumulate=accumulate,
            learning_rate=1e-2,
        )
        state = init_state(config, TINY, tiny.params)
        states.append(
            finetune_chunk(state, tiny.params, data, config=config, model_config=TINY, steps=3)
        )
    (one, losses_one), (four, losses_four) = states
    np.testing.assert_allclose(losses_one, losses_four, rtol=1e-5)
    chex.assert_trees_all_close(one.trainable, four.trainable, atol=1e-6)


def test_the_scanned_chunk_equals_its_python_loop_twin(tiny, chat_file):
    data = rows_of(chat_file, tiny.tokenizer)
    config = FinetuneConfig(
        lora=dataclasses.replace(LORA, dropout=0.1),
        steps=4,
        warmup_steps=1,
        batch_size=2,
        learning_rate=1e-2,
    )
    runs = [
        run(
            init_state(config, TINY, tiny.params),
            tiny.params,
            data,
            config=config,
            model_config=TINY,
            steps=4,
        )
        for run in (finetune_chunk, finetune_loop)
    ]
    np.testing.assert_allclose(runs[0][1], runs[1][1], rtol=1e-5)
    chex.assert_trees_all_close(runs[0][0].trainable, runs[1][0].trainable, atol=1e-6)


def test_the_base_stays_frozen_and_the_loss_falls(tiny, chat_file):
    config = FinetuneConfig(
        lora=LORA,
        steps=12,
        chunk_steps=6,
        warmup_steps=1,
        batch_size=4,
        learning_rate=1e-2,
        eval_fraction=0.25,
    )
    reports = []
    result = finetune(tiny, chat_file, config, on_chunk=reports.append)
    # The longest rendered chat, rounded up to a multiple of 16.
    assert result.losses[-1] < result.losses[0] and result.config.seq_len == 32
    assert result.model.params is tiny.params
    assert [r.step for r in reports] == [6, 12] and all(
        r.eval_loss > 0 and r.tokens_per_s > 0 for r in reports
    )
    assert result.eval_loss == pytest.approx(reports[-1].eval_loss)
    assert set(result.state.trainable) == set(LORA.targets)


def test_full_fine_tuning_trains_every_weight(tiny, chat_file):
    config = FinetuneConfig(
        lora=None,
        weights="float32",
        steps=4,
        chunk_steps=4,
        warmup_steps=1,
        batch_size=4,
        learning_rate=1e-3,
        eval_fraction=0,
    )
    result = finetune(tiny, chat_file, config)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), result.state.trainable, tiny.params)
    assert all(jax.tree.leaves(changed))
    assert result.tuned.params is result.state.trainable


def test_a_base_the_backward_pass_cannot_run_through_is_refused(tiny, chat_file):
    from scanlab.decoder import qmatvec

    if not qmatvec.available():
        pytest.skip(f"no kernel here: {qmatvec.describe()}")
    kernel_model = tiny._replace(params=quantize(tiny.params, TINY, kernel=True))
    with pytest.raises(
        ArgumentTypeError,
        match="inference kernel's layout, which has no gradients: load the model with kernel=False",
    ):
        finetune(kernel_model, chat_file, FinetuneConfig(steps=2, warmup_steps=0, batch_size=2))
    quantized = tiny._replace(params=quantize(tiny.params, TINY))
    with pytest.raises(
        ArgumentTypeError,
        match=re.escape("full fine-tuning trains every weight, got params.embed quantized"),
    ):
        finetune(
            quantized,
            chat_file,
            FinetuneConfig(lora=None, weights="float32", steps=2, warmup_steps=0, batch_size=2),
        )


def test_a_batch_larger_than_the_training_rows_is_refused(tiny, chat_file):
    with pytest.raises(ArgumentError, match="batch_size must be <= 7, got 8"):
        finetune(
            tiny,
            chat_file,
            FinetuneConfig(steps=2, warmup_steps=0, batch_size=8, eval_fraction=0.1),
        )


# --- checkpoints and resume -------------------------------------------------------------------

RUN = FinetuneConfig(
    lora=LORA,
    steps=8,
    chunk_steps=2,
    warmup_steps=1,
    batch_size=2,
    learning_rate=1e-2,
    eval_fraction=0,
)


def test_a_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one(tiny, chat_file, tmp_path):
    whole = finetune(tiny, chat_file, RUN, checkpoint_dir=tmp_path / "whole", checkpoint_every=1)
    # Continue from the middle (the steps after it set aside), as after a crash at step 4.
    resumed = finetune(
        tiny, chat_file, RUN, checkpoint_dir=tmp_path / "whole", resume=True, resume_step=4
    )
    chex.assert_trees_all_equal(resumed.state, whole.state)
    np.testing.assert_array_equal(resumed.losses, whole.losses)
    # The checkpoint holds the adapters and their optimizer state only: no frozen weights.
    saved = sum(f.stat().st_size for f in (tmp_path / "whole" / "8").rglob("*") if f.is_file())
    assert saved < 4 * 1024 * 1024


def test_resuming_on_other_data_or_settings_is_refused(tiny, chat_file, tmp_path):
    finetune(tiny, chat_file, RUN.replace(steps=2), checkpoint_dir=tmp_path / "run")
    other = tmp_path / "other.jsonl"
    other.write_text(chat_line("Who?", "Me.") * 1 + "\n" + chat_line("Why?", "So.") + "\n")
    with pytest.raises(ArgumentError, match="was written by a different config: data_sha256="):
        finetune(tiny, other, RUN, checkpoint_dir=tmp_path / "run", resume=True)
    with pytest.raises(ArgumentError, match="different config: lora="):
        finetune(
            tiny,
            chat_file,
            RUN.replace(lora=LoraConfig(rank=2)),
            checkpoint_dir=tmp_path / "run",
            resume=True,
        )
    with pytest.raises(ArgumentError, match="already holds a run"):
        finetune(tiny, chat_file, RUN, checkpoint_dir=tmp_path / "run")


def test_runs_that_cannot_fit_are_refused_before_the_weights_load(
    tiny, chat_file, tmp_path, monkeypatch
):
    from scanlab import checks
    from scanlab.errors import OutOfMemoryError

    with pytest.raises(ArgumentError, match="seq_len must be <= 65, got 66"):
        finetune(tiny, chat_file, RUN.replace(seq_len=66))
    with pytest.raises(
        ArgumentError, match=r"lora_rank must be <= 32 for this model \(k_proj is 32 wide"
    ):
        finetune(tiny, chat_file, RUN.replace(lora=LoraConfig(rank=40)))
    monkeypatch.setattr(checks, "available_bytes", lambda: 2**10)
    with pytest.raises(OutOfMemoryError, match=r"fine-tuning [\d,]+ weights over micro-batches"):
        finetune(tiny, chat_file, RUN, checkpoint_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("[0-9]*"))


def test_a_model_given_by_path_resumes_from_anywhere_and_by_its_digest(
    tiny, chat_file, tmp_path, monkeypatch
):
    """The checkpoint records the model's absolute path and digest, not the path as typed: a
    relative path resumes from another folder, a moved file by its digest; another file of
    the same shapes is refused."""
    save_merged(tmp_path / "base", tiny)
    run, config = tmp_path / "run", RUN.replace(steps=2, weights="float32")
    monkeypatch.chdir(tmp_path)
    finetune("base", chat_file, config, checkpoint_dir=run)
    assert saved_run(run)[1] == str((tmp_path / "base").resolve())
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    (tmp_path / "base").rename(tmp_path / "moved")
    resumed = finetune("../moved", chat_file, config, checkpoint_dir=run, resume=True)  # finished
    assert int(resumed.state.step) == 2
    other = tiny._replace(params=init_params(TINY, jax.random.PRNGKey(1)))
    save_merged(tmp_path / "other", other)
    with pytest.raises(ArgumentError, match="different config: model_sha256="):
        finetune(tmp_path / "other", chat_file, config, checkpoint_dir=run, resume=True)


def test_ctrl_c_saves_the_newest_whole_state_and_a_nan_loss_stops(tiny, chat_file, tmp_path):
    def interrupt_after_the_first_chunk(report):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(
            tiny,
            chat_file,
            RUN,
            checkpoint_dir=tmp_path / "run",
            on_chunk=interrupt_after_the_first_chunk,
        )
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.isdigit()) == ["2"]
    diverging = RUN.replace(learning_rate=1e30, clip_norm=1e30)
    with pytest.raises(DivergedError, match=r"the loss became (nan|inf|-inf) at step"):
        finetune(tiny, chat_file, diverging, checkpoint_dir=tmp_path / "nan")
    assert not any(p.name.isdigit() for p in (tmp_path / "nan").iterdir())


def test_with_trained_puts_a_checkpoint_s_adapters_over_the_base(tiny, chat_file, tmp_path):
    result = finetune(tiny, chat_file, RUN.replace(steps=2), checkpoint_dir=tmp_path / "run")
    restored = with_trained(tiny, tmp_path / "run")
    np.testing.assert_array_equal(
        forward(restored.params, TOKENS, TINY), forward(result.tuned.params, TOKENS, TINY)
    )
    with pytest.raises(
        CheckpointReadError, match=r"step must be a saved step of .*run, one of \[2\], got 5"
    ):
        with_trained(tiny, tmp_path / "run", step=5)


# --- export -----------------------------------------------------------------------------------


def test_the_merged_export_loads_in_scanlab_and_transformers(tiny, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapted = tiny._replace(params=adapt(quantize(tiny.params, TINY), random_adapters(), LORA))
    path = save_merged(tmp_path / "merged", adapted)
    ours = forward(adapted.params, TOKENS, TINY)
    loaded = load_model(path)
    np.testing.assert_allclose(forward(loaded.params, TOKENS, TINY), ours, atol=1e-5, rtol=1e-5)
    assert loaded.tokenizer.chat_template == tiny.tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(np.asarray(TOKENS))).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
    text = "Scan the layers, then the tokens."
    assert AutoTokenizer.from_pretrained(path).encode(text) == tiny.tokenizer.encode(text)
    with pytest.raises(PathExistsError, match="exists and is not empty"):
        save_merged(path, adapted)


def test_the_merged_model_is_written_whole_with_the_umask_s_permissions(tiny, tmp_path):
    import os
    import stat

    previous = os.umask(0o027)
    try:
        path = save_merged(tmp_path / "merged", tiny)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o750
    assert {stat.S_IMODE(f.stat().st_mode) for f in path.iterdir()} == {0o640}
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no staging left
    (tmp_path / "file").write_text("")
    with pytest.raises(PathExistsError, match=r"path .*file is a file; a transformers checkpoint"):
        save_merged(tmp_path / "file", tiny)


def test_adapted_params_shard_on_a_mesh_and_the_kernel_layout_is_refused_by_name(tiny):
    """shard_params places each weight form as its class says: an adapted weight's base as
    its dense twin, its update replicated (a one-device mesh here; tests/test_multi_device.py
    runs 8)."""
    from scanlab import sharding
    from scanlab.decoder import shard_params

    mesh = sharding.make_mesh("data=1,model=1")
    adapted = adapt(quantize(tiny.params, TINY), random_adapters(), LORA)
    placed = shard_params(adapted, TINY, mesh)
    assert placed.blocks.attention.q_proj.a.sharding.mesh.shape == {"data": 1, "model": 1}
    np.testing.assert_allclose(
        forward(placed, TOKENS, TINY), forward(adapted, TOKENS, TINY), atol=1e-6, rtol=1e-6
    )
    with pytest.raises(ArgumentTypeError, match="got the kernel's PackedArray"):
        shard_params(quantize(tiny.params, TINY, kernel=True), TINY, mesh)
