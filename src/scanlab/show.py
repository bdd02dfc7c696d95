"""Text renderings shared by the CLI and the tour (nothing here prints)."""

from __future__ import annotations

from typing import Any


def shape_listing(tree: Any, indent: int = 0) -> str:
    """A NamedTuple of shape tuples in the blog's layout, one field per line.

    >>> print(shape_listing(Attention(q_proj=(4, 2), k_proj=(4,), v_proj=(4,), out_proj=(2, 4))))
    Attention(
      q_proj=(4, 2),
      ...
    )
    """
    if _is_shape(tree):
        return f"({tree[0]})" if len(tree) == 1 else str(tree)
    pad = "  " * (indent + 1)
    fields = ",\n".join(
        f"{pad}{name}={shape_listing(value, indent + 1)}"
        for name, value in tree._asdict().items()
        if value is not None  # a leaf this config does not declare (e.g. Llama's biases)
    )
    return f"{type(tree).__name__}(\n{fields}\n{'  ' * indent})"


def _is_shape(node: Any) -> bool:
    return isinstance(node, tuple) and not hasattr(node, "_fields")


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def count(n: int) -> str:
    """6738415616 -> '6.74 B (6,738,415,616)'."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f} {suffix} ({n:,})"
    return str(n)
