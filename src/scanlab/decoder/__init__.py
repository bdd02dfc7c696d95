"""A Llama-architecture decoder (and Qwen2) whose layers run by `jax.lax.scan` over stacked
parameters.

Every parameter is declared once in `scanlab.decoder.spec`; shapes, initialisation, checks,
placement on a mesh and the transformers and GGUF checkpoint layouts all derive from that
declaration. The layering, each depending only on those before it:

- declarations: `config`, `params`, `spec`;
- model math: `layers` (one block), `stack` (the L layers), `model` (forward);
- generation: `sampling`, `generation`;
- model files: `formats` (transformers directories, GGUF, tokenizers, fetched models);
- `load` (a model by name or path), `chat` (conversations).

The public names below are imported on first use (`__init__.pyi` lists them), so importing the
package, or a light module of it such as `config`, does not import JAX.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
