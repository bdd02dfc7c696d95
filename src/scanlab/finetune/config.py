"""FinetuneConfig: everything that decides a fine-tuning run's numbers, and so must match on
resume."""

from __future__ import annotations

import dataclasses

from scanlab import checks
from scanlab.decoder.stack import REMAT
from scanlab.errors import ArgumentError
from scanlab.finetune.adapters import LoraConfig
from scanlab.train.config import check_run


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """Attributes:
    lora: the adapters to train (the base weights frozen); None trains every weight.
    steps: total optimizer steps; the learning-rate schedule spans them.
    chunk_steps: K, steps per scanned (compiled) call; the progress and checkpoint granularity.
    batch_size: examples per step, drawn on the device without replacement from the step's key.
    accumulate: the batch runs as this many micro-batches of batch_size / accumulate, their
      gradients summed, when a whole batch does not fit in memory.
    seq_len: the rows' length in tokens; None: the longest example's, rounded up to 16.
    learning_rate: peak AdamW rate, reached after `warmup_steps`, then cosine decay to 10%.
    weight_decay, clip_norm: AdamW decay and global gradient-norm clipping.
    eval_fraction: the share of examples held out for the evaluation loss (at most
      `data.MAX_HELD_OUT` of them), measured after every chunk.
    remat: what the backward pass recomputes over the layers, a name in `REMAT`.
    weights: the frozen base's form with LoRA: "quantized" (int8 blocks, QLoRA-style) or
      "float32"; full fine-tuning trains float32 weights.
    seed: adapters' initialisation, batches, dropout and the held-out split derive from it.
    """

    lora: LoraConfig | None = dataclasses.field(default_factory=LoraConfig)
    steps: int = 100
    chunk_steps: int = 10
    batch_size: int = 8
    accumulate: int = 1
    seq_len: int | None = None
    learning_rate: float = 2e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    eval_fraction: float = 0.1
    remat: str = "full"
    weights: str = "quantized"
    seed: int = 0

    def __post_init__(self):
        if self.lora is not None:
            checks.instance("lora", self.lora, LoraConfig, "e.g. LoraConfig(rank=4)")
        check_run(self)
        checks.static_int("accumulate", self.accumulate, minimum=1)
        if self.batch_size % self.accumulate:
            raise ArgumentError(
                f"{checks.shown('accumulate')} must divide {checks.shown('batch_size')}="
                f"{self.batch_size}, got {self.accumulate}"
            )
        if self.seq_len is not None:
            checks.static_int("seq_len", self.seq_len, minimum=2)
        checks.finite_number("eval_fraction", self.eval_fraction, minimum=0.0)
        if self.eval_fraction >= 1.0:
            raise ArgumentError(
                f"{checks.shown('eval_fraction')} must be < 1, got {self.eval_fraction}"
            )
        if self.remat not in REMAT:
            raise ArgumentError(
                f"{checks.shown('remat')} must be one of {list(REMAT)}, got {self.remat!r}"
            )
        if self.weights not in ("quantized", "float32"):
            raise ArgumentError(
                f"{checks.shown('weights')} must be 'quantized' or 'float32', got {self.weights!r}"
            )
        if self.lora is None and self.weights != "float32":
            raise ArgumentError(
                f"full fine-tuning trains float32 weights: pass {checks.shown('weights')}="
                f"'float32' (got {self.weights!r}), or train LoRA adapters"
            )

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.accumulate

    def replace(self, **changes) -> FinetuneConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-ready: the LoRA settings as a dict (their targets a list), or None."""
        settings = dataclasses.asdict(self)
        if self.lora is not None:
            settings["lora"]["targets"] = list(self.lora.targets)
        return settings

    @classmethod
    def from_dict(cls, settings: dict) -> FinetuneConfig:
        lora = settings.get("lora")
        return cls(**{**settings, "lora": None if lora is None else LoraConfig(**lora)})
