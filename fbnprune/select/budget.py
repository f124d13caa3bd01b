"""The smallest budget that keeps a target share of the original's accuracy.

``search_budget`` tries candidate budgets by bisection over their sorted list, assuming the
kept share grows with the budget (more units, more of the task), so ``n`` candidates cost
about ``log2(n) + 1`` trials instead of ``n``. ``select.budget: auto`` calls it with a trial
that slices, briefly heals and scores the held-out documents (``fbnprune.select.stage``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BudgetTrial:
    """One candidate budget and how much of the original's accuracy it kept."""

    budget: float
    kept: float  # the candidate's accuracy over the original's (the smallest over tasks)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BudgetSearch:
    """What the search chose and every trial, in the order they ran."""

    chosen: float
    met: bool  # the chosen budget reaches the target (else it is the largest candidate)
    target: float
    trials: list[BudgetTrial]

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen,
            "met": self.met,
            "target": self.target,
            "trials": [asdict(t) for t in self.trials],
        }


def search_budget(
    candidates: Sequence[float], trial: Callable[[float], BudgetTrial], target: float
) -> BudgetSearch:
    """The smallest of ``candidates`` whose trial keeps at least ``target``; the largest
    candidate (``met`` False) when none does."""
    budgets = sorted(set(candidates))
    if not budgets:
        raise ValueError("no candidate budgets to search")
    trials: dict[float, BudgetTrial] = {}

    def run(budget: float) -> BudgetTrial:
        if budget not in trials:
            trials[budget] = trial(budget)
            logger.info(
                "budget search: %.1f%% keeps %.1f%% (target %.0f%%)",
                100 * budget,
                100 * trials[budget].kept,
                100 * target,
            )
        return trials[budget]

    low, high = 0, len(budgets) - 1  # the answer, if any, lies in budgets[low..high]
    best: int | None = None
    while low <= high:
        mid = (low + high) // 2
        if run(budgets[mid]).kept >= target:
            best, high = mid, mid - 1
        else:
            low = mid + 1
    if best is None:
        largest = budgets[-1]
        run(largest)
        logger.warning(
            "budget search: no candidate keeps %.0f%% of the original's accuracy; using the "
            "largest, %.0f%%",
            100 * target,
            100 * largest,
        )
        return BudgetSearch(largest, False, target, list(trials.values()))
    return BudgetSearch(budgets[best], True, target, list(trials.values()))
