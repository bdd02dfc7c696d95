"""The decoder forward, generation and training on meshes of 8 simulated CPU devices.

Each test runs in a fresh process presenting the CPU as 8 devices (see conftest), so the rest of
the suite keeps one device.
"""

import pytest
from tests.tiny import fast_compile_env

pytestmark = pytest.mark.e2e  # fresh processes on 8 simulated devices: `make test-e2e`

SETUP = """
import jax, numpy as np
from scanlab import sharding
from scanlab.decoder import DecoderConfig, forward, generate, init_params, shard_params
assert jax.device_count() == 8
MESHES = ["data=8,model=1", "data=4,model=2", "data=2,model=4"]
CONFIG = DecoderConfig(vocab_size=64, n_layers=3, d_model=64, n_heads=8, n_kv_heads=4,
                       head_dim=8, mlp_dim=128, max_seq_len=32)
params = init_params(CONFIG, jax.random.PRNGKey(0))
tokens = jax.random.randint(jax.random.PRNGKey(1), (8, 12), 0, 64)
"""


def test_forward_and_generation_match_one_device(on_host_devices):
    out = on_host_devices(
        8,
        SETUP
        + """
fwd = jax.jit(forward, static_argnames="config")
single = fwd(params, tokens, config=CONFIG)
# Qwen2: its bias leaves are placed by the same letter rule (K over "model").
qwen2 = CONFIG.replace(family="qwen2")
qwen2_params = init_params(qwen2, jax.random.PRNGKey(2))
mesh = sharding.make_mesh("data=4,model=2")
np.testing.assert_allclose(
    fwd(shard_params(qwen2_params, qwen2, mesh), sharding.shard_batch(tokens, mesh, "tokens"), config=qwen2),
    fwd(qwen2_params, tokens, config=qwen2), rtol=1e-5, atol=1e-5,
)
# Gemma 3: sliding and full layers in one scan, ring caches sharded like full-length ones.
gemma = CONFIG.replace(family="gemma3", n_layers=7, sliding_window=3)
gemma_params = init_params(gemma, jax.random.PRNGKey(3))
sharded = shard_params(gemma_params, gemma, mesh)
sharded_tokens = sharding.shard_batch(tokens, mesh, "tokens")
np.testing.assert_allclose(
    fwd(sharded, sharded_tokens, config=gemma), fwd(gemma_params, tokens, config=gemma),
    rtol=1e-5, atol=1e-5,
)
np.testing.assert_array_equal(
    generate(sharded, sharded_tokens[:, :5], gemma, 8).tokens,
    generate(gemma_params, tokens[:, :5], gemma, 8).tokens,
)
single_tokens = generate(params, tokens[:, :4], CONFIG, 6).tokens
for spec in MESHES:
    mesh = sharding.make_mesh(spec)
    p = shard_params(params, CONFIG, mesh)
    t = sharding.shard_batch(tokens, mesh, "tokens")
    assert len(p.blocks.gate_proj.sharding.device_set) == 8
    logits = fwd(p, t, config=CONFIG)
    # The same math split over devices: only the order of float32 sums differs.
    np.testing.assert_allclose(logits, single, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(generate(p, t[:, :4], CONFIG, 6).tokens, single_tokens)
    print("ok", spec)
""",
    )
    assert out.count("ok ") == 3


def test_training_matches_one_device_and_resumes_on_another_mesh(on_host_devices, tmp_path):
    out = on_host_devices(
        8,
        f"""
import chex
import numpy as np
from scanlab.train import TrainConfig, train, load
config = TrainConfig(steps=30, chunk_steps=10, warmup_steps=5, batch_size=16, d_model=64,
                     n_heads=8, n_kv_heads=4, mlp_dim=128, n_layers=2)
single = train(config)
run = train(config, mesh=sharding.make_mesh("data=4,model=2"))  # FSDP with TP
# 30 AdamW steps of float32 sums split differently: the curves agree to this tolerance.
np.testing.assert_allclose(run.losses, single.losses, rtol=2e-4, atol=2e-5)
chex.assert_trees_all_close(run.state.params, single.state.params, rtol=2e-3, atol=2e-4)
print("ok data=4,model=2")

class Stop(Exception):
    pass

def stop_at_20(report):
    if report.step == 20:
        raise Stop

ckpt = {str(tmp_path / "ckpt")!r}
try:
    train(config, checkpoint_dir=ckpt, checkpoint_every=1, on_chunk=stop_at_20,
          mesh=sharding.make_mesh("data=4,model=2"))
except Stop:
    pass
# Resumed on the TP-heavy mesh: its last 10 steps must continue the one-device curve.
restored = load(ckpt, mesh=sharding.make_mesh("data=2,model=4"))
assert restored.state.params.blocks.gate_proj.sharding.mesh.shape == {{"data": 2, "model": 4}}
resumed = train(config, checkpoint_dir=ckpt, resume=True, mesh=sharding.make_mesh("data=2,model=4"))
np.testing.assert_allclose(resumed.losses, single.losses, rtol=2e-4, atol=2e-5)
print("ok resumed")
""",
    )
    assert out.count("ok ") == 2


def test_meshes_that_do_not_divide_are_clear_errors(on_host_devices):
    out = on_host_devices(
        8,
        SETUP
        + """
from scanlab.train import TrainConfig, init_state
def error(fn):
    try:
        fn()
    except ValueError as e:
        print(e)
error(lambda: sharding.shard_batch(tokens[:6], sharding.make_mesh("data=4"), "tokens"))
error(lambda: shard_params(params, CONFIG, sharding.make_mesh("data=1,model=8")))
error(lambda: init_state(TrainConfig(batch_size=12), sharding.make_mesh("data=8")))
error(lambda: sharding.make_mesh("data=4,model=4"))
error(lambda: sharding.make_mesh("data=2,pipe=2"))
""",
    )
    assert (
        "tokens must have a leading batch axis divisible by the mesh's 'data' axis size 4, got shape (6, 12)"
        in out
    )
    assert "n_kv_heads=4 must be divisible by the mesh's 'model' axis size 8" in out
    assert "batch_size=12 must be divisible by the mesh's 'data' axis size 8" in out
    assert "mesh 'data=4,model=4' needs 16 devices, got 8" in out
    assert "mesh must look like 'data=4,model=2'" in out


def test_cli_runs_on_a_mesh(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "scanlab",
            "decoder",
            "compare",
            "--layers",
            "2",
            "--d-model",
            "32",
            "--seq",
            "8",
            "--batch",
            "4",
            "--mesh",
            "data=2,model=2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=fast_compile_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on mesh {'data': 2, 'model': 2}" in result.stdout


def test_loop_of_sharded_steps_matches_the_scanned_chunk(on_host_devices):
    """The loop twin on a mesh (it synchronises each step: see train_loop) gives the chunk's numbers."""
    out = on_host_devices(
        2,
        """
import chex, jax, numpy as np
from scanlab import sharding
from scanlab.train import TrainConfig, init_state, train_chunk, train_loop
mesh = sharding.make_mesh("data=2")
config = TrainConfig(steps=40, warmup_steps=5, batch_size=8, d_model=32, n_layers=1, mlp_dim=64)
chunk, chunk_losses = train_chunk(init_state(config, mesh), config=config, steps=30, mesh=mesh)
loop, loop_losses = train_loop(init_state(config, mesh), config=config, steps=30, mesh=mesh)
np.testing.assert_allclose(loop_losses, chunk_losses, rtol=1e-4, atol=1e-5)
chex.assert_trees_all_close(loop.params, chunk.params, rtol=1e-4, atol=1e-5)
print("ok")
""",
    )
    assert "ok" in out


def test_decoder_generate_runs_on_a_mesh_from_the_cli():
    """The host devices are set before JAX starts: the command imports JAX only after --mesh."""
    import subprocess
    import sys

    import jax

    from scanlab import decoder

    args = ["decoder", "generate", "--tokens", "1,2,3", "--max-new-tokens", "4", "--seed", "3"]
    result = subprocess.run(
        [sys.executable, "-m", "scanlab", *args, "--mesh", "data=2"],
        capture_output=True,
        text=True,
        timeout=600,
        env=fast_compile_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    config = decoder.preset("tiny")  # the command's random weights: the same seed, one device
    params = decoder.init_params(config, jax.random.PRNGKey(3))
    expected = decoder.generate(params, [[1, 2, 3]], config, 4).tokens[0, 3:].tolist()
    assert f"generated: {expected}" in result.stdout, result.stdout
