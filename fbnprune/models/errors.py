"""``ModelLoadError``: a model that cannot be found, converted or loaded."""

from __future__ import annotations

from fbnprune.errors import FbnpruneError


class ModelLoadError(FbnpruneError, ValueError):
    """A model that cannot be found, converted or loaded; the message says what to do."""
