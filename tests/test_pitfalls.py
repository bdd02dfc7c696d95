import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scanlab import pitfalls


@pytest.mark.parametrize("pitfall", pitfalls.PITFALLS, ids=lambda p: p.title)
def test_wrong_code_raises_the_documented_error_and_fix_works(pitfall):
    with pytest.raises(pitfall.error_type, match=pitfall.error_match):
        pitfall.wrong()
    result = pitfalls.reproduce(pitfall)
    assert isinstance(result.error, pitfall.error_type)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(result.fixed_result))


def test_param_inside_body_init_succeeds_with_a_leaked_tracer():
    module = pitfalls._ParamInsideBody(4, 3)
    variables = module.init(jax.random.PRNGKey(0), np.ones(4, np.float32))
    with pytest.raises(
        pitfalls.LeakedTracerError, match=r"variables \['params'\]\['W'\] are leaked tracers"
    ):
        pitfalls.check_no_leaked_tracers(variables)


def test_clean_variables_pass_the_leak_check():
    from scanlab import LaxScanModule

    variables = LaxScanModule(4, 3).init(jax.random.PRNGKey(0), np.ones(4, np.float32))
    pitfalls.check_no_leaked_tracers(variables)


def test_reproduce_fails_loudly_when_a_lesson_goes_stale():
    stale = pitfalls.PITFALLS[2]._replace(wrong=lambda: None)
    with pytest.raises(AssertionError, match="the wrong code did not raise"):
        pitfalls.reproduce(stale)


def test_error_summary_joins_a_line_ending_in_a_colon():
    assert pitfalls.error_summary(TypeError("they differ:\n\nshapes do not match.\nmore")) == (
        "they differ: shapes do not match."
    )


def test_debug_print_claims_forward_alone_prints_every_step_and_remat_replays_them():
    def body(carry, x):
        jax.debug.print("step")
        return jnp.sin(carry) * x, None

    def body_with_x(carry, x):
        jax.debug.print("step {x}", x=x)
        return jnp.sin(carry) * x, None

    def printed(fn):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            fn()
            jax.effects_barrier()
        return out.getvalue().splitlines()

    xs = jnp.arange(4.0)
    assert printed(lambda: jax.lax.scan(body, 1.0, xs)) == ["step"] * 4
    assert printed(lambda: jax.grad(lambda c: jax.lax.scan(body, c, xs)[0])(1.0)) == ["step"]
    # Under jax.checkpoint the backward pass replays each step, in reverse: every line twice.
    replayed = printed(
        lambda: jax.grad(lambda c: jax.lax.scan(jax.checkpoint(body_with_x), c, xs)[0])(1.0)
    )
    assert replayed == [f"step {x}" for x in (0.0, 1.0, 2.0, 3.0, 3.0, 2.0, 1.0, 0.0)]


def test_rng_detector_catches_a_dropped_write_back_and_passes_nnx_scan():
    stack = pitfalls._dropout_stack()
    with pytest.raises(
        pitfalls.FrozenRngError,
        match=r"RNG counts \['dropout'\]\['rngs'\]\['count'\].* did not advance",
    ):
        pitfalls.check_rngs_advance(stack, lambda: pitfalls._raw_scan_no_write_back(stack))

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def apply(layer, x):
        return layer(x)

    pitfalls.check_rngs_advance(stack, lambda: apply(stack, jnp.ones(4)))
