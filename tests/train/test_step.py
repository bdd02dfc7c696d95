import chex
import jax
import numpy as np

from scanlab.train import TrainConfig, init_state, train_chunk, train_loop

CONFIG = TrainConfig(steps=40, chunk_steps=20, warmup_steps=5, n_layers=1, d_model=32, mlp_dim=64)


def test_scanned_chunk_equals_python_loop_of_jitted_steps():
    scanned, scanned_losses = train_chunk(init_state(CONFIG), config=CONFIG, steps=20)
    looped, looped_losses = train_loop(init_state(CONFIG), config=CONFIG, steps=20)
    # One step body compiled inside a while loop vs alone: XLA may fuse differently, so the
    # float32 rounding (not the math) can differ; after 20 AdamW steps it stays below this.
    np.testing.assert_allclose(scanned_losses, looped_losses, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(scanned.params, looped.params, rtol=1e-4, atol=1e-5)
    assert int(scanned.step) == int(looped.step) == 20
    np.testing.assert_array_equal(scanned.key, looped.key)


def test_chunks_compose():
    """Two chunks of 10 steps are the same computation as one chunk of 20."""
    one, _ = train_chunk(init_state(CONFIG), config=CONFIG, steps=20)
    two, _ = train_chunk(init_state(CONFIG), config=CONFIG, steps=10)
    two, _ = train_chunk(two, config=CONFIG, steps=10)
    chex.assert_trees_all_close(one.params, two.params, rtol=1e-5, atol=1e-6)


def test_loss_goes_down():
    _, losses = train_chunk(init_state(CONFIG), config=CONFIG, steps=40)
    assert float(np.mean(losses[-5:])) < 0.8 * float(np.mean(losses[:5]))


def test_state_is_the_full_pytree():
    state = init_state(CONFIG)
    leaves = jax.tree.leaves(state)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)
    assert int(state.step) == 0
