"""A plan from a selection: the tasks' scores merged, the budget allocated over layers, the
fill of dropped units, with the run's recipe and evidence in its provenance."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from fbnprune.plan import PrunePlan, Refit
from fbnprune.recipe import SelectConfig
from fbnprune.rundir.runner import now, versions
from fbnprune.select.calibration import Calibration, RunCalibration
from fbnprune.select.refit import refit_plan
from fbnprune.select.selection import allocate

SENSITIVITY_WHY = (
    "each layer alone cut to the budget (top units, mean fill); KL of the next-token "
    "distribution from the original's on calibration prompts; units per layer proportional "
    "to width * KL ** power within floor and cap"
)


def build_plan(cal: RunCalibration, select: SelectConfig, fill: str, *, seed: int) -> PrunePlan:
    """The plan of one selection in a run (the recipe's plan, and every variant of the
    benchmark): ``plan_of`` with the run's recipe, tasks and evidence in its provenance."""
    ctx, r = cal.ctx, cal.ctx.recipe
    sensitivity = None
    if select.allocation == "sensitivity":
        sensitivity = cal.layer_sensitivity(select, seed)
    refit: Callable[[list[list[int]]], Refit] | None = None
    if fill == "reconstruct" and r.prune.sequential:
        from fbnprune.select.sequential import sequential_refit

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
