"""The depth cut: a model without some blocks equals the model with them skipped (float64,
exactly), reloads with stock classes, generates with its cache, and a bad cut is refused."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_CONFIGS, VOCAB, assert_reloads_with_its_cache, random_plan, tiny_model

from fbnprune.plan import PlanError, PrunePlan
from fbnprune.pruning.depth import DepthError, drop_blocks, skipped_blocks
from fbnprune.pruning.mask import masked
from fbnprune.pruning.slicing import slice_model
from fbnprune.select.block_skip import blocks_to_drop


def _ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_dropped_blocks_equal_skipped_blocks_and_reload(model_type: str, tmp_path) -> None:
    model = tiny_model(model_type).double()
    with torch.no_grad(), skipped_blocks(model, [1]):
        want = model(input_ids=_ids(), use_cache=False).logits
    with torch.no_grad():
        unskipped = model(input_ids=_ids(), use_cache=False).logits
    assert not torch.equal(want, unskipped)  # the hooks are gone after the block
    dropped = drop_blocks(copy.deepcopy(model), [1])
    assert dropped.config.num_hidden_layers == 2
    with torch.no_grad():
        got = dropped(input_ids=_ids(), use_cache=False).logits
    assert float((got - want).abs().max()) == 0.0
    assert_reloads_with_its_cache(dropped, tmp_path, _ids())


def test_per_layer_config_lists_follow_the_kept_blocks() -> None:
    model = tiny_model("gemma3_text")
    model.config.layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    dropped = drop_blocks(model, [1])
    assert dropped.config.layer_types == ["sliding_attention", "sliding_attention"]


def test_a_sliced_plan_with_dropped_layers_matches_its_masked_model() -> None:
    model = tiny_model("llama").double()
    plan = random_plan(model, "hidden", "mean")
    plan.dropped_layers = [0, 2]
    sliced = slice_model(copy.deepcopy(model), plan, layout="compact")
    assert sliced.config.num_hidden_layers == 1
    assert len(sliced.config.fbnprune_compact["widths"]) == 1
    with torch.no_grad(), masked(model, plan):
        want = model(input_ids=_ids(), use_cache=False).logits
    with torch.no_grad():
        got = sliced(input_ids=_ids(), use_cache=False).logits
    assert float((got - want).abs().max()) < 1e-12


def test_bad_cuts_are_refused() -> None:
    model = tiny_model("llama")
    with pytest.raises(DepthError, match="leaves none"):
        drop_blocks(copy.deepcopy(model), [0, 1, 2])
    with pytest.raises(DepthError, match="distinct"):
        drop_blocks(copy.deepcopy(model), [1, 1])
    data = random_plan(model, "hidden", "zero").to_dict()
    with pytest.raises(PlanError, match="sorted, unique"):
        PrunePlan.from_dict({**data, "dropped_layers": [2, 0]})
    with pytest.raises(PlanError, match="leaves none"):
        PrunePlan.from_dict({**data, "dropped_layers": [0, 1, 2]})


def test_blocks_to_drop_takes_the_smallest_kl() -> None:
    assert blocks_to_drop([0.5, 0.1, 0.3, 0.1], 2) == [1, 3]
    assert blocks_to_drop([0.5, 0.1, 0.3], 0) == []
    with pytest.raises(DepthError):
        blocks_to_drop([0.5, 0.1], 2)
