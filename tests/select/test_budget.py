"""``select.budget: auto``: the smallest candidate that keeps the target, found by bisection
and recorded; in a run, the search heals and scores the held-out documents."""

from __future__ import annotations

import pytest
from conftest import task_recipe, tiny_model, tiny_tokenizer

from fbnprune.pipeline import run_pipeline
from fbnprune.recipe import RecipeError, parse_recipe
from fbnprune.select.budget import BudgetTrial, search_budget

CANDIDATES = [0.5, 0.05, 0.1, 0.15, 0.2, 0.3]  # any order
KEPT = {0.05: 0.2, 0.1: 0.4, 0.15: 0.55, 0.2: 0.65, 0.3: 0.9, 0.5: 1.0}  # monotone


def stub(calls: list[float]):
    def trial(budget: float) -> BudgetTrial:
        calls.append(budget)
        return BudgetTrial(budget, kept=KEPT[budget])

    return trial


@pytest.mark.parametrize(("target", "chosen"), [(0.9, 0.3), (0.6, 0.2), (0.1, 0.05), (1.0, 0.5)])
def test_smallest_budget_meeting_the_target(target: float, chosen: float) -> None:
    calls: list[float] = []
    search = search_budget(CANDIDATES, stub(calls), target)
    assert search.chosen == chosen and search.met
    assert len(calls) == len(set(calls)) <= 4 < len(CANDIDATES)  # bisection, no repeats
    assert [t.budget for t in search.trials] == calls  # every trial recorded, in order
    assert all(t.kept >= target for t in search.trials if t.budget >= chosen)
    record = search.to_dict()
    assert record["chosen"] == chosen and len(record["trials"]) == len(calls)


def test_no_candidate_meets_the_target() -> None:
    calls: list[float] = []
    search = search_budget(CANDIDATES, stub(calls), 1.2)
    assert search.chosen == 0.5 and not search.met and 0.5 in calls


def test_auto_needs_a_multiple_choice_task() -> None:
    with pytest.raises(RecipeError, match="multiple-choice"):
        parse_recipe(
            {
                "model": "m",
                "tasks": [{"name": "t", "source": "builtin:wikipedia"}],
                "select": {"budget": "auto"},
            }
        )


@pytest.mark.parametrize(
    ("keep", "budgets", "chosen", "met"),
    [
        (0.01, [0.25, 0.5, 0.75], 0.25, True),
        (1.5, [0.25, 0.5, 0.75], 0.75, False),
        (0.01, [0.05, 0.5], 0.5, True),  # 5% is the per-layer floor: never tried
    ],
)
def test_a_run_searches_and_records_the_budget(tmp_path, keep, budgets, chosen, met) -> None:
    tiny_model("llama").save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    select = {
        "selector": "magnitude",
        "budget": "auto",
        "budgets": budgets,
        "keep_accuracy": keep,
        "search_steps": 2,
        "min_per_layer": 0.05,
    }
    heal = {"enabled": False, "batch_size": 4, "max_length": 48}
    r = task_recipe(str(tmp_path / "model"), select=select, heal=heal, verdict={"enabled": False})
    summary = run_pipeline(r, tmp_path / "run", until="select", progress=False)
    plan = summary.plan
    assert plan is not None and plan.budget == chosen
    assert plan.kept_fraction == pytest.approx(chosen, abs=0.02)
    search = plan.provenance["budget_search"]
    assert search["chosen"] == chosen and search["met"] is met
    assert search["heal_steps"] == 2 and search["documents"] == {"bbc-news": 4}
    for trial in search["trials"]:
        assert set(trial["details"]) == {"accuracy", "original", "kept"}
        assert trial["budget"] > 0.05
