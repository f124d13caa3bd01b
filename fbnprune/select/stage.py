"""Stage 3, select: the plan of which units each layer keeps, and the fill of the rest."""

from __future__ import annotations

import logging
from typing import Any

from fbnprune.plan import PrunePlan
from fbnprune.recipe import RecipeError
from fbnprune.rundir.context import RunContext
from fbnprune.rundir.keys import select_key
from fbnprune.select.calibration import RunCalibration
from fbnprune.select.planning import build_plan
from fbnprune.select.selection import SelectError
from fbnprune.select.whole_model import add_whole_model_cuts

logger = logging.getLogger(__name__)


def select(ctx: RunContext, calibration: RunCalibration) -> PrunePlan:
    """The recipe's plan (``plan.json``): reused when fresh, else built and saved."""
    ctx.run.stage(
        "select", select_key(ctx), [ctx.layout.plan_file], lambda: _select(ctx, calibration)
    )
    return ctx.layout.read_plan()


def _select(ctx: RunContext, calibration: RunCalibration) -> dict[str, Any]:
    r = ctx.recipe
    if r.select.auto:
        plan = auto_budget_plan(ctx, calibration)
    else:
        plan = build_plan(calibration, r.select, r.prune.fill, seed=r.seed)
    provenance = plan.provenance
    add_whole_model_cuts(ctx, plan)  # after a budget search, which scores the MLP cut alone
    plan.save(ctx.layout.plan_file)
    logger.info("select: %s", plan.summary())
    if "threshold_union_units" in provenance:
        logger.info(
            "select: the threshold union (|z| >= %.1f) alone would keep %d units (%.1f%%)",
            r.discover.threshold,
            provenance["threshold_union_units"],
            100 * provenance["threshold_union_fraction"],
        )
    details: dict[str, Any] = {"kept": plan.n_kept, "kept_fraction": plan.kept_fraction}
    if "budget_search" in provenance:
        details["budget_search"] = provenance["budget_search"]
    return details


def auto_budget_plan(ctx: RunContext, calibration: RunCalibration) -> PrunePlan:
    """``select.budget: auto``: the plan at the smallest of ``select.budgets`` that keeps
    ``select.keep_accuracy`` (``budget_search``); the search is in the plan's provenance."""
    record, plans = budget_search(ctx, calibration)
    if record["chosen"] not in plans:
        raise RecipeError(f"no plan could be made at any of select.budgets: {record['trials']}")
    plan = plans[record["chosen"]]
    plan.provenance["budget_search"] = record
    return plan


def budget_search(
    ctx: RunContext, calibration: RunCalibration
) -> tuple[dict[str, Any], dict[float, PrunePlan]]:
    """The smallest of ``select.budgets`` whose slice, healed for ``select.search_steps``
    steps (the recipe's heal settings, the teacher's targets shared with the heal stage),
    keeps ``select.keep_accuracy`` of the original's accuracy on every task's held-out
    documents: the search's record, and the plan of every budget tried."""
    import copy

    from fbnprune.evaluate.questions import heldout_accuracy, heldout_questions
    from fbnprune.heal.stage import heal_layout, teacher_targets_of
    from fbnprune.heal.train import heal_model
    from fbnprune.pruning.slicing import slice_model
    from fbnprune.select.budget import BudgetTrial, search_budget

    r = ctx.recipe
    tasks = heldout_questions(ctx)
    if not tasks:
        raise RecipeError("a budget search needs a multiple-choice task with labels")
    original = {n: heldout_accuracy(ctx.model, ctx.tokenizer, t, r) for n, t in tasks.items()}
    targets = teacher_targets_of(ctx)[0] if r.select.search_steps else None
    heal_cfg = r.heal.model_copy(
        update={"steps": r.select.search_steps, "max_minutes": None, "patience": None}
    )
    plans: dict[float, PrunePlan] = {}

    def trial(budget: float) -> BudgetTrial:
        try:
            plan = plans[budget] = build_plan(
                calibration, r.select.at(budget), r.prune.fill, seed=r.seed
            )
        except SelectError as exc:  # e.g. the per-layer floor, rounded up, exceeds it
            return BudgetTrial(budget, 0.0, {"error": str(exc)})
        student = slice_model(copy.deepcopy(ctx.model), plan, layout=heal_layout(r)).eval()
        if targets is not None:
            student, _ = heal_model(
                student, None, None, (), heal_cfg, targets=targets, progress=False
            )
        scores = {n: heldout_accuracy(student, ctx.tokenizer, t, r) for n, t in tasks.items()}
        kept = {n: scores[n] / original[n] if original[n] else 1.0 for n in tasks}
        return BudgetTrial(
            budget, min(kept.values()), {"accuracy": scores, "original": original, "kept": kept}
        )

    sel = r.select  # a fixed budget's recipe may floor or cap layers beyond some candidates
    candidates = [b for b in sel.budgets if sel.min_per_layer < b <= sel.max_per_layer]
    if not candidates:
        raise RecipeError(
            f"no candidate budget of select.budgets {list(sel.budgets)} lies between "
            f"min_per_layer {sel.min_per_layer:g} and max_per_layer {sel.max_per_layer:g}"
        )
    search = search_budget(candidates, trial, sel.keep_accuracy)
    record = {
        **search.to_dict(),
        "scoring": r.verdict.scoring,
        "documents": {name: len(t.documents) for name, t in tasks.items()},
        "heal_steps": r.select.search_steps,
        "how": "each candidate sliced from the original, healed for search_steps steps with "
        "the recipe's heal settings on the heal stage's teacher targets, and scored on the "
        "held-out split; the kept share is the smallest over tasks",
    }
    return record, plans
