from scanlab.train import TrainConfig, accuracy, init_state, samples


def test_untrained_model_is_near_chance():
    config = TrainConfig(task="reverse")
    assert accuracy(init_state(config).params, config, n=128) < 0.05


def test_samples_show_question_expected_and_answer():
    config = TrainConfig(task="add")
    shown = samples(init_state(config).params, config, n=3)
    assert len(shown) == 3
    for sample in shown:
        a, b = sample.question.split(" + ")
        assert int(a) + int(b) == int(sample.expected)
        assert len(sample.predicted) == 4
