"""Held-out evaluation: the model generates each target from its prompt alone (greedy)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from scanlab.decoder import DecoderParams, generate
from scanlab.train.config import TrainConfig
from scanlab.train.tasks import task_by_name

# Held-out examples come from a stream the training batches never use.
EVAL_STREAM = 1


def eval_tokens(config: TrainConfig, n: int) -> jax.Array:
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), EVAL_STREAM)
    return task_by_name(config.task).sample(key, n)


def predict(params: DecoderParams, config: TrainConfig, tokens_BxS: jax.Array) -> jax.Array:
    """(B, P + T) examples -> (B, T) greedy predictions from the prompts."""
    task = task_by_name(config.task)
    prompts = tokens_BxS[:, : task.prompt_length]
    return generate(params, prompts, config.model, task.target_length).tokens[
        :, task.prompt_length :
    ]


def accuracy(params: DecoderParams, config: TrainConfig, n: int = 512) -> float:
    """Exact-match accuracy on n held-out examples: every target token right."""
    tokens = eval_tokens(config, n)
    task = task_by_name(config.task)
    correct = jnp.all(predict(params, config, tokens) == tokens[:, task.prompt_length :], axis=1)
    return float(correct.mean())


class Sample(NamedTuple):
    question: str
    expected: str
    predicted: str


def samples(params: DecoderParams, config: TrainConfig, n: int = 5) -> list[Sample]:
    """A few held-out examples with the model's answers, as text."""
    task = task_by_name(config.task)
    tokens = np.asarray(eval_tokens(config, n))
    predicted = np.asarray(predict(params, config, jnp.asarray(tokens)))
    result = []
    for row, guess in zip(tokens, predicted, strict=True):
        question, expected = task.describe(row)
        _, answer = task.describe(np.concatenate([row[: task.prompt_length], guess]))
        result.append(Sample(question, expected, answer))
    return result


class Evaluation(NamedTuple):
    accuracy: float  # exact match on `accuracy`'s held-out examples
    samples: list[Sample]


def evaluate(params: DecoderParams, config: TrainConfig, n_samples: int = 5) -> Evaluation:
    """Held-out accuracy and a few answers: what the CLI and the tour show after training."""
    return Evaluation(accuracy(params, config), samples(params, config, n_samples))
