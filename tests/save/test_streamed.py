"""A sliced checkpoint streamed one decoder layer at a time from the original's safetensors
equals ``slice_model`` + ``save_checkpoint``'s: the same tensor names, every tensor equal
bit for bit, the same config; it loads with stock transformers (padded) or its modeling file
(compact) and gives the same logits. The per-layer parity check (``scale.layer_check``,
float64, on the float32 checkpoint) passes it within 1e-6 (measured <= 1.2e-7: the float32
rounding of the bias and refit columns) and fails a slice of another plan (> 1e-3)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    checkpoint_config,
    checkpoint_tensors,
    random_batch,
    random_plan,
    real_logits,
    tiny_model,
    tiny_tokenizer,
)
from transformers import AutoModelForCausalLM

from fbnprune.check.layer_check import layerwise_parity, saved_tensors_parity, slicing_parity
from fbnprune.models.adapters import get_adapter
from fbnprune.pruning.slicing import SliceError, slice_model
from fbnprune.rundir.layout import LAYOUTS
from fbnprune.save.checkpoint import save_checkpoint
from fbnprune.save.streamed import save_sliced_layerwise

TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world", "a stitch in time"]


@pytest.mark.parametrize(
    ("site", "fill", "layout"),
    [
        ("hidden", "mean", "padded"),
        ("hidden", "reconstruct", "compact"),
        ("hidden", "zero", "padded"),
        ("output", "mean", "padded"),
    ],
)
def test_streamed_checkpoint_equals_the_in_memory_one(model_type, site, fill, layout, tmp_path):
    model = tiny_model(model_type)
    model.save_pretrained(tmp_path / "original", max_shard_size="40KB")
    plan = random_plan(model, site, fill)
    adapter = get_adapter(model)
    if (
        fill != "zero"
        and (layout == "padded" or site == "output")
        and not adapter.can_hold_down_bias()
    ):
        with pytest.raises(SliceError):
            save_sliced_layerwise(tmp_path / "original", plan, tmp_path / "streamed", layout=layout)
        return
    sliced = slice_model(copy.deepcopy(model), plan, layout=layout).eval()
    save_checkpoint(sliced, None, tmp_path / "memory")
    save_sliced_layerwise(tmp_path / "original", plan, tmp_path / "streamed", layout=layout)
    want, got = checkpoint_tensors(tmp_path / "memory"), checkpoint_tensors(tmp_path / "streamed")
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    assert checkpoint_config(tmp_path / "streamed") == checkpoint_config(tmp_path / "memory")
    reloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "streamed", trust_remote_code=layout == "compact"
    ).eval()
    batch = random_batch()
    torch.testing.assert_close(
        real_logits(reloaded, batch), real_logits(sliced, batch), atol=0, rtol=0
    )
    # the per-layer check passes it, and fails the slice of another plan
    parity = layerwise_parity(
        tmp_path / "original", tmp_path / "streamed", plan, tiny_tokenizer(), TEXTS, atol=1e-6
    )
    assert parity.passed and len(parity.layers) == plan.n_layers, parity
    other = random_plan(model, site, fill, seed=2)
    save_sliced_layerwise(tmp_path / "original", other, tmp_path / "other", layout=layout)
    wrong = layerwise_parity(
        tmp_path / "original", tmp_path / "other", plan, tiny_tokenizer(), TEXTS, atol=1e-6
    )
    assert not wrong.passed and wrong.layers[0] > 1e-3


@pytest.mark.parametrize(("site", "fill"), [("hidden", "mean"), ("hidden", "reconstruct")])
def test_streamed_check_proves_the_slice_and_the_saved_bytes(model_type, site, fill, tmp_path):
    """float64 block by block, every layout sliced in memory against the masked block:
    rounding only (<= 1e-10); the saved checkpoints' tensors against the slice in float32:
    exactly 0. The checkpoint of another plan fails."""
    model = tiny_model(model_type)
    model.save_pretrained(tmp_path / "original", max_shard_size="40KB")
    plan = random_plan(model, site, fill)
    layouts = ["compact"] if not get_adapter(model).can_hold_down_bias() else LAYOUTS
    exact = slicing_parity(tmp_path / "original", plan, layouts, tiny_tokenizer(), TEXTS)
    assert [c.name for c in exact.comparisons] == [f"sliced-{layout}" for layout in layouts]
    assert exact.passed and exact.dtype == "float64" and exact.n_tokens > 0
    assert max(c.max_abs for c in exact.comparisons) <= 1e-10, exact.table()
    saved = {}
    for layout in layouts:
        saved[layout] = tmp_path / layout
        save_sliced_layerwise(tmp_path / "original", plan, saved[layout], layout=layout)
    bytes_ = saved_tensors_parity(tmp_path / "original", saved, plan)
    assert bytes_.passed and all(c.max_abs == 0 for c in bytes_.comparisons), bytes_.table()
    # the check fails the checkpoint of another plan
    other = random_plan(model, site, fill, seed=2)
    save_sliced_layerwise(tmp_path / "original", other, tmp_path / "other", layout=layouts[0])
    wrong = saved_tensors_parity(tmp_path / "original", {layouts[0]: tmp_path / "other"}, plan)
    assert not wrong.passed and wrong.comparisons[0].max_abs > 1e-3


@pytest.mark.parametrize("site", ["hidden", "output"])
def test_a_sliced_mlp_leaves_its_block_as_it_was(site):
    """The check's candidates share the block's weights: slicing one replaces only its own
    projections (hidden site) or works on a copy (output site, which zeroes in place)."""
    from fbnprune.check.layer_check import _sliced_mlp

    model = tiny_model("llama")
    adapter = get_adapter(model)
    block = adapter.get_layers(model)[1]
    before = {k: v.clone() for k, v in block.state_dict().items()}
    modules = dict(adapter.get_mlp(block).named_children())
    mlp = _sliced_mlp(adapter, block, random_plan(model, site, "mean"), 1, "padded")
    assert mlp is not adapter.get_mlp(block)
    assert dict(adapter.get_mlp(block).named_children()) == modules
    assert all(torch.equal(block.state_dict()[k], v) for k, v in before.items())


def test_streamed_check_fails_a_wrong_slice(tmp_path, monkeypatch):
    """A slicing bug (the last kept unit of every layer taken from its neighbour) shows in
    the float64 block comparison, in the layer that holds it."""
    import fbnprune.check.layer_check as layer_check

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "original")
    plan = random_plan(model, "hidden", "mean")
    real = layer_check.slice_layer

    def off_by_one(adapter, layer, plan_, index, *, layout):
        shifted = copy.deepcopy(plan_)
        shifted.kept[index] = [*plan_.kept[index][:-1], (plan_.kept[index][-1] + 1) % 48]
        real(adapter, layer, shifted, index, layout=layout)

    monkeypatch.setattr(layer_check, "slice_layer", off_by_one)
    wrong = slicing_parity(tmp_path / "original", plan, ["padded"], tiny_tokenizer(), TEXTS)
    assert not wrong.passed and wrong.comparisons[0].max_abs > 1e-4, wrong.table()
