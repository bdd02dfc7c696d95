"""TrainConfig: everything that decides a training run's numbers, and so must match on resume."""

from __future__ import annotations

import dataclasses

from scanlab import checks
from scanlab.decoder import DecoderConfig
from scanlab.errors import ArgumentError
from scanlab.train.tasks import task_by_name


def check_run(config) -> None:
    """The settings every chunked run has (a TrainConfig's, a FinetuneConfig's): the step counts,
    the batch, the schedule and AdamW's, the seed."""
    checks.static_int("steps", config.steps, minimum=1)
    checks.static_int("chunk_steps", config.chunk_steps, minimum=1)
    checks.static_int("batch_size", config.batch_size, minimum=1)
    checks.static_int("warmup_steps", config.warmup_steps, minimum=0)
    if config.warmup_steps >= config.steps:
        raise ArgumentError(
            f"{checks.shown('warmup_steps')} must be < {checks.shown('steps')}={config.steps}, "
            f"got {config.warmup_steps}"
        )
    checks.seed_key(config.seed)
    checks.finite_number("learning_rate", config.learning_rate, above=0.0)
    checks.finite_number("weight_decay", config.weight_decay, minimum=0.0)
    checks.finite_number("clip_norm", config.clip_norm, above=0.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Attributes:
    task: a name from `scanlab.train.TASKS`.
    steps: total optimizer steps; the learning-rate schedule spans them.
    chunk_steps: K, steps per scanned (compiled) call; the progress and checkpoint granularity.
    batch_size: examples per step, drawn on the device from the step's key.
    learning_rate: peak AdamW rate, reached after `warmup_steps`, then cosine decay to 10%.
    weight_decay, clip_norm: AdamW decay and global gradient-norm clipping.
    n_layers, d_model, n_heads, n_kv_heads, mlp_dim: the decoder's shape.
    seed: the run's PRNG seed: parameters, batches and evaluation all derive from it.
    """

    task: str = "reverse"
    steps: int = 600
    chunk_steps: int = 100
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2
    mlp_dim: int = 192
    seed: int = 0

    def __post_init__(self):
        task_by_name(self.task)
        check_run(self)
        if self.d_model % self.n_heads:
            raise ArgumentError(
                f"d_model must be a multiple of n_heads={self.n_heads} (head_dim = d_model / "
                f"n_heads), got {self.d_model}"
            )
        _ = self.model  # the decoder config checks itself (heads, sizes)

    @property
    def model(self) -> DecoderConfig:
        task = task_by_name(self.task)
        return DecoderConfig(
            vocab_size=task.vocab_size,
            n_layers=self.n_layers,
            d_model=self.d_model,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            head_dim=self.d_model // self.n_heads,
            mlp_dim=self.mlp_dim,
            max_seq_len=task.length,
        )

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
