"""Where the project caches what it builds: splits, downloads, native kernels, campaign work folders."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV_VAR = "ALIGNFEDREC_CACHE"


def default_cache_dir() -> Path:
    """Return $ALIGNFEDREC_CACHE, else $XDG_CACHE_HOME/alignfedrec, else ~/.cache/alignfedrec."""
    explicit = os.environ.get(CACHE_ENV_VAR)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "alignfedrec"
    return Path.home() / ".cache" / "alignfedrec"
