import chex
import jax
import numpy as np
from tests.tiny import TINY_TRAIN

from scanlab.train import TrainConfig, init_state, train_chunk, train_loop

CONFIG = TrainConfig(steps=40, chunk_steps=20, warmup_steps=5, **TINY_TRAIN)


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


def test_the_schedule_is_optax_s_warmup_cosine_decay():
    """The traced schedule against optax.warmup_cosine_decay_schedule, within 1e-7 relative."""
    import optax

    from scanlab.train.step import learning_rate, run_settings

    for config in (CONFIG, CONFIG.replace(warmup_steps=0, learning_rate=1e-2)):
        ours = learning_rate(run_settings(config))
        theirs = optax.warmup_cosine_decay_schedule(
            0.0, config.learning_rate, config.warmup_steps, config.steps, config.learning_rate / 10
        )
        counts = np.arange(config.steps + 5)
        with jax.numpy_dtype_promotion("standard"):  # optax's own arithmetic on an int count
            expected = [float(theirs(c)) for c in counts]
        np.testing.assert_allclose([float(ours(c)) for c in counts], expected, rtol=1e-6)


def test_runs_that_differ_in_their_settings_share_one_program():
    """Learning rate, schedule, seed and step count are traced: one trace for all; a last,
    shorter chunk padded to the chunk's length takes the steps a chunk of its own takes."""
    from tests.traces import traced

    from scanlab.train.step import _train_chunk

    others = [CONFIG.replace(learning_rate=1e-2, steps=30, warmup_steps=2, seed=3), CONFIG]
    with traced() as counts:
        for config in others:
            train_chunk(init_state(config), config=config, steps=7, length=10)
    assert counts[_train_chunk.__name__] <= 1  # 0 when an earlier test traced it
    padded, padded_losses = train_chunk(init_state(CONFIG), config=CONFIG, steps=7, length=10)
    alone, alone_losses = train_chunk(init_state(CONFIG), config=CONFIG, steps=7)
    assert padded_losses.shape == (7,) and int(padded.step) == 7
    np.testing.assert_allclose(padded_losses, alone_losses, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(padded.params, alone.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(padded.key, alone.key)
