"""A fine-tuned model written out for other tools: its adapters merged into dense weights."""

from __future__ import annotations

import os
from pathlib import Path

from scanlab.decoder.formats.hf import save_checkpoint
from scanlab.decoder.load import Model
from scanlab.finetune.adapters import merged


def save_merged(path: str | os.PathLike, model: Model, overwrite: bool = False) -> Path:
    """Writes `model` (e.g. `FinetuneResult.tuned`) as a transformers directory: its adapters
    merged, every weight float32, with its tokenizer and chat template. It loads with
    `AutoModelForCausalLM.from_pretrained`, `scanlab.decoder.load_model` and
    `scanlab chat --model`; nothing is half-written if the save fails."""
    return save_checkpoint(path, model.config, merged(model.params), overwrite, model.tokenizer)
