from scanlab.bench import targets


def _results(scan_ms, loop_ms):
    timing = dict(first_s=1.0, max_abs_diff=0.0, shape=dict(B=64, H=256, T=1000))
    return {
        "latency": dict(scanlab_s=1e-3, hand_jit_s=1e-3, textbook_s=0.2),
        "matmul_flops": {"jax": 100e9},
        "recurrence": [
            timing | dict(peer="scanlab", median_s=scan_ms / 1e3),
            timing | dict(peer="torch loop", median_s=loop_ms / 1e3),
        ],
        "layers": [
            dict(
                n_layers=64, scan_compile_s=0.2, loop_compile_s=4.0, scan_run_s=0.09, loop_run_s=0.1
            )
        ],
        "training": {"default tiny model": dict(scan_steps_per_s=150.0, loop_steps_per_s=100.0)},
        "loops": {"masked": [dict(B=8, H=256, T=10000, masked_s=0.11, plain_s=0.1)]},
    }


def test_targets_are_judged_from_the_figures():
    # 2*64*256*256*1001 FLOP in 100 ms = 84 GFLOP/s = 84% of a 100 GFLOP/s limit.
    judged = {name: ok for name, _, ok in targets.judge(_results(scan_ms=100, loop_ms=120))}
    assert all(judged.values()), judged
    judged = {name: ok for name, _, ok in targets.judge(_results(scan_ms=200, loop_ms=120))}
    assert not judged["W2 scanlab fastest at B=64 H=256 T=1000"]
    assert not judged["W2 ≥ 60% of the matmul rate at B=64 H=256"]
    assert judged["W8 masked_scan ≤ 1.2× a plain scan of the padded length at B=8 H=256 T=10000"]
    results = _results(scan_ms=100, loop_ms=120)
    results["loops"]["masked"][0]["masked_s"] = 0.13
    judged = {name: ok for name, _, ok in targets.judge(results)}
    assert not judged[
        "W8 masked_scan ≤ 1.2× a plain scan of the padded length at B=8 H=256 T=10000"
    ]
