"""Small GGUF files written from random transformers models, as llama.cpp's converter writes them."""

import contextlib
import functools
from pathlib import Path
from unittest import mock

import gguf
import numpy as np
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from scanlab.decoder.formats.gguf_file import FastReader

# transformers' tensor name (without "model.layers.{i}.") -> GGUF's (without "blk.{i}.").
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
OUTSIDE_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


# The architectures whose q/k rows llama.cpp's converter permutes (its LlamaModel and subclasses).
PERMUTED = ("llama", "smollm3")


def random_model(family: str = "llama", tie: bool = False, seed: int = 0, rope=None):
    """A random model of `family`; `rope` its rope_parameters (default: base 10000 unscaled)."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_parameters=rope or dict(rope_type="default", rope_theta=10_000.0),
        tie_word_embeddings=tie,
    )
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False))
    elif family == "qwen3":  # a head width that is not D / heads
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=24))
    elif family == "smollm3":  # 4 layers: the last rotates nothing
        model = SmolLM3ForCausalLM(
            SmolLM3Config(**common | dict(num_hidden_layers=4), pad_token_id=0)
        )
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    with torch.no_grad():  # biases and norms away from their init, so a mix-up shows
        for name, tensor in model.named_parameters():
            if "bias" in name or "norm" in name:
                tensor.normal_(1.0 if "norm" in name else 0.0, 0.3)
    return model.eval()


def interleave_pairs(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's permutation of Llama q/k rows: each head's halves -> interleaved pairs."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_gguf(path: Path, model, qtype=gguf.GGMLQuantizationType.F32) -> Path:
    """The model as a GGUF file: 2-d weights quantized to `qtype`, norms and biases in F32."""
    config = model.config
    arch = config.model_type
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    _add_rope_scaling(writer, config)
    writer.add_vocab_size(config.vocab_size)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        array = tensor.float().numpy()
        if name in OUTSIDE_NAMES:
            gguf_name = OUTSIDE_NAMES[name]
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            gguf_name = f"blk.{layer}.{LAYER_NAMES[rest]}"
        if arch in PERMUTED and rest_is(name, "q_proj.weight"):
            array = interleave_pairs(array, config.num_attention_heads)
        if arch in PERMUTED and rest_is(name, "k_proj.weight"):
            array = interleave_pairs(array, config.num_key_value_heads)
        if array.ndim == 2:
            data = gguf.quants.quantize(array, qtype)
            writer.add_tensor(gguf_name, data, raw_shape=data.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_rope_scaling(writer: gguf.GGUFWriter, config) -> None:
    """The rotary scaling as llama.cpp's converter writes it: metadata (linear, yarn) or the
    divisors of the frequencies (llama3: rope_freqs.weight, transformers' frequencies over the
    unscaled ones)."""
    rope = config.rope_parameters
    if rope["rope_type"] == "llama3":
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
        pairs = np.arange(0, scaled.shape[0] * 2, 2, dtype=np.float64) / (scaled.shape[0] * 2)
        unscaled = 1.0 / rope["rope_theta"] ** pairs
        writer.add_tensor(
            "rope_freqs.weight", (unscaled / scaled.double().numpy()).astype(np.float32)
        )
    elif rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope["rope_type"] == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        if "beta_fast" in rope:
            writer.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])


def rest_is(name: str, suffix: str) -> bool:
    return name.endswith(suffix)


@contextlib.contextmanager
def oracle_reader():
    """transformers loading a GGUF reads it through `gguf.GGUFReader`, two or three times over:
    here through scanlab's faster subclass, opened once per file. The same fields and tensors
    come out (test_gguf_file.py), so the oracle's numbers are its own."""
    with mock.patch.object(gguf, "GGUFReader", functools.cache(FastReader)):
        yield
