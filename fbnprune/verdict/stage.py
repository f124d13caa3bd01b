"""Stage 8, verdict: does the shipped model do the task?

Every multiple-choice task (in each of its wordings) is scored on up to ``verdict.limit`` of
its documents that no split of the run used (not calibration, held-out or healing), for the
original, the unhealed checkpoint and the healed one, each answer's log-likelihood read by
every rule of ``fbnprune.evaluate.answers``. Reported per model: the accuracy under the
recipe's ``verdict.scoring`` and as shipped (``sum``: the likeliest answer), the share of the
original's accuracy kept, the majority label's rate and the spread of the answers.

A generation task is scored the same way on its own documents: every model writes its answer
greedily (``fbnprune.evaluate.generation``), scored by the task's metric (exact match or
chrF) beside the score of answering the most frequent target to every document; the answers
are kept in ``verdict/predictions.jsonl``.

The shipped model (the healed one, else the unhealed one) is flagged when it gives one answer
to more than 90% of the documents as shipped, or scores below the majority label's rate (a
generation task: no better than the constant answer); the flags go into
``verdict/verdict.json``, the run's summary and the model card, and ``export`` refuses a
flagged run without ``--force``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from fbnprune.data.document import Document
from fbnprune.data.draw import draw_documents
from fbnprune.data.task_text import (
    SPLITS,
    task_choices,
    task_documents,
    task_generation,
    task_prompt_key,
)
from fbnprune.evaluate.answers import SCORING_RULES, answer_stats
from fbnprune.evaluate.generation import GenerationTask, generation_flags
from fbnprune.evaluate.questions import VerdictTask
from fbnprune.evaluate.suite import eval_name
from fbnprune.io import atomic_write_json, atomic_write_text
from fbnprune.recipe import TaskConfig
from fbnprune.rundir import fingerprint
from fbnprune.rundir.context import RunContext
from fbnprune.select.calibration import RunCalibration
from fbnprune.verdict.judgement import AS_SHIPPED, kept_share, task_flags, verdict_table

logger = logging.getLogger(__name__)


def _verdict_documents(ctx: RunContext, task: TaskConfig, pool: list[Document]) -> list[Document]:
    """Up to ``verdict.limit`` documents of ``pool`` that share neither id nor text nor
    prompt with any split of the run."""
    recipe = ctx.recipe
    used = [d for data in ctx.tasks.values() for split in SPLITS for d in data.split(split)]
    used += ctx.extra_heal_documents
    docs = draw_documents(
        pool, recipe.verdict.limit, exclude=used, seed=recipe.seed, prompt=task_prompt_key(task)
    )
    if not docs:
        logger.warning("verdict: %s has no document outside the run's splits", task.name)
    elif len(docs) < recipe.verdict.limit:
        logger.info("verdict: %s has %d documents outside every split", task.name, len(docs))
    return docs


def generation_tasks(ctx: RunContext) -> list[GenerationTask]:
    """The recipe's generation tasks on up to ``verdict.limit`` documents outside every
    split."""
    out: list[GenerationTask] = []
    for task in ctx.recipe.tasks:
        generation = task_generation(task)
        if generation is None:
            continue
        docs = _verdict_documents(ctx, task, task_documents(task))
        if docs:
            out.append(
                GenerationTask(
                    eval_name(task), task.name, task.template, task.max_words, generation, docs
                )
            )
    return out


def verdict_tasks(ctx: RunContext) -> list[VerdictTask]:
    """The recipe's multiple-choice tasks, each wording apart, on up to ``verdict.limit``
    documents that share neither id nor text with any split of the run."""
    out: list[VerdictTask] = []
    for task in ctx.recipe.tasks:
        choices = task_choices(task)
        if choices is None:
            continue
        pool = [d for d in task_documents(task) if d.label in choices]
        docs = _verdict_documents(ctx, task, pool)
        if not docs:
            continue
        out.append(
            VerdictTask(
                eval_name(task), task.name, None, task.template, task.max_words, choices, docs
            )
        )
        for wording in task.wordings:
            out.append(
                VerdictTask(
                    eval_name(task, wording),
                    task.name,
                    wording.name,
                    wording.template,
                    task.max_words,
                    {label: wording.choices[label] for label in choices},
                    docs,
                )
            )
    return out


def verdict_key(
    ctx: RunContext,
    upstream: str,
    tasks: list[VerdictTask],
    written: list[GenerationTask] | None = None,
) -> str:
    """The verdict's inputs: the models (``upstream``), its settings, the tasks, and the
    documents it draws (``tasks``, ``written``: so a change in how they are drawn scores
    again)."""
    r = ctx.recipe
    configs = [t.model_dump() for t in r.tasks]
    drawn = {t.name: [d.id for d in t.documents] for t in tasks}
    parts: list[Any] = [upstream, r.verdict.model_dump(), configs, r.seed]
    parts += [r.select.model_dump(), drawn]
    if written:
        parts.append({"generation": {t.name: [d.id for d in t.documents] for t in written}})
    return fingerprint(*parts)


def verdict(
    ctx: RunContext,
    checkpoints: dict[str, Path],
    upstream: str,
    calibration: Callable[[], RunCalibration] | None = None,
) -> dict[str, Any] | None:
    """Score the models on every task outside the splits (reused when fresh); the recorded
    verdict, or None when the recipe has no multiple-choice task or turns it off.
    ``calibration`` (the run's collected evidence) lets a fixed budget that misses
    ``select.keep_accuracy`` say which budget the search would choose."""
    layout = ctx.layout
    if not ctx.recipe.verdict.enabled:
        return None
    tasks, written = verdict_tasks(ctx), generation_tasks(ctx)
    if not tasks and not written:
        logger.info("verdict: skipped (no multiple-choice or generation task)")
        return None
    key = verdict_key(ctx, upstream, tasks, written)
    outputs = [layout.verdict_file, layout.verdict_table]
    if written:
        outputs.append(layout.verdict_predictions)
    ctx.run.stage(
        "verdict", key, outputs, lambda: _verdict(ctx, tasks, checkpoints, calibration, written)
    )
    return layout.read_verdict()


def _models(
    ctx: RunContext, checkpoints: dict[str, Path]
) -> dict[str, tuple[str, AbstractContextManager[Any]]]:
    """Name -> (what it is, a context yielding (model, tokenizer)) for the original, the
    unhealed checkpoint of the layout healing trains and the healed one."""
    from fbnprune.evaluate.run_eval import checkpoint_model
    from fbnprune.heal.stage import heal_layout

    @contextmanager
    def original() -> Iterator[tuple[Any, Any]]:
        yield ctx.model, ctx.tokenizer

    out: dict[str, tuple[str, AbstractContextManager[Any]]] = {
        "original": (ctx.recipe.model, original())
    }
    layout = heal_layout(ctx.recipe)
    for name, key in (("unhealed", layout), ("healed", f"{layout}-healed")):
        folder = checkpoints.get(key)
        if folder is not None and folder.is_dir():
            out[name] = (folder.name, checkpoint_model(ctx, folder, {})())
    return out


def _verdict(
    ctx: RunContext,
    tasks: list[VerdictTask],
    checkpoints: dict[str, Path],
    calibration: Callable[[], RunCalibration] | None = None,
    written: list[GenerationTask] | None = None,
) -> dict[str, Any]:
    """Score ``tasks`` and ``written``, flag, write ``verdict/verdict.{json,md}`` (and the
    written answers); the ledger's details."""
    cfg = ctx.recipe.verdict
    written = written or []
    scores: dict[str, dict[str, Any]] = {t.name: {} for t in tasks}
    answers: dict[str, dict[str, list[str]]] = {t.name: {} for t in written}
    sources: dict[str, str] = {}
    for model_name, (source, entered) in _models(ctx, checkpoints).items():
        sources[model_name] = source
        with entered as (model, tokenizer):
            for task in tasks:
                logliks = task.logliks(model, tokenizer, cfg.batch_size)
                gold = task.gold()
                scores[task.name][model_name] = {
                    rule: answer_stats(logliks, gold, rule).to_dict() for rule in SCORING_RULES
                }
            for gen in written:
                given = gen.answers(model, tokenizer, cfg.batch_size, ctx.progress)
                answers[gen.name][model_name] = given
        logger.info("verdict: scored %s", model_name)
    shipped = "healed" if "healed" in sources else "unhealed" if "unhealed" in sources else None
    result: dict[str, Any] = {
        "scoring": cfg.scoring,
        "as_shipped": AS_SHIPPED,
        "limit": cfg.limit,
        "shipped": shipped,
        "models": sources,
        "task_info": task_info(ctx, tasks, written),
        "tasks": {},
        "flags": [],  # the shipped model's
        "flags_by_model": {name: [] for name in sources if name != "original"},
    }
    for task in tasks:
        per_model = scores[task.name]
        reference = per_model["original"][cfg.scoring]
        entry = {
            "task": task.task,
            "wording": task.wording,
            "template": task.template,
            "answers": task.answers,
            "n": len(task.documents),
            "doc_ids": [d.id for d in task.documents],
            "majority_label": reference["majority_label"],
            "majority_rate": reference["majority_rate"],
            "models": per_model,
            "kept": {
                name: kept_share(stats[cfg.scoring]["accuracy"], reference["accuracy"])
                for name, stats in per_model.items()
            },
        }
        result["tasks"][task.name] = entry
        for name, flags in result["flags_by_model"].items():
            flags += task_flags(task.name, name, per_model[name], cfg.scoring)
    if written:
        result["generation"] = _generation_results(ctx, written, answers, result)
    if shipped is not None:
        result["flags"] = result["flags_by_model"][shipped]
        result["target"] = _target(ctx, result, shipped, calibration)
    layout = ctx.layout
    atomic_write_json(layout.verdict_file, result)
    atomic_write_text(layout.verdict_table, verdict_table(result))
    for flag in result["flags"]:
        logger.warning("verdict: %s", flag)
    return {"tasks": len(tasks), "flags": len(result["flags"]), "shipped": shipped}


def _generation_results(
    ctx: RunContext,
    written: list[GenerationTask],
    answers: dict[str, dict[str, list[str]]],
    result: dict[str, Any],
) -> dict[str, Any]:
    """Each generation task's scores per model, the constant answer's score, the kept share
    and flags (added to ``result``'s); every answer goes to ``verdict/predictions.jsonl``."""
    out: dict[str, Any] = {}
    lines: list[str] = []
    for task in written:
        constant, constant_score = task.constant_answer()
        per_model = {name: task.score(given) for name, given in answers[task.name].items()}
        reference = per_model["original"]["score"]
        out[task.name] = {
            "task": task.task,
            "template": task.template,
            "metric": task.generation.metric,
            "stop": task.generation.stop,
            "max_new_tokens": task.generation.max_new_tokens,
            "n": len(task.documents),
            "doc_ids": [d.id for d in task.documents],
            "constant_answer": constant,
            "constant_score": constant_score,
            "models": {
                name: {k: v for k, v in stats.items() if k != "each"}
                for name, stats in per_model.items()
            },
            "kept": {
                name: kept_share(stats["score"], reference) for name, stats in per_model.items()
            },
        }
        for name, flags in result["flags_by_model"].items():
            flags += generation_flags(task.name, name, per_model[name], constant_score)
        for i, (doc, target) in enumerate(zip(task.documents, task.targets(), strict=True)):
            record = {"task": task.name, "id": doc.id, "target": target}
            for name, given in answers[task.name].items():
                record[name] = given[i]
                record[f"{name}_score"] = per_model[name]["each"][i]
            lines.append(json.dumps(record, ensure_ascii=False))
    atomic_write_text(ctx.layout.verdict_predictions, "\n".join(lines) + "\n")
    return out


def _target(
    ctx: RunContext,
    result: dict[str, Any],
    shipped: str,
    calibration: Callable[[], RunCalibration] | None,
) -> dict[str, Any]:
    """Whether the shipped model keeps ``select.keep_accuracy`` of the original's accuracy
    on every task; when a fixed budget misses it, the budget the search would choose."""
    select = ctx.recipe.select
    entries = [*result["tasks"].values(), *result.get("generation", {}).values()]
    shares = [t["kept"][shipped] for t in entries if t["kept"][shipped] is not None]
    kept = min(shares) if shares else None
    met = kept is None or kept >= select.keep_accuracy
    target: dict[str, Any] = {"keep_accuracy": select.keep_accuracy, "kept": kept, "met": met}
    asks = bool(result["tasks"])  # the search measures multiple-choice accuracy
    if not met and asks and not select.auto and ctx.recipe.verdict.suggest_budget and calibration:
        from fbnprune.select.stage import budget_search

        logger.info("verdict: the budget misses the target; searching the one that meets it")
        target["search"] = budget_search(ctx, calibration())[0]
    return target


def task_info(
    ctx: RunContext, tasks: list[VerdictTask], written: list[GenerationTask] | None = None
) -> dict[str, dict[str, Any]]:
    """What the card says of each task: its source (a file's sha256), template, answers and
    the number of documents of every split and of the verdict."""
    from fbnprune.integrity import sha256_file

    out: dict[str, dict[str, Any]] = {}
    for cfg in ctx.recipe.tasks:
        data = ctx.tasks[cfg.name]
        scheme, _, rest = cfg.source.partition(":")
        path = Path(rest).expanduser()
        drawn = [t.documents for t in tasks if t.task == cfg.name]
        drawn += [t.documents for t in written or [] if t.task == cfg.name]
        out[cfg.name] = {
            "source": cfg.source,
            "sha256": sha256_file(path) if scheme == "file" and path.is_file() else None,
            "template": cfg.template,
            "max_words": cfg.max_words,
            "answers": data.choices,
            "generation": None if data.generation is None else data.generation.model_dump(),
            "documents": {
                **{split: len(data.split(split)) for split in ("calibration", "heldout", "heal")},
                "verdict": len(drawn[0]) if drawn else 0,
            },
        }
    return out
