"""Where each decoder parameter lives on a ("data", "model") mesh (see `scanlab.sharding`)."""

from __future__ import annotations

import jax
from jax.sharding import Mesh, PartitionSpec

from scanlab import sharding
from scanlab.decoder.config import DecoderConfig
from scanlab.decoder.params import Attention, DecoderBlock, DecoderParams


def param_specs(config: DecoderConfig, mesh: Mesh) -> DecoderParams:
    """PartitionSpecs for DecoderParams: D over "data" (FSDP), kv heads and F over "model" (TP).

    Raises ValueError when the mesh does not divide D, the kv heads or F.
    """
    sharding.check_divisible("d_model", config.d_model, mesh, sharding.DATA_AXIS)
    sharding.check_divisible("n_kv_heads", config.n_kv_heads, mesh, sharding.MODEL_AXIS)
    sharding.check_divisible("mlp_dim", config.mlp_dim, mesh, sharding.MODEL_AXIS)
    d, m, replicated = sharding.DATA_AXIS, sharding.MODEL_AXIS, PartitionSpec()
    return DecoderParams(
        embed=PartitionSpec(None, d),
        blocks=DecoderBlock(
            input_norm=replicated,
            attention=Attention(
                q_proj=PartitionSpec(None, d, None, m, None),
                k_proj=PartitionSpec(None, d, m, None),
                v_proj=PartitionSpec(None, d, m, None),
                out_proj=PartitionSpec(None, None, m, None, d),
            ),
            post_attn_norm=replicated,
            gate_proj=PartitionSpec(None, d, m),
            up_proj=PartitionSpec(None, d, m),
            down_proj=PartitionSpec(None, m, d),
        ),
        final_norm=replicated,
        lm_head=None if config.tie_embeddings else PartitionSpec(d, None),
    )


def shard_params(params: DecoderParams, config: DecoderConfig, mesh: Mesh) -> DecoderParams:
    """Places DecoderParams on the mesh by `param_specs`."""
    return jax.device_put(params, sharding.named(param_specs(config, mesh), mesh))
