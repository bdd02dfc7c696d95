"""Llama-architecture checkpoints as transformers writes them <-> stacked DecoderParams.

A checkpoint directory holds `config.json` and either `model.safetensors` or sharded
`model-XXXXX-of-YYYYY.safetensors` files listed in `model.safetensors.index.json`. Tensors are
per layer (`model.layers.{i}.self_attn.q_proj.weight`, ...) in torch's (out, in) layout; scanlab
stacks them on a leading layer axis in the blog's layout. Loading fills each stacked leaf in place
(a donated buffer updated one layer at a time), so it holds at most one extra layer's tensor;
saving writes one shard per layer for the same reason, into a temporary directory renamed into
place when complete, so a failed save leaves nothing half-written.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.flax import save_file

from scanlab.decoder.config import DecoderConfig
from scanlab.decoder.params import DecoderParams, check_params, stacked_shapes

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """The directory is not a Llama-architecture checkpoint scanlab can read, and why."""


# --- config.json ------------------------------------------------------------------------------


def config_from_hf(hf: dict) -> DecoderConfig:
    """DecoderConfig from a transformers LlamaConfig dict, in its older or current form.

    The current form keeps rotary settings in `rope_parameters`; the older one has `rope_theta`
    and `rope_scaling` at the top level. Only the default (unscaled) rotary embedding is supported.
    """
    architectures = hf.get("architectures") or []
    if hf.get("model_type") != "llama" and "LlamaForCausalLM" not in architectures:
        raise CheckpointError(
            f"config.json must describe a Llama model (model_type 'llama' or architecture "
            f"LlamaForCausalLM), got model_type={hf.get('model_type')!r}, "
            f"architectures={architectures}"
        )
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(f"rope_type must be 'default', got {rope_type!r}")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise CheckpointError(f"{flag} must be false (Llama has no biases), got true")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act must be 'silu', got {hf['hidden_act']!r}")
    n_heads = hf["num_attention_heads"]
    return DecoderConfig(
        vocab_size=hf["vocab_size"],
        n_layers=hf["num_hidden_layers"],
        d_model=hf["hidden_size"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        mlp_dim=hf["intermediate_size"],
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def config_to_hf(config: DecoderConfig, dtype: str) -> dict:
    """A LlamaConfig dict in the current form, with the older top-level `rope_theta` as well."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "num_hidden_layers": config.n_layers,
        "hidden_size": config.d_model,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.mlp_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "max_position_embeddings": config.max_seq_len,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "dtype": dtype,
    }


# --- per-layer tensors <-> stacked leaves -----------------------------------------------------


class _Tensor(NamedTuple):
    """How one torch tensor maps onto a scanlab leaf (one layer's slice for block leaves)."""

    name: str  # e.g. "self_attn.q_proj.weight" under "model.layers.{i}."
    to_scanlab: Callable[[jax.Array, DecoderConfig], jax.Array]
    to_torch: Callable[[jax.Array, DecoderConfig], jax.Array]


def _same(w, config):
    return w


def _transpose(w, config):
    return w.T


def _q_to_scanlab(w, c):  # (R*K*Dh, D), heads ordered k-major -> (D, R, K, Dh)
    return w.T.reshape(c.d_model, c.n_kv_heads, c.n_rep, c.head_dim).transpose(0, 2, 1, 3)


def _q_to_torch(w, c):
    return w.transpose(0, 2, 1, 3).reshape(c.d_model, -1).T


def _kv_to_scanlab(w, c):  # (K*Dh, D) -> (D, K, Dh)
    return w.T.reshape(c.d_model, c.n_kv_heads, c.head_dim)


def _kv_to_torch(w, c):
    return w.reshape(c.d_model, -1).T


def _o_to_scanlab(w, c):  # (D, R*K*Dh) -> (R, K, Dh, D)
    return w.T.reshape(c.n_kv_heads, c.n_rep, c.head_dim, c.d_model).transpose(1, 0, 2, 3)


def _o_to_torch(w, c):
    return w.transpose(1, 0, 2, 3).reshape(-1, c.d_model).T


# In the order of the DecoderBlock leaves.
_LAYER_TENSORS = (
    _Tensor("input_layernorm.weight", _same, _same),
    _Tensor("self_attn.q_proj.weight", _q_to_scanlab, _q_to_torch),
    _Tensor("self_attn.k_proj.weight", _kv_to_scanlab, _kv_to_torch),
    _Tensor("self_attn.v_proj.weight", _kv_to_scanlab, _kv_to_torch),
    _Tensor("self_attn.o_proj.weight", _o_to_scanlab, _o_to_torch),
    _Tensor("post_attention_layernorm.weight", _same, _same),
    _Tensor("mlp.gate_proj.weight", _transpose, _transpose),
    _Tensor("mlp.up_proj.weight", _transpose, _transpose),
    _Tensor("mlp.down_proj.weight", _transpose, _transpose),
)
EMBED, FINAL_NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


def _layer_name(i: int, tensor: _Tensor) -> str:
    return f"model.layers.{i}.{tensor.name}"


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked: jax.Array, i: jax.Array, layer: jax.Array) -> jax.Array:
    # Donated: the stacked buffer is updated in place rather than copied per layer.
    return stacked.at[i].set(layer.astype(stacked.dtype))


# --- load -------------------------------------------------------------------------------------


class _Reader:
    """Reads tensors by name from a single-file or sharded safetensors checkpoint."""

    def __init__(self, directory: Path):
        index = directory / INDEX_FILE
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (directory / SINGLE_FILE).exists():
            with safe_open(directory / SINGLE_FILE, framework="flax") as f:
                weight_map = dict.fromkeys(f.keys(), SINGLE_FILE)
        else:
            raise CheckpointError(
                f"{directory} must contain {SINGLE_FILE} or {INDEX_FILE}, found neither"
            )
        self.directory, self.weight_map = directory, weight_map

    def read(self, name: str, shape: tuple[int, ...]) -> jax.Array:
        if name not in self.weight_map:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint")
        with safe_open(self.directory / self.weight_map[name], framework="flax") as f:
            tensor = f.get_tensor(name)
        if tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"tensor {name} has shape {tuple(tensor.shape)}, expected {shape} from config.json"
            )
        return tensor


def _torch_shapes(config: DecoderConfig) -> tuple[tuple[int, ...], ...]:
    """The per-layer tensor shapes transformers stores, in `_LAYER_TENSORS` order."""
    D, H, K, F = config.d_model, config.n_heads * config.head_dim, config.n_kv_heads, config.mlp_dim
    kv = K * config.head_dim
    return ((D,), (H, D), (kv, D), (kv, D), (D, H), (D,), (F, D), (F, D), (D, F))


def load_checkpoint(path: str | os.PathLike, dtype=None) -> tuple[DecoderConfig, DecoderParams]:
    """Reads a transformers Llama checkpoint directory into stacked DecoderParams.

    Args:
      path: directory with config.json and the safetensors file(s).
      dtype: convert parameters to this dtype; default: keep the checkpoint's.
    """
    directory = Path(path)
    if not (directory / CONFIG_FILE).is_file():
        raise CheckpointError(f"{directory} must contain {CONFIG_FILE}")
    config = config_from_hf(json.loads((directory / CONFIG_FILE).read_text()))
    reader = _Reader(directory)
    embed = reader.read(EMBED, (config.vocab_size, config.d_model))
    dtype = jnp.dtype(dtype or embed.dtype)
    leaves = []
    for tensor, torch_shape, stacked_shape in zip(
        _LAYER_TENSORS,
        _torch_shapes(config),
        jax.tree.leaves(stacked_shapes(config), is_leaf=lambda s: isinstance(s[0], int)),
        strict=True,
    ):
        stacked = jnp.zeros(stacked_shape, dtype)
        for i in range(config.n_layers):
            layer = tensor.to_scanlab(reader.read(_layer_name(i, tensor), torch_shape), config)
            stacked = _set_layer(stacked, i, layer)
        leaves.append(stacked)
    blocks = jax.tree.structure(stacked_shapes(config), is_leaf=lambda s: isinstance(s[0], int))
    lm_head = (
        None
        if config.tie_embeddings
        else reader.read(LM_HEAD, (config.vocab_size, config.d_model)).T.astype(dtype)
    )
    params = DecoderParams(
        embed=embed.astype(dtype),
        blocks=blocks.unflatten(leaves),
        final_norm=reader.read(FINAL_NORM, (config.d_model,)).astype(dtype),
        lm_head=lm_head,
    )
    return config, params


# --- save -------------------------------------------------------------------------------------


def save_checkpoint(
    path: str | os.PathLike, config: DecoderConfig, params: DecoderParams, overwrite: bool = False
) -> Path:
    """Writes params as a sharded transformers checkpoint (one shard per layer, plus one).

    The directory is written under a temporary name next to `path` and renamed when complete.
    """
    check_params(params, config)
    directory = Path(path)
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"path {directory} exists and is not empty; pass overwrite=True")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        _write_shards(staging, config, params)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _write_shards(directory: Path, config: DecoderConfig, params: DecoderParams) -> None:
    n_shards = config.n_layers + 1
    shard = "model-{:05d}-of-{:05d}.safetensors".format
    weight_map = {}
    leaves = jax.tree.leaves(params.blocks)
    for i in range(config.n_layers):
        tensors = {
            _layer_name(i, tensor): jnp.asarray(tensor.to_torch(leaf[i], config))
            for tensor, leaf in zip(_LAYER_TENSORS, leaves, strict=True)
        }
        _save(directory, shard(i + 1, n_shards), tensors, weight_map)
    rest = {EMBED: params.embed, FINAL_NORM: params.final_norm}
    if params.lm_head is not None:
        rest[LM_HEAD] = params.lm_head.T
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
