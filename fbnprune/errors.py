"""One base for the errors that are the user's to fix (a recipe, data, model or folder)."""

from __future__ import annotations


class FbnpruneError(Exception):
    """An expected failure: the CLI prints its message and exits 2 (a traceback with --debug)."""
