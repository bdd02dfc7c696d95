"""Where scanlab keeps what it fetches or builds: model files, the compiled kernel."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "SCANLAB_CACHE"


def default_cache() -> Path:
    """$SCANLAB_CACHE, else ~/.cache/scanlab."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "scanlab")
