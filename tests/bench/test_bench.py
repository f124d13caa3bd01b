"""``fbnprune bench`` on a tiny model: the grid, the table, the plots, resume, the CLI."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml
from conftest import NEWS_TASK, tiny_recipe
from PIL import Image

from fbnprune.bench import Variant, grid, run_bench
from fbnprune.bench.summary import results_markdown
from fbnprune.cli import main
from fbnprune.recipe import RecipeError, parse_recipe

BENCH = {
    "budgets": [0.25, 0.5],
    "selectors": ["ica", "magnitude", "random"],
    "random_seeds": [0, 1],
    "fills": ["zero", "mean"],
    "heal_budgets": [0.25],
    "heal_steps": 3,
    "output_selectors": ["ica"],
    "tasks": ["bbc_topics", "ppl_news"],
    "limit": 3,
    "cost_repeats": 1,
}


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(home / "datasets"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def recipe_dict(tiny_llama_dir: str, **bench) -> dict:
    """The tiny recipe with the benchmark's sections (healing left to the budget)."""
    return tiny_recipe(
        tiny_llama_dir,
        name="tiny-bench",
        tasks=[{k: v for k, v in NEWS_TASK.items() if k != "template"}],
        heal={"enabled": None, "batch_size": 4, "max_length": 32},
        evaluate={"choice_samples": 6, "perplexity_samples": 3, "perplexity_max_words": 40},
        bench={**BENCH, **bench},
    )


def test_grid_covers_selectors_seeds_budgets_and_conditions(tiny_llama_dir):
    recipe = parse_recipe(recipe_dict(tiny_llama_dir))
    variants = grid(recipe)
    keys = [v.key for v in variants]
    assert len(keys) == len(set(keys))
    hidden = [v for v in variants if v.site == "hidden" and not v.healed]
    assert len(hidden) == 2 * (1 + 1 + 2) * 2  # budgets x (ica, magnitude, 2 random) x fills
    assert {v.condition for v in variants} == {"zeroed", "mean", "healed", "output"}
    healed = [v for v in variants if v.healed]
    assert [(v.selector, v.seed, v.budget, v.fill) for v in healed] == [
        ("ica", 0, 0.25, "mean"),
        ("magnitude", 0, 0.25, "mean"),
        ("random", 0, 0.25, "mean"),
    ]
    assert [v.condition for v in variants].index("healed") > [v.condition for v in variants].index(
        "output"
    )
    assert Variant("output", "ica", 0, 0.5, "zero").condition == "output"


def test_grid_heals_every_selector_heal_seeds_times(tiny_llama_dir):
    """heal_seeds: N healed runs per selector (run i: heal.seed + i), the random selector
    with its i-th selection seed; the first run keeps the key it always had."""
    recipe = parse_recipe(recipe_dict(tiny_llama_dir, heal_seeds=3, output_selectors=[]))
    healed = [v for v in grid(recipe) if v.healed]
    assert [(v.selector, v.seed, v.heal_run) for v in healed] == [
        ("ica", 0, 0),
        ("ica", 0, 1),
        ("ica", 0, 2),
        ("magnitude", 0, 0),
        ("magnitude", 0, 1),
        ("magnitude", 0, 2),
        ("random", 0, 0),
        ("random", 1, 1),
        ("random", 0, 2),  # two random seeds: run 2 wraps to the first
    ]
    assert healed[0].key == "hidden/ica/seed0/0.2500/mean/healed"
    assert healed[1].key == "hidden/ica/seed0/0.2500/mean/healed/run1"
    assert len({v.key for v in healed}) == len(healed)


def test_bench_writes_table_plots_and_resumes(tiny_llama_dir, tmp_path, caplog):
    recipe = parse_recipe(recipe_dict(tiny_llama_dir))
    out = tmp_path / "run"
    results = run_bench(recipe, out, progress=False)
    bench = out / "bench"
    rows = results["rows"]
    assert rows[0]["key"] == "original" and len(rows) == 1 + len(grid(recipe))
    assert all(set(r["scores"]) == {"bbc_topics", "ppl_news"} for r in rows)
    for row in rows[1:]:
        assert row["kept_fraction"] == pytest.approx(row["budget"], abs=0.02)
        if row["site"] == "hidden":
            assert row["parameters"] < rows[0]["parameters"]
    healed = [r for r in rows if r.get("condition") == "healed"]
    assert healed and all(r["heal"]["steps"] == 3 for r in healed)

    table = (bench / "results.md").read_text()
    assert "| selector | condition | 25% | 50% |" in table
    for selector, condition in [
        ("ica", "zeroed"),
        ("ica", "mean"),
        ("magnitude", "zeroed"),
        ("random", "mean"),
        ("ica", "healed"),
        ("ica", "output"),
    ]:
        assert f"| {selector} | {condition} |" in table, (selector, condition)
    random_row = next(line for line in table.splitlines() if line.startswith("| random | mean"))
    assert "±" in random_row  # two seeds: mean ± std
    assert "(random: seeds 0, 1, mean ± std)" in table and "prune.sequential" not in table
    settings = {**results["settings"], "selectors": ["ica"]}
    settings["prune"] = {**settings["prune"], "sequential": True}
    settings["discover"] = {**settings["discover"], "standardize": True}
    other = results_markdown({**results, "settings": settings}, {})
    assert "random: seeds" not in other  # no random selector benched
    assert "(`prune.sequential`)" in other and "(`discover.standardize`)" in other
    assert "## Cost" in table and "| original |" in table
    for name in ("bbc_topics.png", "ppl_news.png", "healing.png"):
        assert Image.open(bench / name).size[0] > 400, name
        assert f"({name})" in table
    saved = json.loads((bench / "results.json").read_text())
    assert saved["tasks"]["bbc_topics"]["metric"] == "acc"
    assert set(saved["cost"]["models"]) == {"original", "compact 25%", "compact 50%", "padded 25%"}
    assert (
        saved["cost"]["models"]["compact 25%"]["parameters"]
        < saved["cost"]["models"]["original"]["parameters"]
    )

    lines = (bench / "rows.jsonl").read_text().splitlines()
    caplog.clear()
    caplog.set_level(logging.INFO, logger="fbnprune.bench.scoring")
    again = run_bench(recipe, out, progress=False)  # everything reused: no row is rescored
    assert (bench / "rows.jsonl").read_text().splitlines() == lines
    assert [r["scores"] for r in again["rows"]] == [r["scores"] for r in rows]
    assert f"({len(grid(recipe))} done earlier)" in caplog.text


def test_cli_overrides_and_errors(tiny_llama_dir, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tiny_llama_dir)))
    rc = main(
        [
            "bench",
            str(path),
            "--out",
            str(tmp_path / "run"),
            "--budgets",
            "50%",
            "--selectors",
            "magnitude",
            "--fills",
            "zero",
            "--heal-budgets",
            "",
            "--output-selectors",
            "",
            "--tasks",
            "bbc_topics",
            "--no-cost",
            "--no-progress",
        ]
    )
    assert rc == 0
    shown = capsys.readouterr().out
    assert "results.md" in shown and "bbc_topics.png" in shown
    saved = json.loads((tmp_path / "run" / "bench" / "results.json").read_text())
    assert [r["key"] for r in saved["rows"]] == ["original", "hidden/magnitude/seed0/0.5000/zero"]
    assert saved["cost"] is None

    assert main(["bench", str(path), "--out", str(tmp_path / "bad"), "--budgets", "1.5"]) == 2
    assert "budgets must be in (0, 1]" in capsys.readouterr().err
    with pytest.raises(RecipeError, match="unknown key"):
        parse_recipe({**recipe_dict(tiny_llama_dir), "bench": {"budget": [0.1]}})


def test_bench_scores_a_generation_task(tiny_llama_dir, tmp_path):
    """A generation task's suite task (generate_until) is scored for the original and every
    variant, healed ones included, by its metric."""
    items = {
        "name": "items",
        "source": "builtin:arithmetic_items",
        "template": "{text}:",
        "max_words": 3,
        "generation": {"max_new_tokens": 3},
        "calibration_samples": 8,
        "heldout_samples": 4,
        "max_length": 48,
    }
    data = recipe_dict(
        tiny_llama_dir,
        budgets=[0.25],
        selectors=["magnitude"],
        random_seeds=[0],
        fills=["zero"],
        heal_steps=2,
        output_selectors=[],
        tasks=["items"],
        limit=4,
    )
    data["tasks"] = [items]
    results = run_bench(parse_recipe(data), tmp_path / "bench", progress=False)
    assert results["tasks"]["items"]["metric"] == "exact_match"
    assert results["tasks"]["items"]["n_docs"] == 4
    scored = [row["scores"]["items"]["exact_match"] for row in results["rows"]]
    assert len(scored) >= 2 and all(0.0 <= s <= 1.0 for s in scored)
    assert any(row.get("heal") for row in results["rows"])
