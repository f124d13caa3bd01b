"""fbnprune's version, as the installed distribution states it (pyproject.toml)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fbnprune")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
