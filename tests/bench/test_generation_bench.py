import jax
import numpy as np

from scanlab.bench.generation import generate_by_recomputation
from scanlab.decoder import generate, init_params, preset


def test_recomputation_peer_decodes_the_same_tokens():
    config = preset("tiny")
    params = init_params(config, jax.random.PRNGKey(0))
    prompt = jax.random.randint(jax.random.PRNGKey(1), (2, 4), 0, config.vocab_size)
    np.testing.assert_array_equal(
        generate_by_recomputation(params, prompt, config=config, max_new_tokens=6),
        generate(params, prompt, config, 6).tokens,
    )
