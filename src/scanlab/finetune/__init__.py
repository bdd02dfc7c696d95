"""Fine-tuning a pretrained decoder inside `jax.lax.scan`: LoRA adapters through the projection
seam (over frozen, possibly int8, weights) or every weight, on a user's JSONL file, K optimizer
steps per compiled call, checkpointed and resumable; merged and exported afterwards.

The public names are imported on first use (`__init__.pyi` lists them).
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
