"""The verdict stage: every model scored on documents outside every split, a constant or
below-majority model flagged, export refusing it without ``force``, the card stating the
task; held-out and verdict documents never reach healing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import task_recipe, tiny_model, tiny_tokenizer

import fbnprune.heal.distill
from fbnprune.evaluate.answers import SCORING_RULES
from fbnprune.pipeline import run_pipeline
from fbnprune.publish.folder import ExportError, export_run
from fbnprune.rundir import RunLayout
from fbnprune.verdict.judgement import task_flags

LIMIT = 12


@pytest.fixture(scope="module")
def verdict_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A tiny run of a labelled task, healed for 3 steps; and every text healing saw."""
    root = tmp_path_factory.mktemp("verdict")
    tiny_model("llama").save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    heal = {"enabled": True, "steps": 3, "batch_size": 4, "max_length": 48}
    r = task_recipe(str(root / "model"), heal=heal, verdict={"limit": LIMIT})
    seen: list[str] = []
    real = fbnprune.heal.distill.prepare_targets

    def spy(teacher, tokenizer, texts, cfg, **kwargs):
        seen.extend(texts)
        return real(teacher, tokenizer, texts, cfg, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fbnprune.heal.distill, "prepare_targets", spy)
        run_pipeline(r, root / "run", progress=False)
    return root / "run", seen


def test_verdict_scores_every_model_outside_the_splits(verdict_run) -> None:
    run_dir, _ = verdict_run
    layout = RunLayout(run_dir)
    verdict = layout.read_verdict()
    assert verdict is not None and layout.verdict_table.is_file()
    assert set(verdict["tasks"]) == {"bbc_news", "bbc_news_alt"}
    assert verdict["shipped"] == "healed" and verdict["scoring"] == "calibrated"
    used = {i for split in layout.read_documents()["tasks"]["bbc-news"].values() for i in split}
    for task in verdict["tasks"].values():
        assert task["n"] == LIMIT == len(set(task["doc_ids"]))
        assert not used & set(task["doc_ids"])  # outside calibration, held-out and healing
        assert set(task["models"]) == {"original", "unhealed", "healed"}
        for stats in task["models"].values():
            assert set(stats) == set(SCORING_RULES)
            assert sum(stats["sum"]["predicted"].values()) == LIMIT
        assert task["kept"]["original"] == pytest.approx(1.0)
    info = verdict["task_info"]["bbc-news"]
    assert info["documents"] == {"calibration": 8, "heldout": 4, "heal": 6, "verdict": LIMIT}


def test_heldout_and_verdict_documents_never_enter_healing(verdict_run) -> None:
    run_dir, seen = verdict_run
    layout = RunLayout(run_dir)
    from fbnprune.recipe import load_recipe
    from fbnprune.rundir import RunDir
    from fbnprune.rundir.context import RunContext
    from fbnprune.verdict.stage import verdict_tasks

    ctx = RunContext(load_recipe(layout.recipe_file), RunDir(run_dir), progress=False)
    training = set(seen[: len(ctx.heal_texts()[0])])  # the training texts come first
    data = ctx.tasks["bbc-news"]
    assert training == set(ctx.heal_texts()[0])
    assert not training & set(data.prompts("heldout"))
    for task in verdict_tasks(ctx):
        assert not training & set(task.prompts())


def test_a_constant_answerer_is_flagged_and_export_refuses_it(verdict_run, tmp_path) -> None:
    """A tiny random model gives one answer to every document: flagged, refused, and only
    exported with force, its card saying so."""
    run_dir, _ = verdict_run
    verdict = RunLayout(run_dir).read_verdict()
    assert any("constant answerer" in f for f in verdict["flags"])
    with pytest.raises(ExportError, match="--force"):
        export_run(run_dir, tmp_path / "refused", healed=True)
    assert not (tmp_path / "refused").exists()  # nothing half-written
    result = export_run(run_dir, tmp_path / "forced", healed=True, force=True)
    card = (result.out_dir / "README.md").read_text()
    assert "## Task and verdict" in card and "exported with `--force`" in card
    assert "business → `' business'`" in card
    assert "gold answer was appended" in card and "Held-out accuracy" in card
    copied = json.loads((result.out_dir / "fbnprune_verdict.json").read_text())
    assert copied["flags"] == verdict["flags"]


def stats(accuracy: float, top_share: float, majority: float = 0.5) -> dict:
    base = {
        "n": 10,
        "accuracy": accuracy,
        "majority_label": "a",
        "majority_rate": majority,
        "predicted": {"a": round(10 * top_share), "b": 10 - round(10 * top_share)},
        "top_share": top_share,
    }
    return {rule: dict(base) for rule in SCORING_RULES}


def test_flags() -> None:
    assert task_flags("t", "healed", stats(0.8, 0.6), "calibrated") == []
    constant = task_flags("t", "healed", stats(0.5, 1.0), "calibrated")
    assert len(constant) == 1 and "'a' for 100% of 10 documents" in constant[0]
    low = task_flags("t", "healed", stats(0.4, 0.6), "calibrated")
    assert len(low) == 2  # under the recipe's scoring and as shipped
    assert "below the majority label's rate 0.500" in low[0]


def test_evaluate_scores_the_recipes_tasks_with_the_verdicts_rule(verdict_run) -> None:
    """``evaluate`` reports the recipe's scoring rule as the primary metric, lm-eval's
    ``acc`` beside it (equal to the ``sum`` rule on the same records), the majority rate
    and every model's answers."""
    from fbnprune.evaluate.run_eval import evaluate_run

    run_dir, _ = verdict_run
    results = evaluate_run(
        run_dir, tasks=["bbc_news"], models=["original", "checkpoint"], limit=8, write=False
    )
    task = results["tasks"]["bbc_news"]
    assert task["metric"] == "acc_calibrated"
    others = task["other_metrics"]
    for model in task["models"]:
        if model == "pruned":
            continue
        assert others["acc"][model] == pytest.approx(others["acc_sum"][model])  # lm-eval's
        assert others["majority_rate"][model] == pytest.approx(0.25)
        spread = results["answers"]["bbc_news"][model]
        assert sum(spread["predicted"]["calibrated"].values()) == 8
    assert set(results["answers"]["bbc_news"]) == {
        "original",
        "checkpoint-compact",
        "checkpoint-compact-healed",
    }


def test_healing_logs_the_held_out_accuracy(verdict_run) -> None:
    run_dir, _ = verdict_run
    log = json.loads((run_dir / "heal" / "log.json").read_text())
    assert [step for step, _ in log["validation_accuracy"]] == [0, 3]
    assert all(0 <= acc <= 1 for _, acc in log["validation_accuracy"])
    assert [step for step, _ in log["validation"]] == [0, 3]


def test_a_fixed_budget_that_misses_the_target_is_told_the_searched_one(tmp_path) -> None:
    """keep_accuracy 1.5 cannot be met: the verdict says so and runs the budget search,
    whose every trial it records (none meets it, so the largest candidate is named)."""
    tiny_model("llama").save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    heal = {"enabled": True, "steps": 2, "batch_size": 4, "max_length": 48}
    select = {
        "selector": "magnitude",
        "budget": 0.25,
        "keep_accuracy": 1.5,
        "budgets": [0.25, 0.5],
        "search_steps": 1,
        "min_per_layer": 0.05,
    }
    r = task_recipe(str(tmp_path / "model"), heal=heal, select=select, verdict={"limit": 6})
    run_pipeline(r, tmp_path / "run", progress=False)
    layout = RunLayout(tmp_path / "run")
    target = layout.read_verdict()["target"]
    assert target["met"] is False and target["keep_accuracy"] == 1.5
    search = target["search"]
    assert search["chosen"] == 0.5 and search["met"] is False
    assert {t["budget"] for t in search["trials"]} == {0.25, 0.5}
    assert "The budget search" in layout.verdict_table.read_text()


def test_the_target_is_judged_and_searched_for_only_on_a_miss(verdict_run) -> None:
    run_dir, _ = verdict_run
    target = RunLayout(run_dir).read_verdict()["target"]
    assert target["met"] == (target["kept"] >= target["keep_accuracy"] == 0.9)
    assert ("search" in target) == (not target["met"])
