"""LoRA adapters in and out as PEFT writes them: a directory of `adapter_model.safetensors` and
`adapter_config.json`, which `peft.PeftModel.from_pretrained` loads over transformers' model
(and MaxText, Levanter and llama.cpp's `convert_lora_to_gguf.py` read).

PEFT keeps each target's pair in torch's layout: `lora_A` (r, in), `lora_B` (out, r), under
`base_model.model.model.layers.{i}.<module>.lora_{A,B}.weight`, with ΔW = (alpha / r) B A.
scanlab's `a` ([L,] inputs..., r) and `b` ([L,] r, outputs...) are the same numbers in scanlab's
layout: transposed, and their inputs and outputs put in the order transformers gives the
weight's own (read off `formats.base.to_hf`, so a family whose layouts differ needs nothing
more; for today's families that order is scanlab's).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from scanlab import storage
from scanlab.checks import shown
from scanlab.decoder import spec
from scanlab.decoder.config import DecoderConfig
from scanlab.decoder.families import Leaf
from scanlab.decoder.formats.base import to_hf
from scanlab.decoder.formats.gguf_file import file_layout
from scanlab.decoder.formats.hf import check_new_directory
from scanlab.decoder.load import Model
from scanlab.decoder.lora import Adapted
from scanlab.errors import ArgumentError, MissingPathError, PathExistsError
from scanlab.finetune.adapters import TARGETS, Adapters, LoraConfig, _at, adapt

WEIGHTS_FILE, CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"
_PREFIX = "base_model.model.model.layers"


def adapters_of(model: Model) -> tuple[Adapters, LoraConfig]:
    """The adapters of an adapted model (e.g. `FinetuneResult.tuned`) and their settings."""
    adapters, settings = {}, set()
    for target, path in TARGETS.items():
        weight = _at(model.params.blocks, path)
        if isinstance(weight, Adapted):
            adapters[target] = {"a": weight.a, "b": weight.b}
            settings.add((weight.rank, weight.scaling * weight.rank, weight.dropout))
    if not adapters:
        raise ArgumentError("model must carry LoRA adapters (a fine-tuned model), got none")
    if len(settings) > 1:
        raise ArgumentError(f"adapters must share one rank, alpha and dropout, got {settings}")
    rank, alpha, dropout = settings.pop()
    return adapters, LoraConfig(rank=rank, alpha=alpha, dropout=dropout, targets=tuple(adapters))


def save_adapter(
    path: str | os.PathLike,
    model: Model,
    *,
    base_model: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes the model's adapters as a PEFT adapter directory (`base_model` recorded as its
    `base_model_name_or_path`), or, for a path ending in .gguf, as llama.cpp's GGUF LoRA file
    (`llama-cli --lora`, `Llama(lora_path=...)`). Nothing is left half-written if it fails."""
    adapters, lora = adapters_of(model)
    config = model.config
    if Path(path).suffix == ".gguf":
        return _save_gguf_adapter(Path(path), config, adapters, lora, overwrite)
    tensors = {}
    for target, pair in adapters.items():
        leaf = _leaf(config, target)
        a_layers, b_layers = np.asarray(pair["a"], np.float32), np.asarray(pair["b"], np.float32)
        for i in range(config.n_layers):
            lora_a, lora_b = to_peft(leaf, a_layers[i], b_layers[i], config)
            name = _module_name(i, leaf)
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(lora_a)
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(lora_b)
    settings = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(lora.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
    }
    directory = Path(path)
    check_new_directory(directory, overwrite)
    with storage.staged_directory(directory) as staging:
        save_file(tensors, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(json.dumps(settings, indent=2))
    return directory


def _save_gguf_adapter(
    path: Path, config: DecoderConfig, adapters: Adapters, lora: LoraConfig, overwrite: bool
) -> Path:
    """llama.cpp's LoRA file (llama-adapter.cpp): `general.type` "adapter", `adapter.type`
    "lora", `adapter.lora.alpha`, and per adapted weight `<its GGUF name>.lora_a` (r, in) and
    `.lora_b` (out, r) in the file's order of that weight's inputs and outputs."""
    if path.exists() and not overwrite:
        raise PathExistsError(f"path {path} exists; pass {shown('overwrite')}=True")
    with storage.staged_file(path) as staging:
        writer = gguf.GGUFWriter(staging, config.features.gguf_architecture)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lora.alpha)
        for target, pair in adapters.items():
            leaf = _leaf(config, target)
            inputs, outputs = _order(
                leaf, config, lambda a, leaf=leaf: file_layout(leaf, a, config)
            )
            a_layers, b_layers = (
                np.asarray(pair["a"], np.float32),
                np.asarray(pair["b"], np.float32),
            )
            for i in range(config.n_layers):
                name = f"blk.{i}.{leaf.gguf_name}"  # e.g. blk.0.attn_q.weight
                lora_a = a_layers[i].reshape(-1, lora.rank)[inputs].T
                lora_b = b_layers[i].reshape(lora.rank, -1)[:, outputs].T
                writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(lora_a))
                writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(lora_b))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def load_adapter(path: str | os.PathLike, model: Model) -> Model:
    """`model` with the PEFT adapter at `path` over its weights (dense or quantized), refused by
    name where the adapter's kind, targets, ranks or shapes do not fit the model."""
    directory = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise MissingPathError(f"{directory} must hold PEFT's {name}: not a PEFT adapter")
    try:
        settings = json.loads((directory / CONFIG_FILE).read_text())
    except json.JSONDecodeError as error:
        raise ArgumentError(f"{directory / CONFIG_FILE} is not JSON: {error}") from None
    missing = [key for key in ("r", "lora_alpha", "target_modules") if key not in settings]
    if missing:
        raise ArgumentError(f"{directory / CONFIG_FILE} must set {missing}")
    lora = _lora_config(settings, directory)
    try:
        tensors = load_file(directory / WEIGHTS_FILE)
    except SafetensorError as error:
        raise ArgumentError(f"{directory / WEIGHTS_FILE} is not readable: {error}") from None
    config = model.config
    adapters = {}
    for target in lora.targets:
        leaf = _leaf(config, target)
        a_layers, b_layers = [], []
        for i in range(config.n_layers):
            name = _module_name(i, leaf)
            lora_a, lora_b = (_tensor(tensors, f"{name}.lora_{x}.weight", directory) for x in "AB")
            a, b = from_peft(leaf, lora_a, lora_b, config, f"{directory}: {name}")
            a_layers.append(a)
            b_layers.append(b)
        adapters[target] = {
            "a": jnp.asarray(np.stack(a_layers)),
            "b": jnp.asarray(np.stack(b_layers)),
        }
    return model._replace(params=adapt(model.params, adapters, lora))


def to_peft(leaf: Leaf, a, b, config: DecoderConfig) -> tuple[np.ndarray, np.ndarray]:
    """One layer's a (inputs..., r) and b (r, outputs...) -> PEFT's lora_A (r, in) and lora_B
    (out, r), in transformers' order of the weight's inputs and outputs."""
    inputs, outputs = _hf_order(leaf, config)
    rank = a.shape[-1]
    return a.reshape(-1, rank)[inputs].T, b.reshape(rank, -1)[:, outputs].T


def from_peft(leaf: Leaf, lora_a, lora_b, config: DecoderConfig, name: str):
    """PEFT's lora_A (r, in) and lora_B (out, r) -> one layer's a (inputs..., r) and b (r,
    outputs...); shapes that do not fit the weight are refused naming the tensor."""
    inputs, outputs = _hf_order(leaf, config)
    rank = lora_a.shape[0]
    expected = {"lora_A": (rank, len(inputs)), "lora_B": (len(outputs), rank)}
    for part, tensor in (("lora_A", lora_a), ("lora_B", lora_b)):
        if tuple(tensor.shape) != expected[part]:
            raise ArgumentError(
                f"{name}.{part} has shape {tuple(tensor.shape)}, expected {expected[part]} for "
                "this model: the adapter was made for another base model"
            )
    in_shape, out_shape = _weight_shape(leaf, config)
    a = np.empty((len(inputs), rank), np.float32)
    a[inputs] = lora_a.T
    b = np.empty((rank, len(outputs)), np.float32)
    b[:, outputs] = lora_b.T
    return a.reshape(*in_shape, rank), b.reshape(rank, *out_shape)


def _hf_order(leaf: Leaf, config: DecoderConfig) -> tuple[np.ndarray, np.ndarray]:
    """For each of transformers' input columns (output rows) of the weight, the index of that
    input (output) in scanlab's flattened inputs (outputs)."""
    return _order(leaf, config, lambda array: to_hf(leaf, array, config))


def _order(leaf: Leaf, config: DecoderConfig, layout) -> tuple[np.ndarray, np.ndarray]:
    """The input and output orders of a file's (out, in) `layout` of the weight, read off by
    laying out each weight entry's input (output) index."""
    in_shape, out_shape = _weight_shape(leaf, config)
    grid = np.zeros((math.prod(in_shape), math.prod(out_shape)), np.int64)
    in_index = (grid + np.arange(grid.shape[0])[:, None]).reshape(*in_shape, *out_shape)
    out_index = (grid + np.arange(grid.shape[1])[None, :]).reshape(*in_shape, *out_shape)
    return np.asarray(layout(in_index))[0], np.asarray(layout(out_index))[:, 0]


def _weight_shape(leaf: Leaf, config: DecoderConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The weight's input and output shapes, in scanlab's letters (one layer)."""
    size = spec.sizes(config)
    letters = leaf.shape.split()
    inputs = len(leaf.fan_in.split())  # a weight's input letters lead its shape
    return (
        tuple(size[x] for x in letters[:inputs]),
        tuple(size[x] for x in letters[inputs:]),
    )


def _leaf(config: DecoderConfig, target: str) -> Leaf:
    return _at(config.features.leaves.blocks, TARGETS[target])


def _module_name(layer: int, leaf: Leaf) -> str:
    """PEFT's name of a layer's adapted module: transformers' weight name less `.weight`."""
    return f"{_PREFIX}.{layer}.{leaf.hf_name.removesuffix('.weight')}"


def _tensor(tensors: dict, name: str, directory: Path) -> np.ndarray:
    if name not in tensors:
        raise ArgumentError(f"{directory / WEIGHTS_FILE} has no tensor {name}")
    return np.asarray(tensors[name], np.float32)


def _lora_config(settings: dict, directory: Path) -> LoraConfig:
    """PEFT's settings as a LoraConfig; what scanlab's LoRA cannot express refused by name."""
    where = directory / CONFIG_FILE
    if settings.get("peft_type") != "LORA":
        raise ArgumentError(f"{where}: peft_type must be 'LORA', got {settings.get('peft_type')!r}")
    for key, neutral in (
        ("use_dora", False),
        ("use_rslora", False),
        ("fan_in_fan_out", False),
        ("rank_pattern", {}),
        ("alpha_pattern", {}),
        ("layers_to_transform", None),
        ("modules_to_save", None),
        ("bias", "none"),
    ):
        if settings.get(key) not in (neutral, None):  # absent or null: PEFT's default
            raise ArgumentError(
                f"{where}: {key} must be {neutral!r} (scanlab's LoRA has no such setting), got "
                f"{settings[key]!r}"
            )
    targets = settings.get("target_modules")
    if isinstance(targets, str) or not isinstance(targets, list):
        raise ArgumentError(f"{where}: target_modules must be a list of names, got {targets!r}")
    unknown = [name for name in targets if name not in TARGETS]
    if unknown:
        raise ArgumentError(
            f"{where}: target_modules must be among {list(TARGETS)}, got {unknown} too"
        )
    return LoraConfig(
        rank=settings["r"],
        alpha=float(settings["lora_alpha"]),
        dropout=float(settings.get("lora_dropout", 0.0)),
        targets=tuple(name for name in TARGETS if name in targets),
    )
