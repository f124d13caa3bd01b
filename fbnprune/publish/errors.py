"""``ExportError``: a run, option or output folder that cannot be exported as asked."""

from __future__ import annotations

from fbnprune.errors import FbnpruneError


class ExportError(FbnpruneError, ValueError):
    """A run directory, option or output folder that cannot be exported as asked."""
