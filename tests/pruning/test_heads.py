"""The attention cut: sliced heads equal masked heads (float64, exactly), the stock config
reloads them and generates with its cache, and cuts a stock config cannot hold are refused."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import VOCAB, assert_reloads_with_its_cache, random_plan, tiny_model

from fbnprune.head_cut import HeadCut, HeadError, HeadShape
from fbnprune.plan import PlanError, PrunePlan
from fbnprune.pruning.heads import head_shape, masked_heads, slice_heads
from fbnprune.pruning.mask import masked
from fbnprune.pruning.slicing import slice_model
from fbnprune.select.head_scores import choose_heads, head_scores

FAMILIES = ["llama", "mistral", "qwen2", "gemma3_text"]  # 4 query heads, 2 groups, head_dim 8
CUTS = {
    "one whole group": HeadCut([[2, 3]] * 3, [[1]] * 3, 8),
    "a head of each group": HeadCut([[0, 3]] * 3, [[0, 1]] * 3, 8),
}


def _ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(CUTS))
@pytest.mark.parametrize("model_type", FAMILIES)
def test_sliced_heads_equal_masked_heads_and_reload(model_type: str, name: str, tmp_path) -> None:
    model, cut = tiny_model(model_type).double(), CUTS[name]
    with torch.no_grad(), masked_heads(model, cut):
        want = model(input_ids=_ids(), use_cache=False).logits
    sliced = slice_heads(copy.deepcopy(model), cut)
    with torch.no_grad():
        got = sliced(input_ids=_ids(), use_cache=False).logits
    assert float((got - want).abs().max()) == 0.0
    reloaded = assert_reloads_with_its_cache(sliced, tmp_path, _ids())
    assert reloaded.config.num_attention_heads == 2
    assert reloaded.config.num_key_value_heads == len(cut.groups[0])


def test_a_plan_with_every_cut_matches_its_masked_model() -> None:
    model = tiny_model("llama").double()
    plan = random_plan(model, "hidden", "mean")
    plan.heads = CUTS["one whole group"].to_dict()
    plan.dropped_layers = [1]
    sliced = slice_model(copy.deepcopy(model), plan, layout="compact")
    with torch.no_grad(), masked(model, plan):
        want = model(input_ids=_ids(), use_cache=False).logits
    with torch.no_grad():
        got = sliced(input_ids=_ids(), use_cache=False).logits
    assert float((got - want).abs().max()) < 1e-12
    assert PrunePlan.from_dict(plan.to_dict(), refit=plan.refit).head_cut() == plan.head_cut()


def test_scores_rank_the_heads_that_write_most() -> None:
    model = tiny_model("llama")
    with torch.no_grad():  # head 1 writes nothing: its o_proj columns are zero
        model.model.layers[0].self_attn.o_proj.weight[:, 8:16] = 0
    from conftest import tiny_tokenizer

    scores = head_scores(model, tiny_tokenizer(), ["the quick brown fox", "hello world"])
    assert len(scores) == 3 and scores[0].shape == (4,)
    assert scores[0][1] == 0 and (scores[0][[0, 2, 3]] > 0).all()
    cut = choose_heads(scores, head_shape(model), 2)
    assert cut.groups[0] == [1]  # group 0 holds the silent head


def test_choose_heads_keeps_a_stock_shape() -> None:
    shape = HeadShape(query=9, groups=3, head_dim=64)
    scores = [np.arange(9, dtype=float), np.arange(9, dtype=float)[::-1].copy()]
    whole = choose_heads(scores, shape, 6)
    assert whole.groups == [[1, 2], [0, 1]] and whole.query[0] == [3, 4, 5, 6, 7, 8]
    assert choose_heads(scores, shape, 3).query == [[6, 7, 8], [0, 1, 2]]  # one whole group
    with pytest.raises(HeadError, match="neither whole groups"):
        choose_heads(scores, shape, 4)
    pairs = HeadShape(query=8, groups=2, head_dim=64)  # 2 is not whole groups of 4
    share = choose_heads([np.array([0, 5, 1, 2, 9, 0, 0, 3.0])], pairs, 2)
    assert share.query == [[1, 4]] and share.groups == [[0, 1]]  # the best head of each
    with pytest.raises(HeadError, match=r"in \[1, 9\]"):
        choose_heads(scores, shape, 10)


def test_bad_cuts_and_families_are_refused() -> None:
    shape = HeadShape(query=4, groups=2, head_dim=8)
    with pytest.raises(HeadError, match="as many heads"):
        HeadCut([[0, 1], [0]], [[0], [0]], 8).check(shape, 2)
    with pytest.raises(HeadError, match="do not fill"):
        HeadCut([[0, 1]], [[1]], 8).check(shape, 1)
    with pytest.raises(HeadError, match="unequal"):
        HeadCut([[0, 1, 2, 4]], [[0, 1]], 8).check(HeadShape(8, 2, 8), 1)
    with pytest.raises(HeadError, match="separate"):
        head_shape(tiny_model("phi3"))
    data = random_plan(tiny_model("llama"), "hidden", "zero").to_dict()
    with pytest.raises(PlanError, match="head cut"):
        PrunePlan.from_dict({**data, "heads": {"query": [[0]]}})
