"""A run's held-out questions: each multiple-choice task's held-out prompts with their gold
answers, and a model's accuracy on them under the recipe's ``verdict.scoring`` (what the
budget search and healing's log measure)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fbnprune.data.task_text import Document, render
from fbnprune.evaluate.answers import (
    CONTENT_FREE_TEXT,
    AnswerLogLiks,
    answer_logliks,
    answer_stats,
)
from fbnprune.recipe import Recipe
from fbnprune.rundir.context import RunContext


@dataclass(frozen=True)
class VerdictTask:
    """One task in one wording on a set of its documents (the verdict's, outside every
    split; or the held-out split): the prompts, the answers and the gold ones."""

    name: str  # the evaluation's name (``evaluate.suite.eval_name``)
    task: str
    wording: str | None
    template: str
    max_words: int | None
    answers: dict[str, str]  # label -> answer text
    documents: list[Document]

    def prompts(self) -> list[str]:
        return [render(self.template, d.text, self.max_words) for d in self.documents]

    def gold(self) -> list[int]:
        labels = list(self.answers)
        return [labels.index(str(d.label)) for d in self.documents]

    def logliks(self, model: Any, tokenizer: Any, batch_size: int) -> AnswerLogLiks:
        """Every answer's log-likelihoods after every prompt, and after the content-free
        prompt (the template with ``CONTENT_FREE_TEXT``)."""
        return answer_logliks(
            model,
            tokenizer,
            self.prompts(),
            self.answers,
            content_free_prompt=render(self.template, CONTENT_FREE_TEXT),
            batch_size=batch_size,
        )


def heldout_questions(ctx: RunContext) -> dict[str, VerdictTask]:
    """Per multiple-choice task: its held-out documents as questions (the task's own
    wording)."""
    out: dict[str, VerdictTask] = {}
    for name, data in ctx.tasks.items():
        if data.choices is None:
            continue
        docs = [d for d in data.heldout if d.label in data.choices]
        out[name] = VerdictTask(name, name, None, data.template, data.max_words, data.choices, docs)
    return out


def heldout_accuracy(model: Any, tokenizer: Any, task: VerdictTask, recipe: Recipe) -> float:
    """The accuracy of ``model`` on one task's held-out questions under ``verdict.scoring``."""
    logliks = task.logliks(model, tokenizer, recipe.verdict.batch_size)
    return answer_stats(logliks, task.gold(), recipe.verdict.scoring).accuracy
