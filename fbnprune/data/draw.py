"""Drawing documents that a run did not use: ranked by a hash of the seed and the document
id, so the draw is deterministic and a different exclusion changes only what it removes."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

from fbnprune.data.document import Document
from fbnprune.data.task_text import normalise


def _rank(doc: Document, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{doc.id}".encode()).hexdigest()


def draw_documents(
    docs: Iterable[Document],
    n: int,
    *,
    exclude: Iterable[Document],
    seed: int,
    balance_labels: bool = False,
    prompt: Callable[[str], str] | None = None,
) -> list[Document]:
    """Up to ``n`` documents of ``docs`` that share neither id nor text with ``exclude``
    (nor, with ``prompt``, the text -> folded prompt of a task, their prompt).

    Candidates are ranked by ``sha256(seed:id)``; duplicates (same normalised text, or same
    prompt) count once. With ``balance_labels`` the labels take turns (sorted label order),
    so every label gets ``n / n_labels`` documents while it has them.
    """
    exclude = list(exclude)
    bad_ids = {d.id for d in exclude}
    bad_texts = {normalise(d.text) for d in exclude if d.text.strip()}
    bad_prompts = {prompt(d.text) for d in exclude if d.text.strip()} if prompt else set()
    seen: set[str] = set()
    pool = []
    for doc in sorted(docs, key=lambda d: _rank(d, seed)):
        key = normalise(doc.text)
        same = prompt(doc.text) if prompt else key
        if doc.id in bad_ids or key in bad_texts or same in bad_prompts or not key:
            continue
        if key in seen or same in seen:
            continue
        seen.update((key, same))
        pool.append(doc)
    if not balance_labels:
        return pool[:n]
    by_label: dict[str, list[Document]] = {}
    for doc in pool:
        by_label.setdefault(str(doc.label), []).append(doc)
    queues = [by_label[k] for k in sorted(by_label)]
    picked: list[Document] = []
    for i in range(max((len(q) for q in queues), default=0)):
        picked.extend(q[i] for q in queues if i < len(q))
    return picked[:n]
