"""LoRA adapters for a pretrained decoder: declared from the family's leaves, placed through the
projection seam (`scanlab.decoder.lora.Adapted`), merged back into dense weights.

Adapters are a dict `{target: {"a": ([L,] inputs..., r), "b": ([L,] r, outputs...)}}` keyed by
PEFT's projection names, every leaf with the layer axis: a pytree the optimizer, orbax and the
layer scan take as they are. They start as PEFT starts them: `a` uniform in ±1/sqrt(inputs)
(`kaiming_uniform(a=sqrt(5))`), `b` zeros, so the adapted model equals the base at step 0.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from scanlab import checks
from scanlab.decoder import weights
from scanlab.decoder.config import DecoderConfig
from scanlab.decoder.families import Leaf
from scanlab.decoder.lora import Adapted
from scanlab.decoder.params import DecoderBlock, DecoderParams
from scanlab.decoder.spec import sizes
from scanlab.errors import ArgumentError, ArgumentTypeError

# PEFT's (transformers') projection names -> where the weight sits in a DecoderBlock.
TARGETS: dict[str, tuple[str, ...]] = {
    "q_proj": ("attention", "q_proj"),
    "k_proj": ("attention", "k_proj"),
    "v_proj": ("attention", "v_proj"),
    "o_proj": ("attention", "out_proj"),
    "gate_proj": ("gate_proj",),
    "up_proj": ("up_proj",),
    "down_proj": ("down_proj",),
}

Adapters = dict[str, dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """Attributes:
    rank: r, the update's inner width.
    alpha: the update is scaled by alpha / r (PEFT's `lora_alpha`).
    dropout: dropout rate on each adapted projection's input, in training (`lora_dropout`).
    targets: the adapted projections, PEFT's names (`TARGETS`); all seven by default.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = tuple(TARGETS)

    def __post_init__(self):
        checks.static_int("lora_rank", self.rank, minimum=1)
        checks.finite_number("lora_alpha", self.alpha, above=0.0)
        checks.finite_number("lora_dropout", self.dropout, minimum=0.0)
        if self.dropout >= 1.0:
            raise ArgumentError(f"{checks.shown('lora_dropout')} must be < 1, got {self.dropout}")
        if isinstance(self.targets, str):  # tuple("q_proj") would be its letters
            raise ArgumentTypeError(
                f"{checks.shown('lora_targets')} must be a sequence of names from "
                f"{list(TARGETS)}, got the string {self.targets!r}: pass ({self.targets!r},)"
            )
        targets = tuple(self.targets)
        unknown = [name for name in targets if name not in TARGETS]
        if not targets or unknown or len(set(targets)) != len(targets):
            raise ArgumentError(
                f"{checks.shown('lora_targets')} must be distinct names from {list(TARGETS)}, "
                f"got {list(targets)}"
            )
        object.__setattr__(self, "targets", targets)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def _at(tree, path: tuple[str, ...]):
    for name in path:
        tree = getattr(tree, name)
    return tree


def _replaced(tree, path: tuple[str, ...], value):
    """The NamedTuple `tree` with the node at `path` replaced by `value`."""
    if len(path) == 1:
        return tree._replace(**{path[0]: value})
    return tree._replace(**{path[0]: _replaced(getattr(tree, path[0]), path[1:], value)})


def adapter_shapes(config: DecoderConfig, lora: LoraConfig) -> dict[str, dict[str, tuple]]:
    """{target: {"a": (L, inputs..., r), "b": (L, r, outputs...)}} from the leaves' letters."""
    size = sizes(config)
    shapes = {}
    for target in lora.targets:
        leaf: Leaf = _at(config.features.leaves.blocks, TARGETS[target])
        letters = leaf.shape.split()
        inputs = len(leaf.fan_in.split())  # a weight's input letters lead its shape
        in_shape = tuple(size[letter] for letter in letters[:inputs])
        out_shape = tuple(size[letter] for letter in letters[inputs:])
        layers = config.n_layers
        shapes[target] = {"a": (layers, *in_shape, lora.rank), "b": (layers, lora.rank, *out_shape)}
    return shapes


def check_rank(config: DecoderConfig, lora: LoraConfig) -> None:
    """A rank at most each adapted projection's narrower side: beyond it the update is full
    rank already, and the adapters only cost memory."""
    for target, shape in adapter_shapes(config, lora).items():
        narrower = min(math.prod(shape["a"][1:-1]), math.prod(shape["b"][2:]))
        if lora.rank > narrower:
            raise ArgumentError(
                f"{checks.shown('lora_rank')} must be <= {narrower} for this model ({target} "
                f"is {narrower} wide: a higher rank adds nothing), got {lora.rank}"
            )


def adapter_count(config: DecoderConfig, lora: LoraConfig) -> int:
    """How many numbers the adapters hold."""
    shapes = adapter_shapes(config, lora).values()
    return sum(math.prod(pair["a"]) + math.prod(pair["b"]) for pair in shapes)


def init_adapters(config: DecoderConfig, lora: LoraConfig, key: jax.Array) -> Adapters:
    """Fresh adapters, float32: `a` uniform in ±1/sqrt(inputs), `b` zeros (PEFT's start)."""
    adapters = {}
    shapes = adapter_shapes(config, lora)
    keys = jax.random.split(key, len(lora.targets))
    for target, target_key in zip(lora.targets, keys, strict=True):
        a_shape, b_shape = shapes[target]["a"], shapes[target]["b"]
        bound = 1.0 / math.sqrt(math.prod(a_shape[1:-1]))
        adapters[target] = {
            "a": jax.random.uniform(target_key, a_shape, jnp.float32, -bound, bound),
            "b": jnp.zeros(b_shape, jnp.float32),
        }
    return adapters


def adapt(
    params: DecoderParams, adapters: Adapters, lora: LoraConfig, key: jax.Array | None = None
) -> DecoderParams:
    """The params with each target projection `Adapted`: its base frozen as it is (dense or
    quantized), its update from `adapters`. `key` draws the adapters' dropout (training); None:
    no dropout."""
    blocks: DecoderBlock = params.blocks
    for i, target in enumerate(lora.targets):
        path = TARGETS[target]
        pair = adapters[target]
        keys = None
        if key is not None and lora.dropout > 0.0:
            layers = pair["a"].shape[0]
            keys = jax.random.key_data(jax.random.split(jax.random.fold_in(key, i), layers))
        adapted = Adapted(_at(blocks, path), pair["a"], pair["b"], keys, lora.scaling, lora.dropout)
        blocks = _replaced(blocks, path, adapted)
    return params._replace(blocks=blocks)


def merged(params: DecoderParams) -> DecoderParams:
    """Dense float32 params with each `Adapted` weight's update added into it: W + scaling A B.

    Quantized weights are dequantized (a merged weight is no longer on their grid).
    """
    return jax.tree.map(
        lambda w: weights.as_dense(w, jnp.float32) if weights.is_form(w) else w,
        params,
        is_leaf=weights.is_form,
    )
