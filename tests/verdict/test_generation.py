"""Generation tasks end to end on a tiny model: calibration reads prompt and target, healing
appends the target and weights its positions, the verdict writes and scores every model's
answers on documents outside every split and keeps them for inspection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import task_recipe, tiny_model, tiny_tokenizer

import fbnprune.heal.distill
from fbnprune.data.task_text import load_documents
from fbnprune.pipeline import run_pipeline
from fbnprune.rundir import RunLayout

LIMIT = 10
ITEMS = {  # with the tiny tokenizer's one token a character, 3 words fit 48 tokens
    "name": "items",
    "source": "builtin:arithmetic_items",
    "template": "{text}:",
    "max_words": 3,
    "generation": {"max_new_tokens": 4, "stop": ["\n"], "metric": "exact_match"},
    "calibration_samples": 8,
    "heldout_samples": 4,
    "heal_samples": 6,
    "max_length": 48,
}


@pytest.fixture(scope="module")
def generation_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A tiny run of a generation task, healed for 2 steps; and what healing was given."""
    root = tmp_path_factory.mktemp("generation")
    tiny_model("llama").save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    heal = {"enabled": True, "steps": 2, "batch_size": 4, "max_length": 48, "answer_weight": 5}
    r = task_recipe(str(root / "model"), tasks=[ITEMS], heal=heal, verdict={"limit": LIMIT})
    seen: dict = {}
    real = fbnprune.heal.distill.prepare_targets

    def spy(teacher, tokenizer, texts, cfg, **kwargs):
        seen.update(kwargs, texts=list(texts))
        out = real(teacher, tokenizer, texts, cfg, **kwargs)
        seen["train"] = out[0]
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fbnprune.heal.distill, "prepare_targets", spy)
        run_pipeline(r, root / "run", progress=False)
    return root / "run", seen


def test_verdict_writes_and_scores_every_model(generation_run) -> None:
    run_dir, _ = generation_run
    layout = RunLayout(run_dir)
    verdict = layout.read_verdict()
    assert verdict is not None and verdict["tasks"] == {}
    task = verdict["generation"]["items"]
    assert task["metric"] == "exact_match" and task["n"] == LIMIT
    assert set(task["models"]) == {"original", "unhealed", "healed"}
    used = {i for split in layout.read_documents()["tasks"]["items"].values() for i in split}
    assert not used & set(task["doc_ids"])  # outside calibration, held-out and healing
    records = [json.loads(line) for line in layout.verdict_predictions.read_text().splitlines()]
    assert [r["id"] for r in records] == task["doc_ids"]
    for model, stats in task["models"].items():
        assert stats["score"] == pytest.approx(sum(r[f"{model}_score"] for r in records) / LIMIT)
        assert all(isinstance(r[model], str) for r in records)
    items = {d.id: d.label for d in load_documents("builtin:arithmetic_items")}
    assert all(r["target"] == f" {items[r['id']]}" for r in records)  # after a space
    assert "exact_match" in layout.verdict_table.read_text()


def test_healing_appends_targets_and_weights_them(generation_run) -> None:
    _, seen = generation_run
    targets = seen["targets"]
    assert len(targets) == len(seen["texts"]) and all(t and t.startswith(" ") for t in targets)
    first = seen["train"][0]
    # every row's target positions weigh answer_weight (5); the prompt's others weigh 1
    weights = first.weights
    assert weights is not None and set(weights.unique().tolist()) == {1.0, 5.0}
    labels = first.labels
    assert labels is not None
    assert int((weights == 5.0).sum()) == int((labels != -100).sum())


def test_heldout_and_verdict_documents_never_enter_calibration_or_healing(generation_run) -> None:
    run_dir, seen = generation_run
    from fbnprune.recipe import load_recipe
    from fbnprune.rundir import RunDir
    from fbnprune.rundir.context import RunContext
    from fbnprune.verdict.stage import generation_tasks

    layout = RunLayout(run_dir)
    ctx = RunContext(load_recipe(layout.recipe_file), RunDir(run_dir), progress=False)
    data = ctx.tasks["items"]
    training = set(seen["texts"])
    calibration = set(ctx.calibration_prompts())
    assert calibration == set(data.texts("calibration"))  # prompt + target
    heldout = set(data.prompts("heldout"))
    (task,) = generation_tasks(ctx)
    for prompts in (heldout, set(task.prompts())):
        assert not training & prompts
        assert not {c for c in calibration if any(c.startswith(p) for p in prompts)}


def test_the_card_states_how_the_answer_is_written_and_scored(generation_run, tmp_path) -> None:
    run_dir, _ = generation_run
    from fbnprune.publish.folder import export_run

    result = export_run(run_dir, tmp_path / "export", healed=True, force=True)
    card = (result.out_dir / "README.md").read_text()
    assert "## Task and verdict" in card and "The model writes its answer" in card
    assert "scored by exact_match" in card and "| items | 10 | exact_match |" in card


def test_evaluate_keeps_every_written_answer(generation_run) -> None:
    run_dir, _ = generation_run
    from fbnprune.cli import main

    argv = ["-q", "evaluate", str(run_dir), "--tasks", "items", "--models", "original,sliced"]
    assert main([*argv, "--limit", "3"]) == 0
    layout = RunLayout(run_dir)
    results = json.loads(layout.eval_results_file.read_text())
    assert results["tasks"]["items"]["metric"] == "exact_match"
    records = [json.loads(x) for x in layout.eval_predictions.read_text().splitlines()]
    assert len(records) == 3 * len({r["model"] for r in records}) and len(records) >= 6
    assert all(r["task"] == "items" and r["target"].startswith(" ") for r in records)
