"""The decoder's layer stack in Flax NNX, on the weights and the block math of `scanlab.decoder`.

NNX's scan-over-layers recipe: create the L blocks at once under `nnx.split_rngs` + `nnx.vmap`
(every layer draws its own weights and gets its own dropout stream, each leaf gaining a leading
L axis), then apply them with `nnx.scan(in_axes=(0, nnx.Carry, None), out_axes=nnx.Carry)`.
MaxText applies its stack the other way: `nnx.split` the stacked module into a graph and a
state, `jax.lax.scan` over the state merging one layer per step, and write the layers' updated
state (their RNG counts) back with `nnx.update` — forget the write-back and dropout silently
repeats its masks (the pitfall in `scanlab.pitfalls`). `NNXDecoder(layer_scan=...)` runs either.

Each block calls `scanlab.decoder.decoder_block` on its parameters, so the math is written once;
`NNXDecoder.from_params` / `to_params` convert from and to `DecoderParams`.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from scanlab.decoder.config import DecoderConfig, check_config
from scanlab.decoder.layers import LayerKind, decoder_block, layer_kinds, self_attend
from scanlab.decoder.model import causal_mask, check_mask, check_tokens, embed, unembed
from scanlab.decoder.params import DecoderBlock, DecoderParams, outside_layers
from scanlab.decoder.spec import check_dense, check_params, init_layer, init_outside_layers
from scanlab.errors import ArgumentError
from scanlab.nnx.recurrence import check_rngs


def _values(tree):
    """A tree of `nnx.Variable`s -> the same tree of their arrays."""
    return jax.tree.map(lambda v: v[...], tree, is_leaf=lambda v: isinstance(v, nnx.Variable))


def _params(tree):
    """A tree of arrays (None kept) -> the same tree of `nnx.Param`s."""
    return jax.tree.map(nnx.Param, tree)


class NNXBlock(nnx.Module):
    """One decoder layer: its `DecoderBlock` leaves as `nnx.Param`s and its own dropout stream.

    Dropout (config.dropout_rate > 0) draws a fresh key from the stream on every call unless the
    module is in eval mode (`model.eval()` sets `deterministic`).
    """

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs, block: DecoderBlock | None = None):
        self.config = config
        self.block = nnx.data(
            _params(init_layer(config, rngs.params()) if block is None else block)
        )
        # A stream only where dropout can draw from it (the "dropout" stream, else "default").
        self.dropout: Any = rngs["dropout"].fork() if config.dropout_rate > 0 else nnx.data(None)
        self.deterministic = False

    def __call__(
        self, seq_BxSxD: jax.Array, attn_mask_BxSxS: jax.Array, kind: LayerKind
    ) -> jax.Array:
        """(B, S, D) residual stream -> (B, S, D); `kind` is this layer's window and rotary
        base (scanned beside the layers, as `decoder.run_layers` does)."""
        use_dropout = not self.deterministic and self.config.dropout_rate > 0
        key = self.dropout() if use_dropout else None
        positions_BxS = jnp.broadcast_to(jnp.arange(seq_BxSxD.shape[1]), seq_BxSxD.shape[:2])
        seq_BxSxD, _ = decoder_block(
            _values(self.block),
            seq_BxSxD,
            self_attend(attn_mask_BxSxS, positions_BxS, kind, self.config),
            key,
            config=self.config,
            positions_BxS=positions_BxS,
            kind=kind,
        )
        return seq_BxSxD


def make_stack(
    config: DecoderConfig, rngs: nnx.Rngs, blocks: DecoderBlock | None = None
) -> NNXBlock:
    """L blocks as one `NNXBlock` whose every state leaf has a leading L axis.

    `rngs` is split L ways and each layer is created under `nnx.vmap`: its own weights (unless
    `blocks`, stacked (L, ...) arrays, are given) and its own dropout stream.
    """

    @nnx.split_rngs(splits=config.n_layers)
    @nnx.vmap(in_axes=(0, 0), out_axes=0)
    def create(rngs, block):
        return NNXBlock(config, rngs=rngs, block=block)

    return create(rngs, blocks)


def scan_layers(
    stack: NNXBlock, seq_BxSxD: jax.Array, attn_mask_BxSxS: jax.Array, kinds: LayerKind
) -> jax.Array:
    """All layers by `nnx.scan`: each step gets one layer and its kind; RNG counts are carried
    out for us."""

    @nnx.scan(in_axes=(0, nnx.Carry, None, 0), out_axes=nnx.Carry)
    def step(block, seq, mask, kind):
        return block(seq, mask, kind)

    return step(stack, seq_BxSxD, attn_mask_BxSxS, kinds)


def split_scan_merge_layers(
    stack: NNXBlock, seq_BxSxD: jax.Array, attn_mask_BxSxS: jax.Array, kinds: LayerKind
) -> jax.Array:
    """All layers by split → `jax.lax.scan` → merge (MaxText's form), writing state back."""
    graphdef, state = nnx.split(stack)

    def step(seq, layer_inputs):
        layer_state, kind = layer_inputs
        block = nnx.merge(graphdef, layer_state)
        seq = block(seq, attn_mask_BxSxS, kind)
        return seq, nnx.state(block)  # the layer's advanced RNG count leaves as an output

    seq_BxSxD, new_state = jax.lax.scan(step, seq_BxSxD, (state, kinds))
    nnx.update(stack, new_state)
    return seq_BxSxD


LAYER_SCANS = {"nnx.scan": scan_layers, "split-lax.scan-merge": split_scan_merge_layers}


class NNXDecoder(nnx.Module):
    """The decoder of `scanlab.decoder` (any family) as an NNX module with a scanned layer stack.

    Args:
      config: the DecoderConfig.
      rngs: `nnx.Rngs` with a "params" stream (weights) and, when config.dropout_rate > 0, a
        "dropout" (or "default") stream.
      layer_scan: "nnx.scan" or "split-lax.scan-merge" (see `LAYER_SCANS`).
      params: optional `DecoderParams` to take the weights from instead of drawing them.
    """

    def __init__(
        self,
        config: DecoderConfig,
        *,
        rngs: nnx.Rngs,
        layer_scan: Literal["nnx.scan", "split-lax.scan-merge"] = "nnx.scan",
        params: DecoderParams | None = None,
    ):
        check_config(config)
        check_rngs(rngs)
        if layer_scan not in LAYER_SCANS:
            raise ArgumentError(
                f"layer_scan must be one of {list(LAYER_SCANS)}, got {layer_scan!r}"
            )
        if params is not None:
            check_params(params, config)
            check_dense(params, "NNXDecoder")
        outside = init_outside_layers(config, rngs.params()) if params is None else params
        self.config = config
        self.layer_scan = layer_scan
        self.embed = nnx.Param(outside.embed)
        self.final_norm = nnx.Param(outside.final_norm)
        self.lm_head = None if outside.lm_head is None else nnx.Param(outside.lm_head)
        self.blocks = make_stack(config, rngs, None if params is None else params.blocks)

    @classmethod
    def from_params(
        cls, params: DecoderParams, config: DecoderConfig, rngs: nnx.Rngs | None = None, **kwargs
    ) -> NNXDecoder:
        """The NNX decoder holding these weights (rngs: dropout streams; default Rngs(0))."""
        return cls(config, rngs=rngs or nnx.Rngs(0), params=params, **kwargs)

    def to_params(self) -> DecoderParams:
        """The weights as the functional `DecoderParams` (stacked blocks)."""
        return DecoderParams(
            embed=self.embed[...],
            blocks=_values(self.blocks.block),
            final_norm=self.final_norm[...],
            lm_head=None if self.lm_head is None else self.lm_head[...],
        )

    def __call__(self, tokens_BxS: jax.Array, attn_mask_BxS: jax.Array | None = None) -> jax.Array:
        """Logits (B, S, V) float32 for token ids (B, S), checked as `decoder.forward` checks
        them (ids in [0, V), 1 <= S <= max_seq_len, a boolean or 0/1 mask)."""
        tokens_BxS = check_tokens("tokens", tokens_BxS, self.config)
        if attn_mask_BxS is not None:
            attn_mask_BxS = check_mask(attn_mask_BxS, tokens_BxS.shape)
        outside = outside_layers(self.to_params())  # the layers run from self.blocks
        mask = causal_mask(attn_mask_BxS, *tokens_BxS.shape)
        seq = embed(outside, tokens_BxS, self.config)
        seq = LAYER_SCANS[self.layer_scan](self.blocks, seq, mask, layer_kinds(self.config))
        return unembed(outside, seq, self.config)
