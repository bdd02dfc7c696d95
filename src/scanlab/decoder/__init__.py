"""A Llama-architecture decoder whose layers run by `jax.lax.scan` over stacked parameters."""

from scanlab.decoder.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from scanlab.decoder.config import PRESETS, DecoderConfig, preset
from scanlab.decoder.generate import Generation, generate
from scanlab.decoder.layers import decoder_block
from scanlab.decoder.model import forward, forward_loop
from scanlab.decoder.params import (
    Attention,
    DecoderBlock,
    DecoderParams,
    init_params,
    param_count,
    stack,
    unstack,
)

__all__ = [
    "PRESETS",
    "Attention",
    "CheckpointError",
    "DecoderBlock",
    "DecoderConfig",
    "DecoderParams",
    "Generation",
    "decoder_block",
    "forward",
    "forward_loop",
    "generate",
    "init_params",
    "load_checkpoint",
    "param_count",
    "preset",
    "save_checkpoint",
    "stack",
    "unstack",
]
