"""The package's face: ``from fbnprune import Recipe, run, prune, PrunePlan``."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import tiny_model, tiny_recipe, tiny_tokenizer

import fbnprune
from fbnprune import FbnpruneError, PrunePlan, Recipe, prune, run

PROMPTS = [f"question {i}: what is {i} plus {i}?" for i in range(12)]


def test_face_names_resolve_and_import_is_cheap() -> None:
    assert callable(run) and callable(prune)
    assert Recipe.__name__ == "Recipe" and PrunePlan.__name__ == "PrunePlan"
    code = "import sys, fbnprune; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    with pytest.raises(AttributeError):
        fbnprune.no_such_name  # noqa: B018


def test_every_user_error_is_an_fbnprune_error() -> None:
    from fbnprune.parity import ParityError
    from fbnprune.recipe import RecipeError
    from fbnprune.rundir import RunDirLockedError

    for error in (ParityError, RecipeError, RunDirLockedError):
        assert issubclass(error, FbnpruneError)


@pytest.mark.parametrize(
    "selector,fill", [("magnitude", "mean"), ("random", "zero"), ("wanda", "reconstruct")]
)
def test_prune_in_memory_returns_sliced_copy_and_plan(selector: str, fill: str) -> None:
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sliced, plan = prune(
        model,
        tiny_tokenizer(),
        {"qa": PROMPTS},
        budget=0.5,
        selector=selector,
        fill=fill,
        layout="compact",
    )
    assert isinstance(plan, PrunePlan) and plan.fill == fill
    assert plan.n_kept == round(0.5 * sum(plan.layer_widths))
    widths = [layer.mlp.down_proj.in_features for layer in sliced.model.layers]
    assert widths == plan.kept_per_layer()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        sliced(torch.tensor([[1, 5, 6, 7]]))


def test_prune_rejects_a_bad_budget_like_a_recipe() -> None:
    with pytest.raises(ValueError, match="budget"):
        prune(tiny_model("llama"), tiny_tokenizer(), PROMPTS, budget=1.5, selector="random")


@pytest.mark.parametrize("selector,fill", [("ica", "mean"), ("wanda", "zero")])
def test_prune_in_memory_plans_what_the_run_plans(
    tiny_llama_dir, tmp_path, selector: str, fill: str
) -> None:
    """``prune`` and the select stage are one selection: same data, same plan."""
    from fbnprune.recipe import parse_recipe
    from fbnprune.rundir import RunDir
    from fbnprune.rundir.context import RunContext

    data = tiny_recipe(tiny_llama_dir, select={"selector": selector})
    recipe = parse_recipe({**data, "prune": {"fill": fill}})
    summary = run(recipe, tmp_path / "run", until="select", progress=False)
    ctx = RunContext(recipe, RunDir.open(tmp_path / "run"), progress=False)
    cfg = recipe.tasks[0]
    prompts = {cfg.name: ctx.tasks[cfg.name].prompts("calibration")}
    _, plan = prune(
        ctx.model,
        ctx.tokenizer,
        prompts,
        budget=recipe.select.budget,
        selector=selector,
        fill=fill,
        min_per_layer=recipe.select.min_per_layer,
        max_length=cfg.max_length,
        batch_size=recipe.collect.batch_size,
        n_components=recipe.discover.n_components,
        seed=recipe.seed,
    )
    assert summary.plan is not None
    assert plan.kept == summary.plan.kept and plan.fill_values == summary.plan.fill_values
    shared = ("calibration_tokens", "seed", "budget", "selector", "kept_per_layer")
    assert all(plan.provenance[k] == summary.plan.provenance[k] for k in shared)
