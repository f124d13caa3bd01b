"""What a task is made of: ``Document`` (one piece of text and its label) and ``DataError``
(a source that cannot be read). Below ``tasks`` and ``lmeval``, which both build documents."""

from __future__ import annotations

from dataclasses import dataclass

from fbnprune.errors import FbnpruneError


class DataError(FbnpruneError, ValueError):
    """A source that cannot be read, or holds too little usable text."""


@dataclass(frozen=True)
class Document:
    """One piece of text; ``label`` is the topic (BBC), the answer (arithmetic) or None;
    ``target`` what a generation task's model must write (a .jsonl field or an lm-eval
    task's target; a built-in's is its label); ``fields`` a generation task's .jsonl
    record's other text and number fields, for its target template."""

    id: str
    text: str
    label: str | None = None
    target: str | None = None
    fields: tuple[tuple[str, str], ...] = ()
