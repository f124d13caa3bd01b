"""A run's held-out questions: each multiple-choice task's held-out prompts with their gold
answers, and a model's accuracy on them under the recipe's ``verdict.scoring`` (what the
budget search and healing's log measure)."""

from __future__ import annotations

from typing import Any

from fbnprune.data.tasks import render
from fbnprune.evaluate.answers import CONTENT_FREE_TEXT, answer_logliks, answer_stats
from fbnprune.recipe import Recipe
from fbnprune.rundir.context import RunContext

HeldoutQuestion = tuple[list[str], list[int], dict[str, str], str]


def heldout_questions(ctx: RunContext) -> dict[str, HeldoutQuestion]:
    """Per multiple-choice task: held-out prompts, gold answer indices, answers, and the
    content-free prompt."""
    out: dict[str, HeldoutQuestion] = {}
    for name, data in ctx.tasks.items():
        if data.choices is None:
            continue
        docs = [d for d in data.heldout if d.label in data.choices]
        labels = list(data.choices)
        content_free = render(data.template, CONTENT_FREE_TEXT)
        gold = [labels.index(str(d.label)) for d in docs]
        out[name] = ([data.prompt(d) for d in docs], gold, data.choices, content_free)
    return out


def heldout_accuracy(model: Any, tokenizer: Any, task: HeldoutQuestion, recipe: Recipe) -> float:
    """The accuracy of ``model`` on one task's held-out questions under ``verdict.scoring``."""
    prompts, gold, answers, content_free = task
    logliks = answer_logliks(
        model,
        tokenizer,
        prompts,
        answers,
        content_free_prompt=content_free,
        batch_size=recipe.verdict.batch_size,
    )
    return answer_stats(logliks, gold, recipe.verdict.scoring).accuracy
