"""A whole training run inside `jax.lax.scan`: K optimizer steps per compiled call, chunked,
checkpointed with orbax and resumable.

The public names are imported on first use (`__init__.pyi` lists them).
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
