"""Held-out evaluation: the model generates each target from its prompt alone (greedy)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from scanlab import checks
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


ACCURACY_EXAMPLES = 512


def accuracy(params: DecoderParams, config: TrainConfig, n: int = ACCURACY_EXAMPLES) -> float:
    """Exact-match accuracy on n held-out examples: every target token right."""
    tokens = eval_tokens(config, n)
    return _exact_match(config, tokens, predict(params, config, tokens))


def _exact_match(config: TrainConfig, tokens: jax.Array, predicted: jax.Array) -> float:
    targets = tokens[:, task_by_name(config.task).prompt_length :]
    return float(jnp.all(predicted == targets, axis=1).mean())


class Sample(NamedTuple):
    question: str
    expected: str
    predicted: str


def samples(params: DecoderParams, config: TrainConfig, n: int = 5) -> list[Sample]:
    """A few held-out examples with the model's answers, as text."""
    tokens = eval_tokens(config, n)
    return _as_samples(config, tokens, predict(params, config, tokens))


def _as_samples(config: TrainConfig, tokens: jax.Array, predicted: jax.Array) -> list[Sample]:
    task = task_by_name(config.task)
    result = []
    for row, guess in zip(np.asarray(tokens), np.asarray(predicted), strict=True):
        question, expected = task.describe(row)
        _, answer = task.describe(np.concatenate([row[: task.prompt_length], guess]))
        result.append(Sample(question, expected, answer))
    return result


class Evaluation(NamedTuple):
    accuracy: float  # exact match on ACCURACY_EXAMPLES held-out examples
    samples: list[Sample]  # the first of those examples, with the model's answers


def evaluate(params: DecoderParams, config: TrainConfig, n_samples: int = 5) -> Evaluation:
    """Held-out accuracy and a few answers: what the CLI and the tour show after training.

    One greedy generation over the held-out examples serves both (one compiled program);
    `n_samples` of them are shown, at most `ACCURACY_EXAMPLES`.
    """
    checks.static_int("n_samples", n_samples, minimum=1, maximum=ACCURACY_EXAMPLES)
    tokens = eval_tokens(config, ACCURACY_EXAMPLES)
    predicted = predict(params, config, tokens)
    return Evaluation(
        _exact_match(config, tokens[:ACCURACY_EXAMPLES], predicted[:ACCURACY_EXAMPLES]),
        _as_samples(config, tokens[:n_samples], predicted[:n_samples]),
    )
