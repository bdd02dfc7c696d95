"""The server tests' models (a Llama, and a Gemma 3 whose window is shorter than the slots'
context, so its sliding layers decode from ring caches), prompts and greedy answers alone."""

import jax
import numpy as np
import pytest
from tests.serve.alone import CONFIGS, LONGEST, PROMPT_LENGTHS, alone
from tests.tiny import tiny_tokenizer

from scanlab.decoder import Model, init_params


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request) -> Model:
    config = CONFIGS[request.param]
    return Model(config, init_params(config, jax.random.PRNGKey(0)), tiny_tokenizer())


@pytest.fixture(scope="module")
def prompts(model) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(3, model.config.vocab_size, n).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def greedy_alone(model, prompts) -> list[list[int]]:
    """Each prompt's greedy answer of LONGEST tokens (a shorter budget's is its beginning)."""
    return [alone(model, prompt, LONGEST) for prompt in prompts]
