"""The package's face: ``from fbnprune import Recipe, run, prune, PrunePlan``."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import fbnprune
from fbnprune import FbnpruneError, PrunePlan, Recipe, prune, run
from tests.conftest import tiny_model, tiny_tokenizer

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
    from fbnprune.check import ParityError
    from fbnprune.recipe import RecipeError
    from fbnprune.rundir import RunDirLockedError

    for error in (ParityError, RecipeError, RunDirLockedError):
        assert issubclass(error, FbnpruneError)


@pytest.mark.parametrize("selector,fill", [("magnitude", "mean"), ("random", "zero"),
                                           ("wanda", "reconstruct")])  # fmt: skip
def test_prune_in_memory_returns_sliced_copy_and_plan(selector: str, fill: str) -> None:
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sliced, plan = prune(model, tiny_tokenizer(), {"qa": PROMPTS}, budget=0.5,
                         selector=selector, fill=fill, layout="compact")  # fmt: skip
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
