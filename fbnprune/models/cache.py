"""``cache_dir``: where fbnprune keeps converted models and assembled GGUF files."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where converted models live: ``$FBNPRUNE_CACHE``, else ``$XDG_CACHE_HOME/fbnprune``,
    else ``~/.cache/fbnprune``; created if missing."""
    explicit = os.environ.get("FBNPRUNE_CACHE")
    if explicit:
        path = Path(explicit).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        path = Path(base).expanduser() / "fbnprune"
    path.mkdir(parents=True, exist_ok=True)
    path = path.resolve()
    _warn_if_in_git_tree(path)
    return path


@functools.cache
def _warn_if_in_git_tree(path: Path) -> None:
    for parent in (path, *path.parents):
        if (parent / ".git").exists():
            logger.warning(
                "the fbnprune cache %s is inside the git work tree %s; converted models are "
                "0.5-1.1 GB each and must not be committed: point FBNPRUNE_CACHE elsewhere",
                path,
                parent,
            )
            return
