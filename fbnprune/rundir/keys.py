"""Every stage's key: the fingerprint of its inputs, as ``run.json`` records it.

A stage whose recorded key equals the current one (and whose outputs exist) is reused.
Each key folds in its predecessor's, so a change upstream reruns everything after it.
"""

from __future__ import annotations

from fbnprune.integrity import sha256_file
from fbnprune.rundir import fingerprint
from fbnprune.rundir.context import RunContext


def collect_key(ctx: RunContext, task: str) -> str:
    r = ctx.recipe
    cfg = next(t for t in r.tasks if t.name == task)
    # healing documents and evaluation wordings change neither collection nor the plan
    return fingerprint(
        r.model,
        ctx.model_fingerprint,
        r.dtype,
        r.site,
        cfg.model_dump(exclude={"heal_samples", "wordings"}),
        r.collect.model_dump(),
        ctx.tasks[task].fingerprint(heal=False),
    )


def teacher_key(ctx: RunContext) -> str:
    """The original model, as the teacher whose healing targets are kept on disk."""
    r = ctx.recipe
    return fingerprint(r.model, ctx.model_fingerprint, r.dtype)


def discover_key(ctx: RunContext, task: str) -> str:
    r = ctx.recipe
    return fingerprint(collect_key(ctx, task), r.discover.model_dump(), r.seed)


def select_key(ctx: RunContext) -> str:
    r = ctx.recipe
    upstream = [
        discover_key(ctx, t) if r.select.selector == "ica" else collect_key(ctx, t)
        for t in ctx.tasks
    ]
    parts = [upstream, r.select.model_dump(), r.prune.model_dump(), r.seed]
    if r.select.auto:  # the search heals and scores held-out documents
        parts += [
            r.heal.model_dump(),
            r.verdict.scoring,
            [d.fingerprint() for d in ctx.tasks.values()],
        ]
    return fingerprint(*parts)


def prune_key(ctx: RunContext) -> str:
    """Also keyed on the plan's content, so an edited plan is pruned, checked and saved
    again (read it after the select stage ran)."""
    file = ctx.layout.plan_file
    plan = sha256_file(file) if file.is_file() else None
    return fingerprint(select_key(ctx), ctx.recipe.save.model_dump(), plan)


def check_key(ctx: RunContext) -> str:
    """The key of check, and of save (which publishes what check compared)."""
    return fingerprint(prune_key(ctx), ctx.recipe.check.model_dump())


def heal_key(ctx: RunContext) -> str:
    """Also keyed on the processes (several train on several batches a step); one process
    keeps the key it had before ``accelerate launch`` was supported."""
    heal_data = [data.fingerprint() for data in ctx.tasks.values()]
    extra = ctx.extra_heal_documents
    if extra:  # heal.corpus and heal.general_text: their texts
        heal_data.append(fingerprint([[d.id, d.text] for d in extra]))
    cfg = ctx.recipe.heal
    # activation checkpointing changes memory, not weights: either way reuses the other
    parts = [check_key(ctx), cfg.model_dump(exclude={"activation_checkpointing"}), heal_data]
    if cfg.label_weight:  # its default is 1, and a dump leaves defaults of additions out
        parts.append({"label_weight": cfg.label_weight})
    if ctx.processes > 1:
        parts.append({"processes": ctx.processes})
    return fingerprint(*parts)
