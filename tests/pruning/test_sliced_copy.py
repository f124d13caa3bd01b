"""``sliced_copy``: the slice of a deep copy, holding only the tensors it cuts anew."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_plan, tiny_model

from fbnprune.pruning.slicing import slice_model, sliced_copy


@pytest.mark.parametrize("site", ["hidden", "output"])
def test_a_sliced_copy_equals_a_deep_copys_slice_and_leaves_the_model_as_it_was(site):
    model = tiny_model("llama")
    plan = random_plan(model, site, "mean")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layout = "padded" if site == "output" else "compact"
    shared = sliced_copy(model, plan, layout=layout)
    alone = slice_model(copy.deepcopy(model), plan, layout=layout)
    want, got = alone.state_dict(), shared.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the embedding and attention are the model's own tensors, not copies
    assert shared.model.embed_tokens.weight is model.model.embed_tokens.weight
    q = shared.model.layers[0].self_attn.q_proj.weight
    assert q is model.model.layers[0].self_attn.q_proj.weight
    down = shared.model.layers[0].mlp.down_proj.weight
    assert down is not model.model.layers[0].mlp.down_proj.weight  # cut: its own
    assert shared.config is not model.config
