"""DecoderConfig: the static shape of a Llama-architecture decoder, and named presets."""

from __future__ import annotations

import dataclasses

from scanlab import checks
from scanlab.errors import ArgumentError

FAMILIES = ("llama", "qwen2")
DTYPES = ("float32", "bfloat16")  # what parameters are loaded in


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
      mlp_dim: F, hidden width of the SwiGLU MLP.
      rope_theta: base of the rotary embedding frequencies.
      norm_eps: epsilon inside RMSNorm.
      max_seq_len: longest sequence (prompt + generated tokens) the model is used for.
      tie_embeddings: the output head reuses the token embedding (no separate lm_head).
      dropout_rate: residual dropout, applied only when a PRNG key is passed to forward.
      family: "llama", or "qwen2" (the Llama block with biases on the q, k and v projections).
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
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ArgumentError(
                f"rope_theta and norm_eps must be > 0, got {self.rope_theta}, {self.norm_eps}"
            )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ArgumentError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if self.family not in FAMILIES:
            raise ArgumentError(f"family must be one of {list(FAMILIES)}, got {self.family!r}")

    @property
    def qkv_bias(self) -> bool:
        """Whether the q, k and v projections have biases (Qwen2)."""
        return self.family == "qwen2"

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


def check_dtype(dtype: str) -> str:
    """A parameter dtype scanlab loads models in: one of DTYPES."""
    if dtype not in DTYPES:
        raise ArgumentError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return dtype


def preset(name: str) -> DecoderConfig:
    """The named preset: one of PRESETS' keys."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ArgumentError(f"preset must be one of {sorted(PRESETS)}, got {name!r}") from None
