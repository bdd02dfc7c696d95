"""Many users, one compiled scan: an OpenAI-compatible server with continuous batching.

`Engine` decodes a fixed array of slots in one compiled `lax.scan` per dispatch, requests
joining and leaving between dispatches (`scanlab.decoder.slots` holds the arrays and the compiled
steps); `create_app` puts OpenAI's HTTP API over it; `running` serves it from a thread (a
notebook, a test) and `serve` from the main thread until a signal (`scanlab serve`).

The public names are imported on first use (`__init__.pyi` lists them).
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
