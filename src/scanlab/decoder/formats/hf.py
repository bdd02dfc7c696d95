"""Llama, Qwen2 and Gemma 3 checkpoints as transformers writes them <-> stacked DecoderParams.

A checkpoint directory holds `config.json` and either `model.safetensors` or sharded
`model-XXXXX-of-YYYYY.safetensors` files listed in `model.safetensors.index.json`. Tensors are
per layer (`model.layers.{i}.self_attn.q_proj.weight`, ...) in torch's (out, in) layout; scanlab
stacks them on a leading layer axis in the blog's layout. Every name and layout comes from the
parameter declarations in `scanlab.decoder.spec`. Loading (`base.assemble`, shared with GGUF
files) fills each stacked leaf in place (a donated buffer updated one layer at a time), so it holds
at most one extra layer's tensor; saving writes one shard per layer for the same reason, into a
temporary directory renamed into place when complete, so a failed save leaves nothing
half-written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.flax import save_file

from scanlab import checks, storage
from scanlab.decoder import spec
from scanlab.decoder.config import DecoderConfig
from scanlab.decoder.families import FAMILIES, FULL, SLIDING, Family, Leaf
from scanlab.decoder.formats.base import (
    CheckpointError,
    Tensor,
    assemble,
    checked_tensor,
    from_hf,
    hf_shape,
    read_json,
    to_hf,
)
from scanlab.decoder.params import DecoderParams, outside_layers
from scanlab.decoder.rope import FACTORS, SCALINGS, RopeScaling
from scanlab.errors import PathExistsError, ScanlabError

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


# --- config.json ------------------------------------------------------------------------------


# transformers' names of the MLP activations (`hidden_act`, Gemma's `hidden_activation`).
HF_ACTIVATIONS = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}


def _family(hf: dict) -> Family:
    architectures = hf.get("architectures") or []
    for family in FAMILIES.values():
        if hf.get("model_type") == family.hf_model_type or family.hf_architecture in architectures:
            return family
    names = [family.hf_model_type for family in FAMILIES.values()]
    raise CheckpointError(
        f"config.json must describe one of the model types {names}, got "
        f"model_type={hf.get('model_type')!r}, architectures={architectures}"
    )


# Each scaling's settings: RopeScaling's name -> transformers' rope_parameters key.
_SCALING_KEYS = {
    "linear": {},
    "llama3": {
        "original_max_seq_len": "original_max_position_embeddings",
        "low_freq_factor": "low_freq_factor",
        "high_freq_factor": "high_freq_factor",
    },
    "yarn": {
        "original_max_seq_len": "original_max_position_embeddings",
        "beta_fast": "beta_fast",
        "beta_slow": "beta_slow",
        "attention_factor": "attention_factor",
        "truncate": "truncate",
    },
}


def _rotation(rope: dict, default_theta: float, hf: dict) -> tuple[float, RopeScaling | None]:
    """(base, scaling) of one rotary setting; a scaling scanlab does not compute is refused."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = float(rope.get("rope_theta") or default_theta)
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1.0):
        raise CheckpointError(
            f"partial_rotary_factor must be 1.0 (every pair rotated), got {partial}"
        )
    if rope_type == "default":
        return theta, None
    if rope_type not in SCALINGS:
        raise CheckpointError(
            f"rope_type must be one of {['default', *SCALINGS]}, got {rope_type!r}"
        )
    for key in ("mscale", "mscale_all_dim"):  # DeepSeek's YaRN
        if rope.get(key):
            raise CheckpointError(f"rope_parameters.{key} is not supported, got {rope[key]}")
    if rope.get("factor") is None:
        raise CheckpointError(f"rope_parameters of type {rope_type!r} must state a factor")
    keys = _SCALING_KEYS[rope_type]
    settings = {ours: rope[theirs] for ours, theirs in keys.items() if rope.get(theirs) is not None}
    if "original_max_seq_len" in keys:  # transformers' default: the config's own context
        settings.setdefault(
            "original_max_seq_len",
            hf.get("original_max_position_embeddings") or hf.get("max_position_embeddings"),
        )
    try:
        return theta, RopeScaling(kind=rope_type, factor=float(rope["factor"]), **settings)
    except ScanlabError as error:
        raise CheckpointError(f"config.json: {error}") from None


def _rotations(hf: dict) -> dict[str, tuple[float, RopeScaling | None]]:
    """{FULL: (base, scaling), SLIDING: (base, scaling)}, from the current form
    (`rope_parameters`, flat or per layer type) or the older one (top-level `rope_theta`,
    `rope_scaling` and Gemma's `rope_local_base_freq`)."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    full_default = float(hf.get("rope_theta") or 10_000.0)
    local_default = float(hf.get("rope_local_base_freq") or 10_000.0)
    if FULL in rope or SLIDING in rope:
        return {
            FULL: _rotation(rope.get(FULL) or {}, full_default, hf),
            SLIDING: _rotation(rope.get(SLIDING) or {}, local_default, hf),
        }
    return {FULL: _rotation(rope, full_default, hf), SLIDING: (local_default, None)}


def _rope_parameters(theta: float, scaling: RopeScaling | None) -> dict:
    """`_rotation`'s inverse: one rotary setting as transformers' rope_parameters."""
    if scaling is None:
        return {"rope_type": "default", "rope_theta": theta}
    if scaling.kind == FACTORS:
        raise CheckpointError(
            "a rotary scaling read as per-pair divisors (a GGUF's rope_freqs.weight, without the "
            "settings that made them) has no transformers rope_parameters: save it as a .gguf"
        )
    settings = {
        theirs: getattr(scaling, ours)
        for ours, theirs in _SCALING_KEYS[scaling.kind].items()
        if getattr(scaling, ours) is not None
    }
    return {"rope_type": scaling.kind, "rope_theta": theta, "factor": scaling.factor, **settings}


def _check_features(hf: dict, family: Family, config: DecoderConfig) -> None:
    """Refuses settings scanlab does not implement rather than computing something else."""
    for flag in family.hf_false_flags:
        if hf.get(flag):
            raise CheckpointError(f"{flag} must be false for {family.hf_model_type}, got true")
    for key in family.hf_null_keys:
        if hf.get(key) is not None:
            raise CheckpointError(
                f"{key} must be null for {family.hf_model_type} (scanlab does not implement "
                f"it), got {hf[key]}"
            )
    if hf.get("use_bidirectional_attention"):
        raise CheckpointError("use_bidirectional_attention must be false, got true")
    activation = hf.get(family.hf_activation_key) or "silu"
    if activation != HF_ACTIVATIONS[family.activation]:
        raise CheckpointError(
            f"the activation (hidden_act) must be {HF_ACTIVATIONS[family.activation]!r} for "
            f"{family.hf_model_type}, got {activation!r}"
        )
    layer_types = hf.get("layer_types")
    if layer_types is not None and tuple(layer_types) != config.layer_types:
        raise CheckpointError(
            f"layer_types must follow {family.hf_model_type}'s pattern "
            f"{list(family.layer_pattern)} repeated over the layers, got {layer_types}"
        )


def config_from_hf(hf: dict) -> DecoderConfig:
    """DecoderConfig from a transformers config dict of one of the FAMILIES, older or current
    form; a rotary scaling scanlab does not compute is refused (`_rotation`)."""
    family = _family(hf)
    missing = [key for key in _REQUIRED_KEYS if key not in hf]
    if missing:
        raise CheckpointError(f"config.json is missing {', '.join(missing)}")
    n_heads = hf["num_attention_heads"]
    rotations = _rotations(hf)
    try:
        config = DecoderConfig(
            vocab_size=hf["vocab_size"],
            n_layers=hf["num_hidden_layers"],
            d_model=hf["hidden_size"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
            mlp_dim=hf["intermediate_size"],
            rope_theta=rotations[FULL][0],
            rope_scaling=rotations[FULL][1],
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_seq_len=hf.get("max_position_embeddings", 2048),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            family=family.name,
            sliding_window=hf.get("sliding_window") if family.has_sliding_layers else None,
            local_rope_theta=rotations[SLIDING][0],
            local_rope_scaling=rotations[SLIDING][1],
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar"),
            no_rope_layers=_no_rope_layers(hf, family),
        )
    except ScanlabError as error:
        raise CheckpointError(f"config.json: {error}") from None
    _check_features(hf, family, config)
    return config


def _no_rope_layers(hf: dict, family: Family) -> tuple[int, ...]:
    """The layers that rotate nothing, where the family has such layers: SmolLM3's config lists
    them (`no_rope_layers`, 0 for such a layer) or states their interval."""
    if family.no_rope_interval is None:
        return ()
    n_layers, listed = hf["num_hidden_layers"], hf.get("no_rope_layers")
    if listed is None:
        return family.no_rope_layers(n_layers, hf.get("no_rope_layer_interval"))
    return tuple(i for i, uses_rope in enumerate(listed[:n_layers]) if not uses_rope)


_REQUIRED_KEYS = (
    "vocab_size",
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "intermediate_size",
)


def config_to_hf(config: DecoderConfig, dtype: str) -> dict:
    """A transformers config dict in the current form (with the older top-level `rope_theta`
    where the family has one rotary base)."""
    family = config.features
    common = {
        "architectures": [family.hf_architecture],
        "model_type": family.hf_model_type,
        "vocab_size": config.vocab_size,
        "num_hidden_layers": config.n_layers,
        "hidden_size": config.d_model,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.mlp_dim,
        "rms_norm_eps": config.norm_eps,
        "max_position_embeddings": config.max_seq_len,
        "tie_word_embeddings": config.tie_embeddings,
        # No embedding row is kept at zero (transformers' default pad id may lie past a small
        # vocabulary); the tokenizer's files name the pad token.
        "pad_token_id": None,
        "dtype": dtype,
    }
    full_rope = _rope_parameters(config.rope_theta, config.rope_scaling)
    features: dict = {
        family.hf_activation_key: HF_ACTIVATIONS[family.activation],
        **{flag: False for flag in family.hf_false_flags},
    }
    if family.hf_query_scalar:
        features["query_pre_attn_scalar"] = config.query_pre_attn_scalar or config.head_dim
    features.update(dict.fromkeys(family.hf_null_keys))
    if family.no_rope_interval is not None:
        features["no_rope_layers"] = [
            int(i not in config.no_rope_layers) for i in range(config.n_layers)
        ]
    elif config.no_rope_layers:
        raise CheckpointError(
            f"no_rope_layers must be empty for {family.hf_model_type}: its transformers config "
            f"cannot state them, got {config.no_rope_layers}"
        )
    rope: dict[str, Any]
    if family.has_sliding_layers:  # a rotary setting per kind of layer
        rope = {
            "sliding_window": config.sliding_window,
            "layer_types": list(config.layer_types),
            "rope_parameters": {
                FULL: full_rope,
                SLIDING: _rope_parameters(config.local_rope_theta, config.local_rope_scaling),
            },
        }
    else:
        rope = {"rope_theta": config.rope_theta, "rope_parameters": full_rope}
    return {**common, **features, **rope}


# --- names ----------------------------------------------------------------------------------


def _layer_name(i: int, leaf: Leaf) -> str:
    return f"model.layers.{i}.{leaf.hf_name}"


def _leaves(tree) -> list:
    """The present leaves of a params-shaped tree (declarations, arrays or shapes)."""
    return jax.tree.leaves(tree, is_leaf=lambda node: spec.is_leaf(node) or spec.is_shape(node))


# --- load -------------------------------------------------------------------------------------


# safetensors' names of the float dtypes weights are stored in.
_FLOAT_DTYPES = {"F64": jnp.float64, "F32": jnp.float32, "F16": jnp.float16, "BF16": jnp.bfloat16}


class _Reader:
    """Reads tensors by name from a single-file or sharded safetensors checkpoint.

    Every failure of a file (missing, truncated, corrupt header, NaN data) becomes a
    CheckpointError naming the file and what is wrong with it.
    """

    def __init__(self, directory: Path):
        index = directory / INDEX_FILE
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} must map tensor names under 'weight_map'")
        elif (directory / SINGLE_FILE).exists():
            with self._open(directory / SINGLE_FILE) as f:
                weight_map = dict.fromkeys(f.keys(), SINGLE_FILE)
        else:
            raise CheckpointError(
                f"{directory} must contain {SINGLE_FILE} or {INDEX_FILE}, found neither"
            )
        self.directory, self.weight_map = directory, weight_map

    @staticmethod
    def _open(path: Path):
        if not path.is_file():
            raise CheckpointError(f"{path} is listed in the checkpoint but missing")
        try:
            return safe_open(path, framework="flax")
        except SafetensorError as error:
            raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from None

    def _path(self, name: str) -> Path:
        if name not in self.weight_map:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint")
        return self.directory / self.weight_map[name]

    def dtype(self, name: str) -> np.dtype:
        """The stored dtype of tensor `name`, from the file's header alone (no data read)."""
        path = self._path(name)
        with self._open(path) as f:
            stored = f.get_slice(name).get_dtype()
        if stored not in _FLOAT_DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name} has dtype {stored}, expected a float type"
            )
        return jnp.dtype(_FLOAT_DTYPES[stored])

    def read(self, name: str, shape: tuple[int, ...]) -> jax.Array:
        path = self._path(name)
        with self._open(path) as f:
            try:
                tensor = f.get_tensor(name)
            except SafetensorError as error:
                raise CheckpointError(f"{path}: tensor {name} cannot be read: {error}") from None
        return checked_tensor(tensor, shape, f"{path}: tensor {name}", "config.json")


def read_config(directory: Path) -> DecoderConfig:
    """The DecoderConfig of a checkpoint directory's config.json (no weights read)."""
    if not (directory / CONFIG_FILE).is_file():
        raise CheckpointError(f"{directory} must contain {CONFIG_FILE}")
    return config_from_hf(read_json(directory / CONFIG_FILE))


def load_checkpoint(path: str | os.PathLike, dtype=None) -> tuple[DecoderConfig, DecoderParams]:
    """Reads a transformers checkpoint directory (Llama, Qwen2, Gemma 3) into DecoderParams.

    Args:
      path: directory with config.json and the safetensors file(s).
      dtype: convert parameters to this dtype; default: keep the checkpoint's.
    """
    directory = checks.path_like("path", path)
    config = read_config(directory)
    reader = _Reader(directory)
    dtype = spec.check_param_dtype(dtype or reader.dtype(config.features.leaves.embed.hf_name))

    def read(leaf: Leaf, layer: int | None) -> Tensor:
        name = leaf.hf_name if layer is None else _layer_name(layer, leaf)
        return from_hf(leaf, reader.read(name, hf_shape(leaf, config)), config)

    return config, assemble(config, read, dtype)


# --- save -------------------------------------------------------------------------------------


def check_new_directory(path: Path, overwrite: bool) -> None:
    """A directory may be written at `path`: nothing there, an empty directory, or (with
    `overwrite`) a directory to replace; never a file."""
    if path.exists() and not path.is_dir():
        raise PathExistsError(
            f"path {path} is a file; a transformers checkpoint is a directory (a path ending "
            "in .gguf writes a GGUF file)"
        )
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise PathExistsError(
            f"path {path} exists and is not empty; pass {checks.shown('overwrite')}=True"
        )


def save_checkpoint(
    path: str | os.PathLike, config: DecoderConfig, params: DecoderParams, overwrite: bool = False
) -> Path:
    """Writes params as a sharded transformers checkpoint (one shard per layer, plus one).

    The directory is written under a temporary name next to `path` and renamed when complete.
    """
    spec.check_params(params, config)
    spec.check_dense(params, "save_checkpoint")
    directory = Path(path)
    check_new_directory(directory, overwrite)
    with storage.staged_directory(directory) as staging:
        _write_shards(staging, config, params)
    return directory


def _write_shards(directory: Path, config: DecoderConfig, params: DecoderParams) -> None:
    n_shards = config.n_layers + 1
    shard = "model-{:05d}-of-{:05d}.safetensors".format
    weight_map: dict[str, str] = {}
    declared = spec.declared(config)
    block_leaves = list(zip(_leaves(declared.blocks), _leaves(params.blocks), strict=True))
    for i in range(config.n_layers):
        tensors = {
            _layer_name(i, leaf): to_hf(leaf, array[i], config) for leaf, array in block_leaves
        }
        _save(directory, shard(i + 1, n_shards), tensors, weight_map)
    outside = zip(_leaves(outside_layers(declared)), _leaves(outside_layers(params)), strict=True)
    rest = {leaf.hf_name: to_hf(leaf, array, config) for leaf, array in outside}
    _save(directory, shard(n_shards, n_shards), rest, weight_map)
    total_size = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    (directory / INDEX_FILE).write_text(
        json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2)
    )
    hf_config = config_to_hf(config, np.dtype(params.embed.dtype).name)
    (directory / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2))


def _save(directory: Path, filename: str, tensors: dict, weight_map: dict) -> None:
    # safetensors wants contiguous row-major data: materialise each transposed view.
    save_file(
        {k: jnp.array(v, copy=True) for k, v in tensors.items()},
        directory / filename,
        metadata={"format": "pt"},
    )
    weight_map.update(dict.fromkeys(tensors, filename))
