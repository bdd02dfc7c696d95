import jax
import numpy as np
import pytest

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
