"""The benchmark's grid: one ``Variant`` per selector x budget x fill (x allocation, x seed),
output-site masks and healed slices, and the ``PrunePlan`` each variant is scored with.

A variant's plan is built as the select stage builds the recipe's (``stages.select.build_plan``),
from the calibration data of the variant's neuron site, with the per-layer floor capped at half
its budget (``layer_floor``).
"""

from __future__ import annotations

from dataclasses import dataclass

from fbnprune.plan import PrunePlan
from fbnprune.recipe import Recipe
from fbnprune.select.calibration import RunCalibration
from fbnprune.select.planning import build_plan


@dataclass(frozen=True)
class Variant:
    """One pruned model of the grid."""

    site: str  # hidden (sliced) | output (masked)
    selector: str
    seed: int
    budget: float
    fill: str  # zero | mean | reconstruct
    healed: bool = False
    allocation: str | None = None  # None: the recipe's
    heal_run: int = 0  # healed: trained with heal.seed + heal_run

    @property
    def key(self) -> str:
        tail = "/healed" if self.healed else ""
        tail += f"/run{self.heal_run}" if self.heal_run else ""
        alloc = f"/{self.allocation}" if self.allocation else ""
        return (
            f"{self.site}/{self.selector}/seed{self.seed}/{self.budget:.4f}/{self.fill}"
            f"{alloc}{tail}"
        )

    @property
    def label(self) -> str:
        """The selector as tables and plots name it (with a non-default allocation)."""
        return f"{self.selector} ({self.allocation})" if self.allocation else self.selector

    @property
    def condition(self) -> str:
        """The panel a variant is drawn in: zeroed, mean, reconstruct, healed, or output."""
        if self.site == "output":
            return "output"
        if self.healed:
            return "healed"
        return {"mean": "mean", "reconstruct": "reconstruct"}.get(self.fill, "zeroed")


def grid(recipe: Recipe) -> list[Variant]:
    """The benchmark's variants, cheapest first (slices, then output masks, then healing).

    The random selector runs with every seed of ``random_seeds`` where it is cheap (sliced,
    zeroed or mean) and with the first one where it is not (output site). Every selector is
    healed ``heal_seeds`` times, run i with ``heal.seed + i`` (the random selector also
    with its i-th selection seed), so the spread of healing shows for every selector."""
    cfg = recipe.bench

    def seeds(selector: str) -> list[int]:
        return cfg.random_seeds if selector == "random" else [recipe.seed]

    allocations = [
        a if a != recipe.select.allocation else None
        for a in (cfg.allocations or [recipe.select.allocation])
    ]
    hidden = [
        Variant("hidden", sel, seed, budget, fill, allocation=alloc)
        for budget in cfg.budgets
        for sel in cfg.selectors
        for seed in seeds(sel)
        for fill in cfg.fills
        for alloc in allocations
    ]
    output = [
        Variant("output", sel, seed, budget, "zero")
        for budget in cfg.budgets
        for sel in cfg.output_selectors
        for seed in seeds(sel)[:1]
    ]
    healed = [
        Variant(
            "hidden",
            sel,
            seeds(sel)[run % len(seeds(sel))],
            budget,
            recipe.prune.fill,
            healed=True,
            heal_run=run,
        )
        for budget in cfg.heal_budgets
        for sel in cfg.selectors
        for run in range(cfg.heal_seeds)
    ]
    return hidden + output + healed


def layer_floor(recipe: Recipe, budget: float) -> float:
    """The recipe's per-layer floor, capped at half the budget so small budgets stay
    feasible (a 5% floor cannot hold under a 5% budget)."""
    return min(recipe.select.min_per_layer, budget / 2)


def variant_plan(cals: dict[str, RunCalibration], variant: Variant, recipe: Recipe) -> PrunePlan:
    """The plan of one variant, built from the calibration data of its neuron site."""
    select = recipe.select.model_copy(
        update={
            "selector": variant.selector,
            "budget": variant.budget,
            "allocation": variant.allocation or recipe.select.allocation,
            "min_per_layer": layer_floor(recipe, variant.budget),
        }
    )
    return build_plan(cals[variant.site], select, variant.fill, seed=variant.seed)
