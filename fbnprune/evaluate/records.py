"""One JSONL record per evaluated document: the prompt and choices of a multiple-choice
task (BBC topics, word problems, a recipe task's template and answers), the prompt and
target of a generation task, or the text of a perplexity task."""

from __future__ import annotations

import random
import re
from typing import Any

from fbnprune.data.task_text import (
    Document,
    document_target,
    render,
    task_choices,
    task_generation,
)
from fbnprune.evaluate.errors import EvalError
from fbnprune.recipe import TaskConfig, Wording

BBC_TOPICS = ("business", "entertainment", "politics", "sport", "tech")
BBC_PROMPT_WORDS = 120
DISTRACTOR_OFFSETS = (-10, -2, -1, 1, 2, 10)


def first_words(text: str, n: int, *, keep_layout: bool = True) -> str:
    """The first ``n`` whitespace-separated words of ``text``; with ``keep_layout`` the
    original spacing and line breaks are kept, else words are joined by single spaces."""
    if not keep_layout:
        return " ".join(text.split()[:n])
    ends = [m.end() for m in re.finditer(r"\S+", text)]
    return text if len(ends) <= n else text[: ends[n - 1]]


def bbc_record(doc: Document) -> dict[str, Any]:
    if doc.label not in BBC_TOPICS:
        raise EvalError(f"{doc.id}: label {doc.label!r} is not one of {BBC_TOPICS}")
    prompt = f"Article: {first_words(doc.text, BBC_PROMPT_WORDS, keep_layout=False)}\nTopic:"
    return {
        "id": doc.id,
        "prompt": prompt,
        "choices": list(BBC_TOPICS),
        "gold": BBC_TOPICS.index(doc.label),
    }


def choice_record(doc: Document, task: TaskConfig, wording: Wording | None) -> dict[str, Any]:
    """A recipe task's question and answers, as its template and choices define them."""
    template = task.template if wording is None else wording.template
    own = task_choices(task)
    answers = own if wording is None else wording.choices
    assert own is not None and answers is not None
    labels = list(own)
    if doc.label not in labels:
        raise EvalError(f"{doc.id}: label {doc.label!r} is not one of {labels}")
    return {
        "id": doc.id,
        "prompt": render(template, doc.text, task.max_words),
        "choices": [answers[label] for label in labels],
        "gold": labels.index(doc.label),
    }


def generation_record(doc: Document, task: TaskConfig) -> dict[str, Any]:
    """A generation task's prompt and the target the model must write."""
    generation = task_generation(task)
    assert generation is not None
    return {
        "id": doc.id,
        "prompt": render(task.template, doc.text, task.max_words),
        "target": document_target(generation, doc),
    }


def word_problem_record(doc: Document, seed: int) -> dict[str, Any]:
    """The problem and four numbers: the answer and three near misses, in numeric order."""
    if doc.label is None or not doc.label.lstrip("-").isdigit():
        raise EvalError(f"{doc.id}: label {doc.label!r} is not an integer answer")
    answer = int(doc.label)
    offsets = list(DISTRACTOR_OFFSETS)
    random.Random(f"{seed}:{doc.id}").shuffle(offsets)
    wrong = [answer + o for o in offsets if answer + o >= 0][:3]
    choices = sorted([answer, *wrong])
    return {
        "id": doc.id,
        "prompt": doc.text,
        "choices": [str(c) for c in choices],
        "gold": choices.index(answer),
    }


def text_record(doc: Document, max_words: int) -> dict[str, Any]:
    return {"id": doc.id, "text": first_words(doc.text, max_words)}
