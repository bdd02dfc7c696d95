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


def test_evaluate_gives_the_accuracy_and_the_first_held_out_examples():
    from scanlab.train import evaluate
    from scanlab.train.evaluation import eval_tokens

    config = TrainConfig(task="reverse")
    params = init_state(config).params
    shown = evaluate(params, config, n_samples=3)
    assert shown.accuracy == accuracy(params, config)
    digits = ["".join(str(int(t)) for t in row[:8]) for row in eval_tokens(config, 512)[:3]]
    assert [s.question for s in shown.samples] == [f"reverse {d}" for d in digits]
