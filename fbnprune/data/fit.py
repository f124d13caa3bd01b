"""Prompts that fit their task's ``max_length``: truncation cuts a prompt's end, so where the
template puts a question after the document (``Article: {text}\\nTopic:``), a prompt longer
than ``max_length`` tokens would lose the question, and the answer would be scored, collected
and distilled at a position in the middle of the document. Such a task is refused before it
runs, with the ``max_words`` that makes every prompt fit. A generation task's prompt is
measured with its target after it: the target's tokens are what calibration and healing
read at the end."""

from __future__ import annotations

from typing import Any

from fbnprune.data.document import Document
from fbnprune.data.task_text import SPLITS, TaskData, render


def question_cut(data: TaskData, tokenizer: Any, max_length: int) -> str | None:
    """Why ``data``'s prompts do not fit (a message with the numbers and the fix), or None:
    every prompt of every split fits in ``max_length`` tokens, or the template has nothing
    after the document for truncation to cut."""
    _, _, tail = data.template.partition("{text}")
    if not tail.strip() and data.generation is None:
        return None
    docs = [doc for split in SPLITS for doc in data.split(split)]
    texts = [text for split in SPLITS for text in data.texts(split)]  # docs' order
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    over = [i for i, n in enumerate(lengths) if n > max_length]
    if not over:
        return None
    longest = sorted(over, key=lambda i: lengths[i], reverse=True)[:20]
    words = min(_words_that_fit(data, docs[i], tokenizer, max_length) for i in longest)
    fix = (
        f"set max_words: {words} (the most that fits the longest prompts) or raise max_length"
        if words > 0
        else f"raise max_length: the template alone takes {max_length} tokens or more"
    )
    return (
        f"task {data.name!r}: {len(over)} of {len(docs)} prompts are longer than max_length "
        f"{max_length} tokens (the longest {max(lengths)}), so truncation would cut "
        + (
            f"{tail!r} after the document and the answer would follow the middle of it"
            if data.generation is None
            else f"the target the model must write (and {tail!r} before it)"
        )
        + f"; {fix}"
    )


def _words_that_fit(data: TaskData, doc: Document, tokenizer: Any, max_length: int) -> int:
    """The most words of ``doc``'s text whose prompt (and target) fits in ``max_length``
    tokens (bisection)."""
    low, high = 0, len(doc.text.split())
    while low < high:
        mid = (low + high + 1) // 2
        prompt = render(data.template, doc.text, mid) + (data.target(doc) or "")
        if len(tokenizer(prompt)["input_ids"]) <= max_length:
            low = mid
        else:
            high = mid - 1
    return low
