import numpy as np
from rich.console import Console

from scanlab import explain, render


def test_blog_walkthrough_step_by_step():
    steps = explain.trace(explain.blog_body, 0, explain.BLOG_XS)
    rows = [(s.index, s.carry_in.item(), s.x.item(), s.carry_out.item(), s.y.item()) for s in steps]
    assert rows == [(0, 0, 1, 1, 3), (1, 1, 2, 3, 4), (2, 3, 3, 6, 5)]


def test_reverse_trace_runs_from_the_last_index():
    steps = explain.trace(lambda c, x: (c * 10 + x, c), 0, np.arange(3), reverse=True)
    assert [s.index for s in steps] == [2, 1, 0]
    assert [s.carry_out.item() for s in steps] == [2, 21, 210]


def test_table_has_a_row_per_step_and_shows_pytrees():
    steps = explain.trace(lambda c, x: ((c[0] + x, c[1]), None), (0, np.ones(2)), np.arange(4))
    console = Console(record=True, width=120)
    console.print(render.steps_table(steps))
    text = console.export_text()
    assert render.steps_table(steps).row_count == 4
    assert "(6, [1.0, 1.0])" in text and "None" in text
