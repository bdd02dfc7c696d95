"""A fine-tuned model written out for other tools: its adapters merged into dense weights."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from scanlab.decoder.formats.hf import save_checkpoint
from scanlab.decoder.formats.tokenizer import save_tokenizer
from scanlab.decoder.load import Model
from scanlab.errors import PathExistsError
from scanlab.finetune.adapters import merged


def save_merged(path: str | os.PathLike, model: Model, overwrite: bool = False) -> Path:
    """Writes `model` (e.g. `FinetuneResult.tuned`) as a transformers directory: its adapters
    merged, every weight float32, with its tokenizer and chat template. It loads with
    `AutoModelForCausalLM.from_pretrained`, `scanlab.decoder.load_model` and
    `scanlab chat --model`. Written under a temporary name and renamed when complete, so a
    failed save leaves nothing half-written."""
    directory = Path(path)
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise PathExistsError(f"path {directory} exists and is not empty; pass overwrite=True")
    directory.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{directory.name}.", dir=directory.parent) as work:
        written = save_checkpoint(Path(work) / "model", model.config, merged(model.params))
        save_tokenizer(model.tokenizer, written)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(written, directory)
    return directory
