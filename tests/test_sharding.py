import jax
import numpy as np
import pytest

from scanlab import sharding


def test_batch_sharded_recurrence_equals_one_device(on_host_devices):
    out = on_host_devices(
        4,
        """
        import jax, numpy as np
        from scanlab import lax_scan_in_module, sharding
        assert jax.device_count() == 4
        x = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
        mesh = sharding.batch_mesh()
        sharded = lax_scan_in_module(3, x, 16, 50, mesh=mesh)
        assert len(sharded.sharding.device_set) == 4, sharded.sharding
        single = lax_scan_in_module(3, x, 16, 50)
        # A different dot blocking per shard: float32 rounding only.
        np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-6)
        try:
            lax_scan_in_module(3, x[:6], 16, 50, mesh=mesh)
        except ValueError as error:
            print(error)
    """,
    )
    assert (
        "x must have a leading batch axis divisible by the mesh's 'data' axis size 4, got shape (6, 16)"
        in out
    )


def test_host_devices_after_the_backend_started_is_a_clear_error():
    jax.devices()  # this test process's backend is up
    with pytest.raises(
        RuntimeError, match=r"host_devices\(2\) must run before JAX's first computation"
    ):
        sharding.host_devices(2)


def test_batch_mesh_checks_the_device_count():
    with pytest.raises(ValueError, match=r"n_devices must be in \[1, 1\], got 2"):
        sharding.batch_mesh(2)
    assert sharding.batch_mesh().shape == {"data": 1}


def test_shard_batch_on_one_device_keeps_values():
    x = np.arange(6.0).reshape(3, 2)
    np.testing.assert_array_equal(sharding.shard_batch(x, sharding.batch_mesh()), x)
