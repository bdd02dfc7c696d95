"""DecoderConfig: the static shape and settings of a decoder of one family, and named presets."""

from __future__ import annotations

import dataclasses

from scanlab import checks
from scanlab.decoder.families import FAMILIES, SLIDING, Family
from scanlab.decoder.rope import RopeScaling
from scanlab.errors import ArgumentError, ArgumentTypeError

DTYPES = ("float32", "bfloat16")  # what dense parameters are loaded in
# How a model's weights are held: int8 blocks (`scanlab.decoder.quant`), or dense in a DTYPE.
WEIGHTS = ("quantized", *DTYPES)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """Hashable, so it can be a static argument of `jax.jit`.

    Attributes:
      vocab_size: V, tokens in the vocabulary.
      n_layers: L, decoder blocks, stacked on the leading axis of every block parameter.
      d_model: D, the residual stream width.
      n_heads: query heads; a multiple of n_kv_heads (R = n_heads // n_kv_heads per kv head).
      n_kv_heads: K, key/value heads (K < n_heads is grouped-query attention).
      head_dim: Dh, width of each head.
      mlp_dim: F, hidden width of the gated MLP.
      rope_theta: base of the rotary embedding frequencies (of the full attention layers).
      norm_eps: epsilon inside RMSNorm.
      max_seq_len: longest sequence (prompt + generated tokens) the model is used for.
      tie_embeddings: the output head reuses the token embedding (no separate lm_head).
      dropout_rate: residual dropout, applied only when a PRNG key is passed to forward.
      family: a name in `scanlab.decoder.families.FAMILIES` ("llama", "qwen2", "gemma3"): the
        block's features, parameters and layer pattern.
      sliding_window: W, keys a sliding-window layer attends (the query's own and W - 1 before
        it); required by families with such layers, None otherwise.
      local_rope_theta: the rotary base of the sliding-window layers.
      query_pre_attn_scalar: queries are scaled by its -1/2 power; default head_dim.
      rope_scaling: how the full attention layers' rotary frequencies are scaled
        (`scanlab.decoder.rope`), or None.
      local_rope_scaling: the sliding-window layers' scaling, or None.
      no_rope_layers: indices of the layers that rotate nothing (SmolLM3's every fourth).
    """

    vocab_size: int
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    dropout_rate: float = 0.0
    family: str = "llama"
    sliding_window: int | None = None
    local_rope_theta: float = 10_000.0
    query_pre_attn_scalar: float | None = None
    rope_scaling: RopeScaling | None = None
    local_rope_scaling: RopeScaling | None = None
    no_rope_layers: tuple[int, ...] = ()

    def __post_init__(self):
        for name in (
            "vocab_size",
            "n_layers",
            "d_model",
            "n_heads",
            "n_kv_heads",
            "head_dim",
            "mlp_dim",
            "max_seq_len",
        ):
            checks.static_int(name, getattr(self, name), minimum=1)
        if self.n_heads % self.n_kv_heads:
            raise ArgumentError(
                f"n_heads must be a multiple of n_kv_heads, got n_heads={self.n_heads}, "
                f"n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ArgumentError(
                f"head_dim must be even (rotary embeddings rotate pairs), got {self.head_dim}"
            )
        for name in ("rope_theta", "norm_eps", "local_rope_theta"):
            if not getattr(self, name) > 0:
                raise ArgumentError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.query_pre_attn_scalar is not None and not self.query_pre_attn_scalar > 0:
            raise ArgumentError(
                f"query_pre_attn_scalar must be > 0 or None, got {self.query_pre_attn_scalar}"
            )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ArgumentError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if self.family not in FAMILIES:
            raise ArgumentError(f"family must be one of {list(FAMILIES)}, got {self.family!r}")
        for name in ("rope_scaling", "local_rope_scaling"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, RopeScaling):
                raise ArgumentTypeError(
                    f"{name} must be a RopeScaling or None, got {type(value).__name__}"
                )
            pairs = len(value.frequency_factors) if value is not None else 0
            if pairs not in (0, self.head_dim // 2):
                raise ArgumentError(
                    f"{name}.frequency_factors must hold one factor per rotary pair "
                    f"({self.head_dim // 2} for head_dim {self.head_dim}), got {pairs}"
                )
        if not isinstance(self.no_rope_layers, tuple) or not all(
            isinstance(i, int) and 0 <= i < self.n_layers for i in self.no_rope_layers
        ):
            raise ArgumentError(
                f"no_rope_layers must be a tuple of layer indices in [0, {self.n_layers}), got "
                f"{self.no_rope_layers!r}"
            )
        self._check_window()

    def _check_window(self):
        if SLIDING not in self.layer_types:
            if self.sliding_window is not None:
                raise ArgumentError(
                    f"sliding_window must be None: family {self.family!r} with "
                    f"n_layers={self.n_layers} has no sliding-window layers, got "
                    f"{self.sliding_window}"
                )
            return
        if self.sliding_window is None:
            raise ArgumentError(
                f"sliding_window must be set: family {self.family!r} has sliding-window layers"
            )
        checks.static_int("sliding_window", self.sliding_window, minimum=1)
        if self.sliding_window > self.max_seq_len:
            raise ArgumentError(
                f"sliding_window must be <= max_seq_len={self.max_seq_len}, got "
                f"{self.sliding_window}"
            )

    @property
    def features(self) -> Family:
        """The family's declaration: its block features and parameter leaves."""
        return FAMILIES[self.family]

    @property
    def layer_types(self) -> tuple[str, ...]:
        """Each layer's kind (families.SLIDING or FULL): the family's pattern, repeated."""
        pattern = self.features.layer_pattern
        return tuple(pattern[i % len(pattern)] for i in range(self.n_layers))

    @property
    def query_scale(self) -> float:
        """What the queries are multiplied by before the scores: query_pre_attn_scalar^-1/2."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def n_rep(self) -> int:
        """R: query heads sharing each key/value head."""
        return self.n_heads // self.n_kv_heads

    def replace(self, **changes) -> DecoderConfig:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, DecoderConfig] = {
    "tiny": DecoderConfig(
        vocab_size=64,
        n_layers=4,
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        mlp_dim=128,
        max_seq_len=128,
    ),
    # The blog's shapes: 32 layers of width 4096, 32 heads of 128, MLP 11008.
    "llama2-7b": DecoderConfig(
        vocab_size=32_000,
        n_layers=32,
        d_model=4096,
        n_heads=32,
        n_kv_heads=32,
        head_dim=128,
        mlp_dim=11_008,
        max_seq_len=4096,
        norm_eps=1e-5,
    ),
    "llama3-8b": DecoderConfig(
        vocab_size=128_256,
        n_layers=32,
        d_model=4096,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        mlp_dim=14_336,
        rope_theta=500_000.0,
        max_seq_len=8192,
        norm_eps=1e-5,
    ),
}


def check_weights(weights: str | None) -> str | None:
    """None (the source's default) or one of WEIGHTS."""
    if weights is not None and weights not in WEIGHTS:
        raise ArgumentError(
            f"{checks.shown('weights')} must be one of {list(WEIGHTS)}, got {weights!r}"
        )
    return weights


def check_config(config, swapped=None, order: str = "params, tokens, config (as in forward)"):
    """`config` is a DecoderConfig; a DecoderConfig passed where `swapped` goes names the order.

    Args:
      swapped: (name, value) of the argument a caller may have swapped with config, or None.
    """
    if swapped is not None and isinstance(swapped[1], DecoderConfig):
        raise ArgumentTypeError(f"{swapped[0]} is a DecoderConfig: the order is {order}")
    if not isinstance(config, DecoderConfig):
        raise ArgumentTypeError(f"config must be a DecoderConfig, got {type(config).__name__}")


def preset(name: str) -> DecoderConfig:
    """The named preset: one of PRESETS' keys."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ArgumentError(
            f"{checks.shown('preset')} must be one of {sorted(PRESETS)}, got {name!r}"
        ) from None
