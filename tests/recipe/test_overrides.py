"""``--set KEY=VALUE``: recipe overrides from the command line."""

from __future__ import annotations

import pytest

from fbnprune.cli import main
from fbnprune.recipe import RecipeError, load_recipe
from fbnprune.recipe.overrides import apply_overrides

RECIPE = """\
model: some/model
tasks:
  - name: news
    source: builtin:bbc_news
    calibration_samples: 8
select:
  budget: 0.1
"""


@pytest.fixture
def recipe_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    return path


def test_overrides_set_nested_values_read_as_yaml(recipe_file):
    recipe = load_recipe(
        recipe_file,
        [
            "prune.sequential=true",
            "bench.allocations=[uniform, sensitivity]",
            "tasks.0.calibration_samples=32",
        ],
    )
    assert recipe.prune.sequential is True
    assert recipe.bench.allocations == ["uniform", "sensitivity"]
    assert recipe.tasks[0].calibration_samples == 32
    assert recipe.select.budget == 0.1  # untouched
    assert load_recipe(recipe_file, ["select.budget=0.2", "select.budget=0.3"]).select.budget == 0.3


def test_overrides_leave_the_mapping_they_were_given_alone():
    raw = {"select": {"budget": 0.1}}
    out = apply_overrides(raw, ["select.budget=0.5", "discover.standardize=true"])
    assert out == {"select": {"budget": 0.5}, "discover": {"standardize": True}}
    assert raw == {"select": {"budget": 0.1}}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("prune.sequentail=true", "prune.sequentail: unknown key"),
        ("prune", "expected KEY=VALUE"),
        ("prune..x=1", "expected KEY=VALUE"),
        ("tasks.3.max_length=9", "tasks.3 is not an index of a list of 1"),
        ("select.budget.x=1", "select.budget is a float, not a section"),
        ("select.budget=[1, 2", "not valid YAML"),
        ("select.budget=lots", "select.budget"),
    ],
)
def test_bad_overrides_are_errors_that_say_why(recipe_file, override, message):
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_recipe(recipe_file, [override])


def test_cli_set_reaches_the_recipe(recipe_file, capsys):
    assert main(["validate", str(recipe_file), "--set", "select.budget=0.25"]) == 0
    assert "budget 25%" in capsys.readouterr().out
    assert main(["validate", str(recipe_file), "--set", "select.budgt=0.25"]) != 0
    assert "select.budgt: unknown key" in capsys.readouterr().err
