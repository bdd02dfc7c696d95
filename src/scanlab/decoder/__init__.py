"""Decoders (Llama, Qwen2, Gemma 3) whose layers run by `jax.lax.scan` over stacked parameters,
layers that differ (sliding-window and full attention) in the same scan.

Each family and each of its parameters is declared once in `scanlab.decoder.families`; shapes,
initialisation, checks, placement on a mesh and the transformers and GGUF checkpoint layouts
all derive from those declarations (`spec`). The layering, each depending only on those before
it (`tests/test_layout.py` checks it):

- declarations: `params` (containers), `families` and `config` (which refer to each other);
- the weight forms: `weights` (the protocol every weight use goes through: project, dense,
  bytes, placement, checks), then its forms, each one class: `qmatvec` (the CPU kernel's
  packed layout, through jax.ffi), `quant` (int8 blocks, and the layouts for decoding),
  `lora` (a frozen weight with a low-rank update);
- `spec` (every parameter's shape, initialisation, checks and placement, from the declarations);
- model math: `layers` (one block), `cache` (KV caches), `stack` (the L layers), `model`
  (forward);
- generation: `sampling`, `generation`, `slots` (many requests decoded together, joining and
  leaving between dispatches: the arrays and compiled steps under `scanlab.serve`);
- model files: `formats` (transformers directories, GGUF, tokenizers, fetched models);
- `load` (a model by name or path), `chat` (conversations).

The public names below are imported on first use (`__init__.pyi` lists them), so importing the
package, or a light module of it such as `config`, does not import JAX.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
