"""A fine-tuned model written out for other tools: its adapters merged into dense weights, as a
transformers directory or a GGUF file."""

from __future__ import annotations

import os
from pathlib import Path

from scanlab import storage
from scanlab.checks import shown
from scanlab.decoder.formats.gguf_file import save_gguf
from scanlab.decoder.formats.hf import check_new_directory, save_checkpoint
from scanlab.decoder.formats.tokenizer import save_tokenizer
from scanlab.decoder.load import Model
from scanlab.errors import ArgumentError
from scanlab.finetune.adapters import merged


def save_merged(
    path: str | os.PathLike,
    model: Model,
    *,
    like: str | os.PathLike | None = None,
    tensor_type: str = "Q8_0",
    overwrite: bool = False,
) -> Path:
    """Writes `model` (e.g. `FinetuneResult.tuned`) with its adapters merged into its weights.

    A path ending in .gguf gets a GGUF file (`save_gguf`): weight matrices as `tensor_type`,
    the metadata (settings, tokenizer, chat template) of `like`, the GGUF file the model was
    loaded from. Any other path gets a transformers directory: float32 weights, the tokenizer
    and its chat template. Either loads with `scanlab.decoder.load_model`, `scanlab chat
    --model` and transformers' `AutoModelForCausalLM.from_pretrained`; nothing is left
    half-written if the save fails.
    """
    path = Path(path)
    if path.suffix == ".gguf":
        if like is None:
            raise ArgumentError(
                f"{shown('like')} must name the GGUF file the model was loaded from (its "
                f"metadata and tokenizer) to write {path}, got None"
            )
        return save_gguf(path, model.config, merged(model.params), like, tensor_type, overwrite)
    check_new_directory(path, overwrite)
    with storage.staged_directory(path) as staging:
        save_checkpoint(staging, model.config, merged(model.params), overwrite=True)
        save_tokenizer(model.tokenizer, staging)
    return path
