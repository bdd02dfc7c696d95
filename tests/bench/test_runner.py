from scanlab.bench import decoding, gemma3, runner, scaling


def test_rerun_measures_each_named_workload_into_its_key_and_keeps_the_rest(monkeypatch):
    """`bench --only W7,W17`: each workload's measure is called (W17 with the progress callback,
    for its per-file lines) and its figures replace only its own key."""
    monkeypatch.setattr(decoding, "measure", lambda: {"W7": "anew"})
    monkeypatch.setattr(gemma3, "measure", lambda: {"W13": "anew"})
    monkeypatch.setattr(
        scaling, "measure", lambda on_progress: on_progress("W17 a file") or {"W17": "anew"}
    )
    previous = {"quick": False, "decoding": "old", "gemma3": "old", "sizes": "old"}
    messages: list[str] = []

    results = runner.rerun(previous, ["W7", "W17"], messages.append)

    assert results == {
        "quick": False,
        "decoding": {"W7": "anew"},
        "gemma3": "old",
        "sizes": {"W17": "anew"},
    }
    assert previous["sizes"] == "old"
    assert messages == [
        f"W7 {runner.REAL_MODEL_WORKLOADS['W7'].title}",
        f"W17 {runner.REAL_MODEL_WORKLOADS['W17'].title}",
        "W17 a file",
    ]
