"""A whole training run inside `jax.lax.scan`: K optimizer steps per compiled call, chunked,
checkpointed with orbax and resumable."""

from scanlab.train import tasks
from scanlab.train.config import TrainConfig
from scanlab.train.evaluate import Sample, accuracy, samples
from scanlab.train.run import ChunkReport, TrainResult, load, saved_config, train
from scanlab.train.step import TrainState, init_state, train_chunk, train_loop
from scanlab.train.tasks import TASKS, Task, task_by_name

__all__ = [
    "TASKS",
    "ChunkReport",
    "Sample",
    "Task",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "accuracy",
    "init_state",
    "load",
    "samples",
    "saved_config",
    "tasks",
    "task_by_name",
    "train",
    "train_chunk",
    "train_loop",
]
