"""The check's float64 proof: MLP by MLP (an MLP-only plan) and by whole models (the same
figures' verdict), both failing on a wrong slice."""

from __future__ import annotations

import pytest
import torch
from conftest import random_plan, tiny_model, tiny_tokenizer

import fbnprune.check.layer_check as layer_check
import fbnprune.pruning.slicing as slicing
from fbnprune.check.stage import exactness, whole_model_exactness

TEXTS = ["the cat sat on the mat", "a b c d e f", "numbers 1 2 3 and more words here"]
INPUTS = {"tokenizer": tiny_tokenizer(), "prompts": TEXTS, "max_length": 16, "atol": 1e-9}


def _wrong_slice(real):
    """``slice_layer`` that then halves layer 0's down projection (a wrong slice)."""

    def wrong(adapter, layer, plan, index, **kwargs):
        real(adapter, layer, plan, index, **kwargs)
        if index == 0:
            with torch.no_grad():
                adapter.get_down(layer).weight.mul_(0.5)

    return wrong


@pytest.mark.parametrize("fill", ["zero", "mean", "reconstruct"])
def test_mlp_by_mlp_and_whole_models_both_prove_a_right_slice_and_fail_a_wrong_one(
    model_type, fill, monkeypatch
):
    model = tiny_model(model_type)
    plan = random_plan(model, "hidden", fill)
    layouts = ["padded", "compact"] if fill == "zero" else ["compact"]  # a bias: compact
    before = {k: v.clone() for k, v in model.state_dict().items()}
    blockwise = exactness(model, plan, layouts, vocabulary=None, **INPUTS)
    whole = whole_model_exactness(model, plan, layouts, **INPUTS)
    assert blockwise.reference == "masked (MLP by MLP)" and whole.reference == "masked"
    assert blockwise.dtype == whole.dtype == "float64" and blockwise.n_tokens == whole.n_tokens
    for report in (blockwise, whole):
        assert [c.name for c in report.comparisons] == [f"sliced-{lay}" for lay in layouts]
        assert report.passed and all(c.max_abs <= 1e-9 for c in report.comparisons)
    # neither path wrote the model it proved
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    monkeypatch.setattr(layer_check, "slice_layer", _wrong_slice(slicing.slice_layer))
    monkeypatch.setattr(slicing, "slice_layer", _wrong_slice(slicing.slice_layer))
    for report in (
        exactness(model, plan, layouts, vocabulary=None, **INPUTS),
        whole_model_exactness(model, plan, layouts, **INPUTS),
    ):
        assert not report.passed and all(c.max_abs > 1e-6 for c in report.comparisons)
