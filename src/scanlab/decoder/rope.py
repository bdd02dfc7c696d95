"""Rotary embeddings' frequencies: the base of each kind of layer, optionally scaled.

A layer rotates each pair i of a head's Dh/2 pairs by position × inv_freq[i], and scales the
rotation's cos and sin by an attention factor (YaRN's; 1 otherwise). Scaling stretches the
frequencies so a model reaches past the context it was pretrained on, as transformers'
`rope_parameters` declare it (`modeling_rope_utils`):

- "linear": every frequency divided by `factor` (positions interpolated);
- "llama3": Llama 3.1+'s: frequencies whose wavelength exceeds the original context / low_freq
  factor divided by `factor`, those under original / high_freq_factor kept, a smooth blend
  between;
- "yarn": YaRN's blend of interpolated and extrapolated frequencies by a linear ramp over the
  pairs between two rotation counts (`beta_fast`, `beta_slow`), and an attention factor;
- "factors": each pair's frequency divided by its own factor, as llama.cpp stores a "llama3"
  scaling (the tensor `rope_freqs.weight`: the divisors, not the settings that made them).

Computed once per config, in float64 and handed to the layers as float32 per-layer data (a
layer without rotary, SmolLM3's, has frequencies 0: the identity rotation), so layers that
differ in them stay one scan body.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from scanlab.errors import ArgumentError

SCALINGS = ("linear", "llama3", "yarn")  # transformers' names, read from its configs
FACTORS = "factors"


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """How a rotary base's frequencies are scaled (hashable: part of a static config).

    Attributes:
      kind: one of SCALINGS.
      factor: how much longer a context the scaling reaches.
      original_max_seq_len: the context the model was pretrained on ("llama3", "yarn").
      low_freq_factor, high_freq_factor: "llama3"'s wavelength bounds, as fractions of it.
      beta_fast, beta_slow: "yarn"'s rotation counts bounding its ramp.
      attention_factor: "yarn"'s scale of cos and sin; None: 0.1 ln(factor) + 1.
      truncate: "yarn" rounds its ramp's bounds to whole pairs.
      frequency_factors: "factors"' divisor of each pair's frequency, (Dh/2,).
    """

    kind: str
    factor: float
    original_max_seq_len: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    truncate: bool = True
    frequency_factors: tuple[float, ...] = ()

    def __post_init__(self):
        if self.kind not in (*SCALINGS, FACTORS):
            raise ArgumentError(
                f"rope scaling must be one of {[*SCALINGS, FACTORS]}, got {self.kind!r}"
            )
        if (self.kind == FACTORS) != bool(self.frequency_factors) or not all(
            factor > 0 for factor in self.frequency_factors
        ):
            raise ArgumentError(
                f"frequency_factors must be positive and given for {FACTORS!r} rope scaling "
                f"alone, got {self.frequency_factors} for {self.kind!r}"
            )
        if not self.factor > 0:
            raise ArgumentError(f"rope scaling factor must be > 0, got {self.factor}")
        if self.kind in ("llama3", "yarn") and not (self.original_max_seq_len or 0) > 0:
            raise ArgumentError(
                f"{self.kind} rope scaling needs original_max_seq_len > 0, got "
                f"{self.original_max_seq_len}"
            )
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ArgumentError(
                f"llama3 rope scaling needs high_freq_factor > low_freq_factor, got "
                f"{self.high_freq_factor} and {self.low_freq_factor}"
            )


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """(Dh/2,) float64: each rotary pair's angle per position."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind == "llama3":
        return _llama3(inv_freq, scaling)
    if scaling.kind == FACTORS:  # one per pair (DecoderConfig checks)
        return inv_freq / np.asarray(scaling.frequency_factors, np.float64)
    return _yarn(inv_freq, head_dim, theta, scaling)


def attention_factor(scaling: RopeScaling | None) -> float:
    """What cos and sin are multiplied by: YaRN's factor, 1 for every other rotation."""
    if scaling is None or scaling.kind != "yarn":
        return 1.0
    if scaling.attention_factor is not None:
        return scaling.attention_factor
    return 0.1 * math.log(scaling.factor) + 1.0 if scaling.factor > 1 else 1.0


def _llama3(inv_freq: np.ndarray, scaling: RopeScaling) -> np.ndarray:
    original = float(scaling.original_max_seq_len or 0)
    wavelength = 2 * math.pi / inv_freq
    scaled = np.where(
        wavelength > original / scaling.low_freq_factor, inv_freq / scaling.factor, inv_freq
    )
    smooth = (original / wavelength - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelength >= original / scaling.high_freq_factor) & (
        wavelength <= original / scaling.low_freq_factor
    )
    return np.where(medium, blended, scaled)


def _yarn(inv_freq: np.ndarray, head_dim: int, theta: float, scaling: RopeScaling) -> np.ndarray:
    original = float(scaling.original_max_seq_len or 0)

    def pair_of(rotations: float) -> float:  # the pair that turns `rotations` times in context
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_of(scaling.beta_fast), pair_of(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a ramp of one step, not a division by zero
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolated = 1 - ramp  # the share of each pair kept at its own frequency
    return inv_freq / scaling.factor * (1 - extrapolated) + inv_freq * extrapolated
