"""Mask == slice == saved-and-reloaded, for every adapter, site, fill and layout."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_batch, random_plan, real_logits, tiny_model
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from fbnprune.models.adapters import UnsupportedArchitectureError, get_adapter
from fbnprune.models.hooks import site_widths
from fbnprune.plan import PlanError, PrunePlan
from fbnprune.pruning.mask import masked
from fbnprune.pruning.slicing import COMPACT_KEY, SliceError, slice_model
from fbnprune.save.checkpoint import save_checkpoint

ATOL = 1e-5  # float32 logits of tiny models; measured differences are ~1e-7


@pytest.mark.parametrize("fill", ["zero", "mean", "reconstruct"])
@pytest.mark.parametrize("layout", ["padded", "compact"])
def test_mask_equals_slice_equals_reloaded(model_type, layout, fill, tmp_path):
    model = tiny_model(model_type)
    adapter = get_adapter(model)
    plan = random_plan(model, "hidden", fill)
    batch = random_batch()
    with masked(model, plan):
        reference = real_logits(model, batch)
    unpruned = real_logits(model, batch)
    assert (reference - unpruned).abs().max() > 1e-3, "the plan must change the model"

    if fill != "zero" and layout == "padded" and not adapter.can_hold_down_bias():
        with pytest.raises(SliceError, match="compact"):
            slice_model(copy.deepcopy(model), plan, layout=layout)
        return
    sliced = slice_model(copy.deepcopy(model), plan, layout=layout)
    torch.testing.assert_close(real_logits(sliced, batch), reference, atol=ATOL, rtol=0)

    layers = adapter.get_layers(sliced)
    widths = [adapter.hidden_width(layer) for layer in layers]
    if layout == "compact":
        assert widths == plan.kept_per_layer()
    else:
        assert widths == [max(plan.kept_per_layer())] * plan.n_layers
        assert adapter.config_width(sliced.config) == max(plan.kept_per_layer())

    save_checkpoint(sliced, None, tmp_path / "ckpt")
    reloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "ckpt", trust_remote_code=layout == "compact"
    ).eval()
    if layout == "padded":
        assert type(reloaded).__module__.startswith("transformers.")
        assert getattr(reloaded.config, COMPACT_KEY, None) is None
    torch.testing.assert_close(real_logits(reloaded, batch), reference, atol=ATOL, rtol=0)


def test_compact_families_keep_their_own_key_renamings(tmp_path):
    """Every compact class is named FbnpruneCompactForCausalLM, and transformers keys its
    checkpoint renamings by class name: gpt_neox's (embed_out <-> lm_head) must not leak
    into a llama compact built after it, nor llama's absence of one into gpt_neox. A
    compact model built from its config saves the key names of its checkpoint."""
    for model_type in ("gpt_neox", "llama"):
        model = tiny_model(model_type)
        sliced = slice_model(model, random_plan(model, "hidden", "mean"), layout="compact")
        save_checkpoint(sliced, None, tmp_path / model_type)
        AutoModelForCausalLM.from_pretrained(tmp_path / model_type, trust_remote_code=True)
    for model_type in ("llama", "gpt_neox", "llama"):
        config = AutoConfig.from_pretrained(tmp_path / model_type, trust_remote_code=True)
        built = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
        built.save_pretrained(tmp_path / "again")
        assert keys(tmp_path / "again") == keys(tmp_path / model_type), model_type


def keys(directory) -> set[str]:
    with safe_open(directory / "model.safetensors", "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("fill", ["zero", "mean"])
def test_output_site_mask_equals_zeroed_weights(model_type, fill):
    model = tiny_model(model_type)
    adapter = get_adapter(model)
    plan = random_plan(model, "output", fill)
    batch = random_batch()
    with masked(model, plan):
        reference = real_logits(model, batch)
    if fill == "mean" and not adapter.can_hold_down_bias():
        with pytest.raises(SliceError, match="cannot hold"):
            slice_model(copy.deepcopy(model), plan)
        return
    pruned = slice_model(copy.deepcopy(model), plan)
    assert site_widths(pruned, adapter, "output") == plan.layer_widths  # shapes are kept
    torch.testing.assert_close(real_logits(pruned, batch), reference, atol=ATOL, rtol=0)


def test_slice_keeps_exactly_the_planned_rows_and_columns():
    model = tiny_model("llama")
    plan = random_plan(model, "hidden", "zero")
    adapter = get_adapter(model)
    original = [
        (adapter.get_in_projs(layer)[1].weight.clone(), adapter.get_down(layer).weight.clone())
        for layer in adapter.get_layers(model)
    ]
    sliced = slice_model(copy.deepcopy(model), plan, layout="compact")
    for i, layer in enumerate(adapter.get_layers(sliced)):
        kept = torch.tensor(plan.kept[i])
        up, down = original[i]
        assert torch.equal(adapter.get_in_projs(layer)[1].weight, up[kept])
        assert torch.equal(adapter.get_down(layer).weight, down[:, kept])


def test_each_layer_uses_its_own_mask():
    """The seed code's late-binding bug applied the last layer's mask everywhere."""
    model = tiny_model("llama")
    adapter = get_adapter(model)
    widths = site_widths(model, adapter, "hidden")
    plan = PrunePlan(
        model="tiny",
        model_type="llama",
        site="hidden",
        fill="zero",
        layer_widths=widths,
        kept=[[0], list(range(widths[1])), [1, 2]],
    )
    seen: list[torch.Tensor] = []
    with masked(model, plan):  # observers registered after the mask hooks run after them
        hooks = [
            adapter.get_down(layer).register_forward_pre_hook(
                lambda mod, args, store=seen: store.append(args[0].detach().clone())
            )
            for layer in adapter.get_layers(model)
        ]
        real_logits(model, random_batch())
    for h in hooks:
        h.remove()
    assert (seen[0][..., 1:] == 0).all() and (seen[0][..., 0] != 0).any()
    assert (seen[1] != 0).float().mean() > 0.5  # layer 1 keeps everything
    assert (seen[2][..., [0, 3]] == 0).all() and (seen[2][..., 1:3] != 0).any()


def test_masked_context_restores_the_model():
    model = tiny_model("gpt2")
    plan = random_plan(model, "hidden", "mean")
    batch = random_batch()
    before = real_logits(model, batch)
    with masked(model, plan):
        real_logits(model, batch)
    torch.testing.assert_close(real_logits(model, batch), before, atol=0, rtol=0)


def test_plan_for_another_model_is_refused():
    plan = random_plan(tiny_model("llama"), "hidden", "zero")
    with pytest.raises(PlanError, match="plan is for a llama"):
        masked(tiny_model("gpt2"), plan)


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import AutoConfig

    config = AutoConfig.for_model("bert")
    with pytest.raises(UnsupportedArchitectureError, match="Supported: .*llama"):
        get_adapter(config)
