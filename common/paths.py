"""Where fedvault keeps files it creates on its own (downloads, Flower's home).

Its own module, without torch, so ``fedvault simulate`` can find its Flower home without
paying torch's multi-second import before the run even starts.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$FEDVAULT_CACHE`` or ``~/.cache/fedvault``."""
    return Path(os.environ.get("FEDVAULT_CACHE", Path.home() / ".cache" / "fedvault"))

