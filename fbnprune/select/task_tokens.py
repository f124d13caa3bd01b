"""The tokens a task model keeps (``prune.vocabulary: task``).

Every token of what the run calibrates and heals on (``RunContext.heal_texts``), the
calibration and healing documents asked in every other wording of their task, and every
answer text; then ``tokenizer_trim.closed_ids`` adds the special tokens, the byte pieces
and the merge parents. Held-out documents never enter: they are where the cut is tested.
"""

from __future__ import annotations

from typing import Any

from fbnprune.data.task_text import render
from fbnprune.pruning.tokenizer_trim import closed_ids
from fbnprune.rundir.context import RunContext
from fbnprune.vocabulary import Vocabulary


def task_texts(ctx: RunContext) -> tuple[list[str], list[str]]:
    """The texts whose tokens stay (prompts, as the tokenizer reads them with its special
    tokens) and the answer texts (read without them, as answers are scored)."""
    texts, _ = ctx.heal_texts()
    answers = [t for t in ctx.heal_targets() if t is not None]  # what generation writes
    for task in ctx.recipe.tasks:
        data = ctx.tasks[task.name]
        docs = data.calibration + data.heal
        answers += list((data.choices or {}).values())
        for wording in task.wordings:
            texts += [render(wording.template, d.text, data.max_words) for d in docs]
            answers += list(wording.choices.values())
    return texts, answers


def task_vocabulary(ctx: RunContext, rows: int) -> tuple[Vocabulary, dict[str, Any]]:
    """The vocabulary of the run's tasks over a model of ``rows`` embedding rows, and its
    record for the plan's provenance."""
    tokenizer = ctx.tokenizer
    texts, answers = task_texts(ctx)
    used = {i for ids in tokenizer(texts)["input_ids"] for i in ids}
    used |= {i for ids in tokenizer(answers, add_special_tokens=False)["input_ids"] for i in ids}
    vocab = Vocabulary.of(closed_ids(tokenizer, used), rows)
    record = {
        "original": rows,
        "used": len(used),
        "kept": vocab.size,
        "texts": len(texts),
        "answers": len(set(answers)),
    }
    return vocab, record
