"""Stage 3, select: the plan of which units each layer keeps, and the fill of the rest."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from fbnprune.plan import PrunePlan
from fbnprune.recipe import RecipeError, SelectConfig
from fbnprune.refit import Refit, refit_plan
from fbnprune.rundir.context import RunContext
from fbnprune.rundir.runner import now, versions
from fbnprune.select import SelectError, allocate
from fbnprune.stages.calibration import Calibration, RunCalibration
from fbnprune.stages.keys import select_key

logger = logging.getLogger(__name__)

SENSITIVITY_WHY = (
    "each layer alone cut to the budget (top units, mean fill); KL of the next-token "
    "distribution from the original's on calibration prompts; units per layer proportional "
    "to width * KL ** power within floor and cap"
)


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

    from fbnprune.budget import BudgetTrial, search_budget
    from fbnprune.heal import heal_model
    from fbnprune.slicing import slice_model
    from fbnprune.stages.heal import heal_layout, teacher_targets_of
    from fbnprune.stages.questions import heldout_accuracy, heldout_questions

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


def build_plan(cal: RunCalibration, select: SelectConfig, fill: str, *, seed: int) -> PrunePlan:
    """The plan of one selection in a run (the recipe's plan, and every variant of the
    benchmark): ``plan_of`` with the run's recipe, tasks and evidence in its provenance."""
    ctx, r = cal.ctx, cal.ctx.recipe
    sensitivity = None
    if select.allocation == "sensitivity":
        sensitivity = cal.layer_sensitivity(select, seed)
    refit: Callable[[list[list[int]]], Refit] | None = None
    if fill == "reconstruct" and r.prune.sequential:
        from fbnprune.sequential import sequential_refit

        refit = functools.partial(
            sequential_refit,
            ctx.model,
            ctx.tokenizer,
            ctx.calibration_prompts(),
            cal.layer_widths,
            ridge=r.prune.ridge,
            max_length=ctx.max_length,
            batch_size=r.collect.batch_size,
            progress=ctx.progress,
        )

    head = {
        "recipe": r.name,
        "recipe_fingerprint": r.fingerprint(),
        "tasks": {t: d.fingerprint() for t, d in ctx.tasks.items()},
    }
    tail: dict[str, Any] = {}
    if sensitivity is not None:
        tail["sensitivity"] = {
            "kl_per_layer": sensitivity,
            "power": select.sensitivity_power,
            "max_per_layer": select.max_per_layer,
            "samples": select.sensitivity_samples,
            "why": SENSITIVITY_WHY,
        }
    if select.selector == "ica":
        union = cal.merged_scores(select.selector, seed) >= r.discover.threshold
        tail.update(
            n_components=r.discover.n_components,
            discover_scope=r.discover.scope,
            threshold=r.discover.threshold,
            threshold_union_units=int(union.sum()),
            threshold_union_fraction=float(union.mean()),
            threshold_union_per_layer=[int(union[a:b].sum()) for a, b in cal.layers],
        )
    model_type = ctx.layout.read_collect_meta(next(iter(ctx.tasks)))["model_type"]
    return plan_of(
        cal,
        select,
        fill,
        seed=seed,
        ridge=r.prune.ridge,
        model=r.model,
        model_type=model_type,
        site=r.site,
        sensitivity=sensitivity,
        refit=refit,
        head=head,
        tail=tail,
        progress=ctx.progress,
    )


def plan_of(
    cal: Calibration,
    select: SelectConfig,
    fill: str,
    *,
    seed: int,
    ridge: float,
    model: str,
    model_type: str,
    site: str,
    sensitivity: list[float] | None = None,
    refit: Callable[[list[list[int]]], Refit] | None = None,
    head: dict[str, Any] | None = None,
    tail: dict[str, Any] | None = None,
    progress: bool = False,
) -> PrunePlan:
    """The plan of one selection: the tasks' scores merged, the budget allocated over
    layers, the fill of dropped units (a run's select stage, and ``fbnprune.prune``).

    Args:
        cal: the calibration data the scores and fills are computed from.
        select: selector, budget, allocation and its floor and cap.
        fill: ``zero``, ``mean`` or ``reconstruct``.
        seed: the selector's random state.
        ridge: the refit's ridge term (``reconstruct``).
        model, model_type, site: what the plan is for.
        sensitivity: per layer, the KL of cutting it alone (``sensitivity`` allocation).
        refit: the refit of the kept units; by default ``refit.refit_plan`` on the
            calibration activations (``reconstruct``).
        head, tail: provenance written before and after the selection's own.
        progress: show progress bars.
    """
    widths, layers = cal.layer_widths, cal.layers
    scores = cal.merged_scores(select.selector, seed)
    kept = allocate(
        [scores[a:b] for a, b in layers],
        select.fraction,
        policy=select.allocation,
        min_per_layer=select.min_per_layer,
        max_per_layer=select.max_per_layer,
        sensitivity=sensitivity,
        power=select.sensitivity_power,
    )
    fill_values = None
    if fill == "mean":
        fill_values = [cal.unit_means[a:b].astype(np.float32).tolist() for a, b in layers]
    refitted = None
    if fill == "reconstruct" and refit is not None:
        refitted = refit(kept)
    elif fill == "reconstruct":
        refitted = refit_plan(
            cal.model(),
            [a.matrix for a in cal.activations.values()],
            widths,
            kept,
            ridge=ridge,
            progress=progress,
        )
    provenance: dict[str, Any] = {
        **(head or {}),
        "calibration_tokens": {t: a.n_tokens for t, a in cal.activations.items()},
        "seed": seed,
        "budget": select.budget,
        "allocation": select.allocation,
        "min_per_layer": select.min_per_layer,
        "selector": select.selector,
        "kept_per_layer": [len(k) for k in kept],
        "versions": versions(),
        "created": now(),
        **(tail or {}),
    }
    return PrunePlan(
        model=model,
        model_type=model_type,
        site=site,
        fill=fill,
        layer_widths=widths,
        kept=kept,
        fill_values=fill_values,
        provenance=provenance,
        refit=refitted,
    )
