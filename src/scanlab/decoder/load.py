"""A model by name or path: a known model's name (fetched on first use), a .gguf file or a
transformers directory -> its config, stacked parameters and tokenizer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from scanlab.decoder.config import DecoderConfig, check_dtype
from scanlab.decoder.formats import pretrained
from scanlab.decoder.formats.gguf_file import config_from_gguf, load_gguf, open_gguf
from scanlab.decoder.formats.hf import load_checkpoint, read_config
from scanlab.decoder.formats.tokenizer import Tokenizer, load_tokenizer
from scanlab.decoder.params import DecoderParams
from scanlab.errors import MissingPathError


class Model(NamedTuple):
    config: DecoderConfig
    params: DecoderParams
    tokenizer: Tokenizer


def load_model(source: str | os.PathLike, dtype: str = "float32") -> Model:
    """A model and its tokenizer from a known model's name, a .gguf file or a transformers
    directory; parameters in `dtype` ("float32" or "bfloat16")."""
    path = resolve(source, dtype)
    tokenizer = load_tokenizer(path)  # first: a checkpoint without one fails before the weights
    return Model(*_load_weights(path, dtype), tokenizer)


def load_weights(
    source: str | os.PathLike, dtype: str = "float32"
) -> tuple[DecoderConfig, DecoderParams]:
    """(config, params) of a known model's name, a .gguf file or a transformers directory."""
    return _load_weights(resolve(source, dtype), dtype)


def _load_weights(path: Path, dtype: str) -> tuple[DecoderConfig, DecoderParams]:
    if path.is_dir():
        return load_checkpoint(path, dtype=dtype)
    return load_gguf(path, dtype=dtype)


def load_config(path: Path) -> DecoderConfig:
    """A resolved model's config (`resolve`), read without its weights."""
    if path.is_dir():
        return read_config(path)
    return config_from_gguf(open_gguf(path), path)


def resolve(source: str | os.PathLike, dtype: str) -> Path:
    """The path of the model (a known name is fetched, once, first); the dtype checked before."""
    check_dtype(dtype)
    if str(source) in pretrained.MODELS:
        return pretrained.fetch(pretrained.MODELS[str(source)])
    path = Path(source)
    if not path.exists():
        raise MissingPathError(
            f"model must be a .gguf file, a checkpoint directory or one of "
            f"{sorted(pretrained.MODELS)}, got {str(source)!r}"
        )
    return path
