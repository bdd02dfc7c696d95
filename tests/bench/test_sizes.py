"""W17's synthetic GGUF files: real shapes, random blocks, a real tokenizer; loaded by scanlab."""

import numpy as np
import pytest

from scanlab.bench import scaling, sizes
from scanlab.decoder import forward, load_model
from scanlab.errors import ArgumentError

TINY = sizes.Shape(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128)


@pytest.mark.e2e  # the benchmark's files: with `bench --quick` in `make test-e2e`
@pytest.mark.parametrize("tensor_type", ["Q4_0", "Q4_1"])
def test_a_synthetic_file_loads_kept_and_dense_to_the_same_model(
    tmp_path, smollm2_path, tensor_type
):
    path = sizes.write_synthetic_gguf(tmp_path / "m.gguf", TINY, tensor_type, like=smollm2_path)
    model = load_model(path)
    config = model.config
    assert (config.d_model, config.n_layers, config.n_heads, config.n_kv_heads) == (64, 2, 4, 2)
    assert config.mlp_dim == 128 and config.tie_embeddings
    assert config.vocab_size == 49152  # SmolLM2's tokenizer
    tokens = np.array([model.tokenizer.encode("The sea at night")])
    kept = np.asarray(forward(model.params, tokens, config))
    dense = np.asarray(forward(load_model(path, weights="float32").params, tokens, config))
    assert np.isfinite(dense).all() and 0 < np.abs(dense).max() < 100
    np.testing.assert_allclose(kept, dense, rtol=0, atol=1e-5 * np.abs(dense).max())


def test_an_unknown_tensor_type_is_named_before_any_file_is_read(tmp_path):
    with pytest.raises(ArgumentError, match=r"tensor_type must be one of .*got 'Q4_K'"):
        sizes.write_synthetic_gguf(tmp_path / "m.gguf", TINY, "Q4_K", like=tmp_path / "absent")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.e2e  # a contender process loads, prefills and decodes: `make test-e2e`
def test_each_contender_measures_a_file_in_a_process_of_its_own(tmp_path, smollm2_path):
    path = sizes.write_synthetic_gguf(tmp_path / "m.gguf", TINY, "Q4_0", like=smollm2_path)
    plan = scaling.Plan(prompt_lengths=(4, 8), new_tokens=4, batches=(1, 2), rounds=2)
    figures = scaling.measure_file(path, plan, names=(scaling.SCANLAB,))
    assert figures["file_bytes"] == path.stat().st_size and figures["plan"]["rounds"] == 2
    ours = figures["contenders"][scaling.SCANLAB]
    assert 0 < ours["load_s"] and 0 < ours["load_peak_bytes"] <= ours["peak_bytes"]
    assert [row["prompt"] for row in ours["first_token"]] == [4, 8]
    assert all(0 < row["seconds"] < row["first_call_s"] for row in ours["first_token"])
    assert [row["batch"] for row in ours["decode"]] == [1, 2]
    assert all(row["tokens_per_s"] > 0 for row in ours["decode"])


@pytest.mark.e2e  # a process that imports JAX
def test_a_failing_contender_process_says_why(tmp_path):
    with pytest.raises(RuntimeError, match=r"(?s)W17's scanlab process failed:\n.*absent\.gguf"):
        scaling.measure_file(tmp_path / "absent.gguf", scaling.Plan(), names=(scaling.SCANLAB,))
