"""``EvalError``: an evaluation that cannot be set up (suite, harness or ``evaluate_run``)."""

from __future__ import annotations

from fbnprune.errors import FbnpruneError


class EvalError(FbnpruneError, ValueError):
    """An evaluation that cannot be set up: unknown task, too few documents, bad run."""
