"""A Llama-architecture decoder (and Qwen2) whose layers run by `jax.lax.scan` over stacked
parameters.

Every parameter is declared once in `scanlab.decoder.spec`; shapes, initialisation, checks,
placement on a mesh and the transformers and GGUF checkpoint layouts all derive from that
declaration. Real models come in as GGUF files or transformers directories, with their tokenizer.
"""

from scanlab.decoder.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from scanlab.decoder.config import FAMILIES, PRESETS, DecoderConfig, preset
from scanlab.decoder.generate import Generation, generate, stream
from scanlab.decoder.gguf_checkpoint import load_gguf
from scanlab.decoder.layers import LayerCache, decoder_block
from scanlab.decoder.model import forward, forward_loop
from scanlab.decoder.params import Attention, DecoderBlock, DecoderParams, stack, unstack
from scanlab.decoder.spec import (
    SPEC,
    Leaf,
    check_params,
    init_params,
    layer_shapes,
    param_count,
    param_shapes,
    param_specs,
    shard_params,
)
from scanlab.decoder.stack import REMAT, run_layers
from scanlab.decoder.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "FAMILIES",
    "PRESETS",
    "REMAT",
    "SPEC",
    "Attention",
    "CheckpointError",
    "DecoderBlock",
    "DecoderConfig",
    "DecoderParams",
    "Generation",
    "LayerCache",
    "Leaf",
    "Tokenizer",
    "check_params",
    "decoder_block",
    "forward",
    "forward_loop",
    "generate",
    "init_params",
    "layer_shapes",
    "load_checkpoint",
    "load_gguf",
    "load_tokenizer",
    "param_count",
    "param_shapes",
    "param_specs",
    "preset",
    "run_layers",
    "save_checkpoint",
    "shard_params",
    "stack",
    "stream",
    "unstack",
]
