"""Stage 3, select: the plan of which units each layer keeps, and the fill of the rest."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from fbnprune.plan import PrunePlan
from fbnprune.recipe import SelectConfig
from fbnprune.refit import refit_plan
from fbnprune.rundir.context import RunContext
from fbnprune.rundir.runner import now, versions
from fbnprune.select import allocate
from fbnprune.stages.calibration import Calibration
from fbnprune.stages.keys import select_key

logger = logging.getLogger(__name__)

SENSITIVITY_WHY = (
    "each layer alone cut to the budget (top units, mean fill); KL of the next-token "
    "distribution from the original's on calibration prompts; units per layer proportional "
    "to width * KL ** power within floor and cap"
)


def select(ctx: RunContext, calibration: Calibration) -> PrunePlan:
    """The recipe's plan (``plan.json``): reused when fresh, else built and saved."""
    ctx.run.stage("select", select_key(ctx), [ctx.layout.plan_file],
                  lambda: _select(ctx, calibration))  # fmt: skip
    return ctx.layout.read_plan()


def _select(ctx: RunContext, calibration: Calibration) -> dict[str, Any]:
    r = ctx.recipe
    plan = build_plan(calibration, r.select, r.prune.fill, seed=r.seed)
    provenance = plan.provenance
    plan.save(ctx.layout.plan_file)
    logger.info("select: %s", plan.summary())
    if "threshold_union_units" in provenance:
        logger.info(
            "select: the threshold union (|z| >= %.1f) alone would keep %d units (%.1f%%)",
            r.discover.threshold, provenance["threshold_union_units"],
            100 * provenance["threshold_union_fraction"],
        )  # fmt: skip
    return {"kept": plan.n_kept, "kept_fraction": plan.kept_fraction}


def build_plan(cal: Calibration, select: SelectConfig, fill: str, *, seed: int) -> PrunePlan:
    """The plan of one selection: the merged scores, the budget allocated over layers,
    the fill of dropped units (the recipe's plan, and every variant of the benchmark)."""
    ctx, r = cal.ctx, cal.ctx.recipe
    widths, layers = cal.layer_widths, cal.layers
    scores = cal.merged_scores(select.selector, seed)
    sensitivity = None
    if select.allocation == "sensitivity":
        sensitivity = cal.layer_sensitivity(select, seed)
    kept = allocate([scores[a:b] for a, b in layers], select.budget, policy=select.allocation,
                    min_per_layer=select.min_per_layer, max_per_layer=select.max_per_layer,
                    sensitivity=sensitivity, power=select.sensitivity_power)  # fmt: skip
    fill_values = None
    if fill == "mean":
        fill_values = [cal.unit_means[a:b].astype(np.float32).tolist() for a, b in layers]
    refit = None
    if fill == "reconstruct" and r.prune.sequential:
        from fbnprune.sequential import sequential_refit

        refit = sequential_refit(ctx.model, ctx.tokenizer, ctx.calibration_prompts(), widths,
                                 kept, ridge=r.prune.ridge, max_length=ctx.max_length,
                                 batch_size=r.collect.batch_size,
                                 progress=ctx.progress)  # fmt: skip
    elif fill == "reconstruct":
        refit = refit_plan(ctx.model, [a.matrix for a in cal.activations.values()], widths,
                           kept, ridge=r.prune.ridge, progress=ctx.progress)  # fmt: skip
    provenance: dict[str, Any] = {
        "recipe": r.name,
        "recipe_fingerprint": r.fingerprint(),
        "tasks": {t: d.fingerprint() for t, d in ctx.tasks.items()},
        "calibration_tokens": {t: a.n_tokens for t, a in cal.activations.items()},
        "seed": seed,
        "budget": select.budget,
        "allocation": select.allocation,
        "min_per_layer": select.min_per_layer,
        "selector": select.selector,
        "kept_per_layer": [len(k) for k in kept],
        "versions": versions(),
        "created": now(),
    }
    if sensitivity is not None:
        provenance["sensitivity"] = {
            "kl_per_layer": sensitivity, "power": select.sensitivity_power,
            "max_per_layer": select.max_per_layer, "samples": select.sensitivity_samples,
            "why": SENSITIVITY_WHY,
        }  # fmt: skip
    if select.selector == "ica":
        union = scores >= r.discover.threshold
        provenance.update(
            n_components=r.discover.n_components,
            threshold=r.discover.threshold,
            threshold_union_units=int(union.sum()),
            threshold_union_fraction=float(union.mean()),
            threshold_union_per_layer=[int(union[a:b].sum()) for a, b in layers],
        )
    model_type = ctx.layout.read_collect_meta(next(iter(ctx.tasks)))["model_type"]
    return PrunePlan(
        model=r.model, model_type=model_type, site=r.site, fill=fill,
        layer_widths=widths, kept=kept, fill_values=fill_values, provenance=provenance,
        refit=refit,
    )  # fmt: skip
