import jax
import numpy as np
import pytest

from scanlab.train import TASKS, task_by_name


def test_reverse_examples():
    task = task_by_name("reverse")
    tokens = np.asarray(task.sample(jax.random.PRNGKey(0), 16))
    assert tokens.shape == (16, task.length) and tokens.dtype == np.int32
    prompt, target = tokens[:, : task.prompt_length], tokens[:, task.prompt_length :]
    np.testing.assert_array_equal(prompt[:, -1], 10)  # the separator
    np.testing.assert_array_equal(target, prompt[:, :-1][:, ::-1])
    assert tokens.max() < task.vocab_size


def test_addition_examples_hold_the_right_sums():
    task = task_by_name("add")
    tokens = np.asarray(task.sample(jax.random.PRNGKey(0), 64))
    for row in tokens:
        question, answer = task.describe(row)
        a, b = question.split(" + ")
        assert int(a) + int(b) == int(answer)
    assert tokens.max() < task.vocab_size


@pytest.mark.parametrize("name", TASKS)
def test_batches_are_a_function_of_the_key(name):
    task = TASKS[name]
    np.testing.assert_array_equal(
        task.sample(jax.random.PRNGKey(1), 4), task.sample(jax.random.PRNGKey(1), 4)
    )
    assert not np.array_equal(
        task.sample(jax.random.PRNGKey(1), 4), task.sample(jax.random.PRNGKey(2), 4)
    )


def test_unknown_task():
    with pytest.raises(ValueError, match=r"task must be one of \['add', 'reverse'\], got 'sort'"):
        task_by_name("sort")
