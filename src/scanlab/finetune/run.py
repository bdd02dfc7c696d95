"""Fine-tuning a pretrained model on a user's file: chunks of scanned steps, checkpointed with
orbax (the adapters or weights and the optimizer state, never the frozen base), resumable
bit-exact, by the loop and resume rules of `scanlab.train.loop`."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from scanlab import checks, storage
from scanlab.decoder import spec, weights
from scanlab.decoder.config import DecoderConfig
from scanlab.decoder.formats import pretrained
from scanlab.decoder.formats.tokenizer import load_tokenizer
from scanlab.decoder.load import Model, load_config, load_weights, resolve
from scanlab.decoder.params import DecoderParams
from scanlab.errors import ArgumentError, ArgumentTypeError
from scanlab.finetune import adapters, data
from scanlab.finetune.config import FinetuneConfig
from scanlab.finetune.step import (
    FinetuneState,
    evaluation_loss,
    finetune_chunk,
    init_state,
    model_params,
)
from scanlab.train import checkpoints, loop
from scanlab.train.loop import ChunkReport


class FinetuneResult(NamedTuple):
    config: FinetuneConfig  # its seq_len the rows' length
    model: Model  # the base as trained on: its frozen weights, its tokenizer
    state: FinetuneState
    losses: np.ndarray  # (steps,) per-step training loss, from step 1, across resumes
    eval_loss: float | None  # on the held-out rows at the end; None without any

    @property
    def tuned(self) -> Model:
        """The model with what was trained: the base with the adapters, or the new weights."""
        params = model_params(self.state.trainable, self.model.params, self.config)
        return self.model._replace(params=params)


def finetune(
    model: str | os.PathLike | Model,
    data_file: str | os.PathLike,
    config: FinetuneConfig | None = None,
    *,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 5,
    resume: bool = False,
    resume_step: int | None = None,
    on_chunk: Callable[[ChunkReport], None] | None = None,
    on_loading: Callable[[str], None] | None = None,
) -> FinetuneResult:
    """Fine-tunes `model` on the examples of `data_file` (JSONL, `scanlab.finetune.data`).

    Args:
      model: a known model's name, a .gguf file or a transformers directory, loaded in the
        config's `weights` form; or a loaded Model (dense or QuantArray weights).
      data_file: chat or text examples; checked and tokenized before any weights load.
      config: the run; None: `FinetuneConfig()`, LoRA's defaults.
      checkpoint_dir, checkpoint_every, resume, resume_step: as in `scanlab.train.train`; the
        checkpoints hold the adapters (or weights), optimizer state, key and loss history, and
        a resumed run must have the same model, data file (by its SHA-256) and config (steps
        may grow).
      on_chunk: called after each chunk with its ChunkReport (tokens/s and the held-out loss
        filled in).
      on_loading: told what is being loaded (the weights), e.g. to show a line.
    """
    config = FinetuneConfig() if config is None else config
    checks.instance("config", config, FinetuneConfig, "e.g. FinetuneConfig(steps=2)")
    kind, records = data.read_jsonl(data_file)  # a bad file is said before any model is read
    with loop.open_run(checkpoint_dir, resume, resume_step, checkpoint_every) as manager:
        tokenizer, model_config, path = _prepare(model, config)
        examples = data.encode(kind, records, tokenizer, data_file)
        train_rows, eval_rows = _rows(examples, data_file, tokenizer, model_config, config)
        config = config.replace(seq_len=train_rows.seq_len)
        _check_fits(model_config, config)
        identity = _identity(model, path, data_file, config)
        step = loop.resumed_step(manager, resume, resume_step, identity)  # before the weights
        if on_loading is not None:
            on_loading(str(path) if path is not None else "the given model")
        # The weights in the config's form, never in the inference kernel's layout (which has no
        # gradients): int8 blocks for a frozen LoRA base (the GGUF's own), else float32.
        params = (
            model.params
            if isinstance(model, Model)
            else load_weights(path, config.weights, kernel=False)[1]
        )
        _check_trainable(params, config)
        base = Model(model_config, params, tokenizer)
        frozen = None if config.lora is None else params
        history: list[float] = []
        if step is None:
            state = init_state(config, model_config, params)
        else:
            target = jax.eval_shape(lambda: init_state(config, model_config, params))
            state, history = loop.restore_run(manager, step, target)
        train_data = jax.tree.map(jnp.asarray, train_rows)
        eval_data = None if eval_rows is None else jax.tree.map(jnp.asarray, eval_rows)

        measured: dict[int, float] = {}  # step -> held-out loss: the last chunk's is the result

        def held_out(state: FinetuneState) -> float | None:
            if eval_data is None:
                return None
            step = int(state.step)
            if step not in measured:
                measured[step] = float(
                    evaluation_loss(
                        state.trainable, frozen, eval_data, config=config, model_config=model_config
                    )
                )
            return measured[step]

        tokens_per_step = config.batch_size * (train_rows.seq_len - 1)
        state, history = loop.run_chunks(
            state,
            history,
            total_steps=config.steps,
            chunk_steps=config.chunk_steps,
            run_chunk=lambda s, n: finetune_chunk(
                s,
                frozen,
                train_data,
                config=config,
                model_config=model_config,
                steps=n,
                length=config.chunk_steps,
            ),
            manager=manager,
            config=identity,
            checkpoint_every=checkpoint_every,
            on_chunk=on_chunk,
            describe=lambda s, n, seconds: {
                "tokens_per_s": tokens_per_step * n / seconds,
                "eval_loss": held_out(s),
            },
        )
    return FinetuneResult(config, base, state, np.asarray(history, np.float32), held_out(state))


def saved_run(
    checkpoint_dir: str | Path,
    step: int | None = None,
    names: tuple[str, str] = ("checkpoint_dir", "resume_step"),
) -> tuple[FinetuneConfig, str]:
    """(config, model source) of a fine-tuning checkpoint's newest step (or `step`), verified:
    what `--resume` continues with, or what `with_trained` will read. `names`: the caller's
    names for the directory and the step, for the messages."""
    checkpoints.check_exists(checkpoint_dir, names[0])
    with checkpoints.open_manager(checkpoint_dir) as manager:
        step = checkpoints.verified_step(manager, step, names[1], names[0])
        recorded = loop.saved_config(manager, step, "finetune")
    return _config_of(recorded), recorded["model"]


def _config_of(recorded: dict) -> FinetuneConfig:
    return FinetuneConfig.from_dict(
        {k: v for k, v in recorded.items() if k not in ("model", "model_sha256", "data_sha256")}
    )


def _prepare(model, config: FinetuneConfig):
    """(tokenizer, model config, the model's path or None), read without the weights."""
    if isinstance(model, Model):
        spec.check_params(model.params, model.config)
        return model.tokenizer, model.config, None
    path = resolve(model, config.weights)
    return load_tokenizer(path), load_config(path), path


def _rows(examples, data_file, tokenizer, model_config: DecoderConfig, config: FinetuneConfig):
    """(training rows, held-out rows or None) of the tokenized examples."""
    # S tokens feed S-1 positions, each predicting the next one.
    if config.seq_len is not None:
        checks.static_int(
            "seq_len", config.seq_len, minimum=2, maximum=model_config.max_seq_len + 1
        )
    rows = data.to_rows(
        examples, tokenizer.pad_id, model_config.max_seq_len + 1, config.seq_len, data_file
    )
    train_rows, eval_rows = data.split(rows, config.eval_fraction, config.seed)
    checks.static_int("batch_size", config.batch_size, minimum=1, maximum=len(train_rows))
    return train_rows, eval_rows


def _check_fits(model_config: DecoderConfig, config: FinetuneConfig) -> None:
    """Refuses, before the weights load, a run that cannot fit: a LoRA rank past the
    projections' widths, or more than the device holds for the least a step keeps — the frozen
    weights, the trained ones with their gradient and AdamW moments, and a micro-batch's
    logits with their gradient."""
    count = spec.param_count(model_config)
    if config.lora is None:
        frozen, trained = 0, count
    else:
        adapters.check_rank(model_config, config.lora)
        frozen = count * (1 if config.weights == "quantized" else 4)  # int8 blocks: ~1 B each
        trained = adapters.adapter_count(model_config, config.lora)
    logits = config.micro_batch * (config.seq_len or 0) * model_config.vocab_size
    checks.fits_in_memory(
        f"fine-tuning {trained:,} weights over micro-batches of {config.micro_batch} x "
        f"{config.seq_len} tokens",
        frozen + 4 * (4 * trained + 2 * logits),
    )


def _identity(model, path: Path | None, data_file, config: FinetuneConfig) -> dict:
    """What a checkpoint records of the run, and a resumed run must match: the config, the
    data file's digest and the model, wherever the run is started from: a known model's name
    (however it was given), else its absolute path, with the digest it is compared by (a moved
    file still resumes)."""
    if path is None:
        name, digest = f"{model.config.family} model given in memory", None
    elif (known := pretrained.known_as(path)) is not None:
        name, digest = known.name, known.sha256  # checked when it was fetched
    else:
        name, digest = str(Path(path).resolve()), storage.digest(Path(path))
    return {
        **config.to_dict(),
        "model": name,
        "model_sha256": digest,
        "data_sha256": data.digest(data_file),
    }


def _check_trainable(params: DecoderParams, config: FinetuneConfig) -> None:
    """A base the backward pass can run through: no kernel layout; dense for full training."""
    for where, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=weights.is_form)[0]:
        name = f"params{jax.tree_util.keystr(where)}"
        if weights.is_form(leaf) and not leaf.differentiable:
            raise ArgumentTypeError(
                f"{name} is a {type(leaf).__name__}, the inference kernel's layout, which has no "
                "gradients: load the model with kernel=False"
            )
        if config.lora is None and weights.is_form(leaf):
            raise ArgumentTypeError(
                f"full fine-tuning trains every weight, got {name} quantized: load with "
                "weights='float32'"
            )


def with_trained(model: Model, checkpoint_dir: str | Path, step: int | None = None) -> Model:
    """`model` with what a fine-tuning checkpoint trained: its adapters over the model's weights
    (as loaded: quantized, in the kernel's layout, dense), or the weights a full fine-tune
    trained. The newest step (or `step`), verified."""
    checkpoints.check_exists(checkpoint_dir)
    with checkpoints.open_manager(checkpoint_dir) as manager:
        step = checkpoints.verified_step(manager, step, "step")
        recorded = loop.saved_config(manager, step, "finetune")
        config = _config_of(recorded)
        # A full fine-tune's state holds dense float32 weights of the declared shapes, whatever
        # form the model was loaded in: their shapes, drawn by nothing.
        weights = (
            model.params
            if config.lora is not None
            else jax.eval_shape(lambda: spec.init_params(model.config, jax.random.PRNGKey(0)))
        )
        target = jax.eval_shape(lambda w: init_state(config, model.config, w), weights)
        try:
            state, _ = loop.restore_run(manager, step, target)
        except ValueError as error:
            raise ArgumentError(
                f"{checkpoints.step_path(manager, step)} was trained on {recorded['model']}, "
                f"whose shapes differ from this model's ({error})"
            ) from None
    return model._replace(params=model_params(state.trainable, model.params, config))
