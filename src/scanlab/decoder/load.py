"""A model by name or path: a known model's name (fetched on first use), a .gguf file or a
transformers directory -> its config, stacked parameters and tokenizer."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp

from scanlab import checks
from scanlab.checks import shown
from scanlab.decoder import qmatvec, spec
from scanlab.decoder.config import DecoderConfig, check_weights, preset
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


def load_model(
    source: str | os.PathLike, weights: str | None = None, kernel: bool | None = None
) -> Model:
    """A model and its tokenizer from a known model's name, a .gguf file or a transformers
    directory.

    `weights` is one of WEIGHTS: "quantized" (int8 blocks: a GGUF file's own, losslessly; a
    directory's quantized by `quant.quantize`), "float32" or "bfloat16". None means "quantized"
    for GGUF files and known models, "float32" for directories. `kernel`: quantized weights in
    the CPU kernel's layout (`qmatvec`); None: where the kernel is available.
    """
    path = resolve(source, weights)
    _check_fits(path, weights)
    tokenizer = load_tokenizer(path)  # first: a checkpoint without one fails before the weights
    return Model(*_load_weights(path, weights, kernel), tokenizer)


def load_weights(
    source: str | os.PathLike, weights: str | None = None, kernel: bool | None = None
) -> tuple[DecoderConfig, DecoderParams]:
    """(config, params) of a known model's name, a .gguf file or a transformers directory."""
    path = resolve(source, weights)
    _check_fits(path, weights)
    return _load_weights(path, weights, kernel)


def _load_weights(
    path: Path, weights: str | None, kernel: bool | None
) -> tuple[DecoderConfig, DecoderParams]:
    def on_kernel() -> bool:  # asked only for quantized weights: it may build the kernel
        return qmatvec.available() if kernel is None else bool(kernel)

    if path.is_dir():
        if weights != "quantized":
            return load_checkpoint(path, dtype=weights or "float32")
        config, params = load_checkpoint(path, dtype="float32")
        return config, spec.quantize(params, config, kernel=on_kernel())
    if weights not in (None, "quantized"):
        return load_gguf(path, dtype=weights)
    return load_gguf(path, dtype="float32", quantized=True, kernel=on_kernel())


def _check_fits(path: Path, weights: str | None) -> None:
    """Refuses, before any weight is read, a model whose weights would not fit in memory: a
    GGUF file's blocks are kept at the file's size, any other form at its dtype's."""
    form = weights or ("float32" if path.is_dir() else "quantized")
    if form == "quantized" and not path.is_dir():
        nbytes = path.stat().st_size
    else:  # a directory quantized on load holds its float32 weights first
        itemsize = 2 if form == "bfloat16" else 4
        nbytes = spec.param_count(load_config(path)) * itemsize
    on_disk = f", a {path.stat().st_size / 2**30:.1f} GiB file" if path.is_file() else ""
    checks.fits_in_memory(f"{shown('model')} {path.name} ({form} weights{on_disk})", nbytes)


def random_weights(
    preset_name: str, key, weights: str | None = None
) -> tuple[DecoderConfig, DecoderParams]:
    """(config, params) of a preset (`config.PRESETS`) with random weights drawn from `key`:
    float32 (and then quantized, for weights "quantized" or None's default) or bfloat16; refused
    up front where they would not fit in memory."""
    check_weights(weights)
    config = preset(preset_name)
    dtype = jnp.dtype("float32" if weights in (None, "quantized") else weights)
    checks.fits_in_memory(
        f"preset {preset_name} in {dtype.name}", spec.param_count(config) * dtype.itemsize
    )
    params = spec.init_params(config, key, dtype)
    return config, spec.quantize(params, config) if weights == "quantized" else params


def load_config(path: Path) -> DecoderConfig:
    """A resolved model's config (`resolve`), read without its weights."""
    if path.is_dir():
        return read_config(path)
    return config_from_gguf(open_gguf(path), path)


def resolve(
    source: str | os.PathLike,
    weights: str | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> Path:
    """The path of the model (a known name is fetched, once, first, telling `on_progress`);
    `weights` checked before."""
    check_weights(weights)
    checks.path_like("model", source)
    if str(source) in pretrained.MODELS:
        return pretrained.fetch(pretrained.MODELS[str(source)], on_progress=on_progress)
    path = Path(source)
    if not path.exists():
        raise MissingPathError(
            f"{shown('model')} must be a .gguf file, a checkpoint directory or one of "
            f"{sorted(pretrained.MODELS)}, got {str(source)!r}"
        )
    return path
