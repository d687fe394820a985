"""Where edge-cbn keeps what it builds on first use."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$EDGE_CBN_CACHE`, else `$XDG_CACHE_HOME/edge-cbn`, else `~/.cache/edge-cbn`."""
    root = os.environ.get("EDGE_CBN_CACHE")
    if root:
        path = Path(root)
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edge-cbn"
    path.mkdir(parents=True, exist_ok=True)
    return path
