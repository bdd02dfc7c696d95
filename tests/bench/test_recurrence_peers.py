"""The peers must compute the same recurrence as scanlab, or the benchmark compares nothing."""

import numpy as np

from scanlab.bench import recurrence


def test_every_peer_computes_the_same_final_state():
    timings = recurrence.measure(recurrence.Shape(2, 8, 20), n_devices=1, repeats=1)
    peers = {t.peer for t in timings}
    assert {"scanlab", "flax nn.scan twin", "flax nn.RNN(SimpleCell)", "numpy loop"} <= peers
    if recurrence.torch is not None:
        assert {"torch nn.RNN", "torch loop"} <= peers
    for t in timings:
        # float32 recurrences in different libraries: rounding differs step by step.
        assert t.max_abs_diff < 1e-5, t
        assert t.median_s > 0 and t.first_s > 0


def test_flops_count_the_T_plus_one_matmuls():
    assert recurrence.Shape(2, 3, 4).flops == 2 * 2 * 3 * 3 * 5


def test_latency_compares_the_three_ways_to_call():
    result = recurrence.call_latency(hidden=8, T=10, repeats=3)
    assert all(np.isfinite(v) and v > 0 for v in result)
