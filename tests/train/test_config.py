import pytest

from scanlab.train import TrainConfig


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        (dict(task="sort"), ValueError, "task must be one of"),
        (dict(steps=0), ValueError, "steps must be >= 1, got 0"),
        (dict(steps=-5), ValueError, "steps must be >= 1, got -5"),
        (dict(steps=2.5), TypeError, "steps must be an int, got 2.5"),
        (dict(steps=50, warmup_steps=50), ValueError, "warmup_steps must be < steps=50, got 50"),
        (dict(learning_rate=0.0), ValueError, "learning_rate must be > 0.0, got 0.0"),
        (dict(seed=-1), ValueError, r"seed must be in \[0, 2\*\*32\)"),
    ],
)
def test_bad_config(changes, error, match):
    with pytest.raises(error, match=match):
        TrainConfig(**changes)


def test_model_follows_the_task():
    model = TrainConfig(task="add").model
    assert model.vocab_size == 12 and model.max_seq_len == 12
