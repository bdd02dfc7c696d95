"""A Llama-architecture decoder (and Qwen2) whose layers run by `jax.lax.scan` over stacked
parameters.

Every parameter is declared once in `scanlab.decoder.spec`; shapes, initialisation, checks,
placement on a mesh and the transformers checkpoint layout all derive from that declaration.
"""

from scanlab.decoder.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from scanlab.decoder.config import FAMILIES, PRESETS, DecoderConfig, preset
from scanlab.decoder.generate import Generation, generate
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
    "check_params",
    "decoder_block",
    "forward",
    "forward_loop",
    "generate",
    "init_params",
    "layer_shapes",
    "load_checkpoint",
    "param_count",
    "param_shapes",
    "param_specs",
    "preset",
    "run_layers",
    "save_checkpoint",
    "shard_params",
    "stack",
    "unstack",
]
