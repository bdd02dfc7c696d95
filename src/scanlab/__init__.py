"""scanlab: loops the JAX way, with `jax.lax.scan`.

Dimension letters used in every docstring: B batch, T time, L layers, S sequence, D model width,
H hidden, K key/value heads, R query heads per key/value head, Dh head width, F MLP width, V vocab,
N new tokens of a generation, C tokens per streamed chunk, P prompt tokens of a training task.

The public names are imported on first use (`__init__.pyi` lists them): `import scanlab` and the
`scanlab` command start without importing JAX or Flax.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
