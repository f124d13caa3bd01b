"""Slice: apply a PrunePlan by building new, smaller MLP weights.

For the ``hidden`` site, dropping unit ``i`` deletes row ``i`` of the input projections
(gate/up, fused gate_up, or GPT-2's ``c_fc``; with their biases) and column ``i`` of the down
projection. A dropped unit with a non-zero fill value contributes the constant
``W_down[:, i] * fill_i``, which is folded into the down projection's bias. With ``fill:
reconstruct`` the kept columns of the down projection are the plan's refit ``V`` and the
refit's ``c`` is added to its bias (``fbnprune.select.refit``).

Layouts:
- ``padded``: every layer is padded with zero units to the widest kept layer, so one stock
  ``intermediate_size`` describes the model; zero units contribute exactly nothing.
- ``compact``: each layer has exactly its kept width; the config carries the widths in
  ``fbnprune_compact`` and loading needs the modeling file written by ``save``.

For the ``output`` site no architecture can drop a d_model channel, so shapes are kept:
the channel's row of the down projection is zeroed and its bias set to the fill value.
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

from fbnprune.errors import FbnpruneError
from fbnprune.models.adapters import MLPAdapter, Projection, get_adapter
from fbnprune.models.hooks import site_widths
from fbnprune.models.loading import COMPACT_KEY
from fbnprune.plan import PrunePlan
from fbnprune.pruning.depth import drop_blocks
from fbnprune.pruning.embedding import trim_model
from fbnprune.pruning.heads import slice_heads

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


class SliceError(FbnpruneError, ValueError):
    """A plan that cannot be sliced as asked."""


def slice_model(
    model: PreTrainedModel, plan: PrunePlan, *, layout: str = "padded"
) -> PreTrainedModel:
    """Slice ``model`` in place according to ``plan`` and return it.

    Args:
        model: a causal LM of a supported family; its weights are replaced.
        plan: the plan; must fit the model.
        layout: ``padded`` or ``compact`` (hidden site only).

    A plan with a vocabulary cut also keeps only its tokens' embedding and LM-head rows
    (``fbnprune.pruning.embedding``); one with a head cut keeps only those attention heads
    (``fbnprune.pruning.heads``); one with dropped layers removes those decoder blocks
    (``fbnprune.pruning.depth``).
    """
    adapter = get_adapter(model)
    plan.check_fits(site_widths(model, adapter, plan.site), model.config.model_type)
    check_sliceable(adapter, plan, layout)
    for index, layer in enumerate(adapter.get_layers(model)):
        slice_layer(adapter, layer, plan, index, layout=layout)
    slice_config(model.config, adapter, plan, layout=layout)
    vocab = plan.kept_vocabulary()
    if vocab is not None:
        trim_model(model, vocab)
    heads = plan.head_cut()
    if heads is not None:
        slice_heads(model, heads)
    if plan.dropped_layers:
        drop_blocks(model, plan.dropped_layers)
    return model


def sliced_copy(
    model: PreTrainedModel, plan: PrunePlan, *, layout: str = "padded"
) -> PreTrainedModel:
    """``model`` sliced by ``plan`` into a new model that shares every tensor the plan leaves
    as it is (embeddings, attention, norms: a copy of the modules and config, not of their
    weights), for inference only: training it would write the shared tensors. The slice
    replaces what it cuts with new tensors; at the output site it zeroes MLP rows in place,
    so the MLPs' tensors are then copied."""
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    if plan.site == "output":
        adapter = get_adapter(model)
        for layer in adapter.get_layers(model):
            for t in adapter.get_mlp(layer).state_dict(keep_vars=True).values():
                shared.pop(id(t), None)
    return slice_model(copy.deepcopy(model, memo=shared), plan, layout=layout)


def check_sliceable(adapter: MLPAdapter, plan: PrunePlan, layout: str) -> None:
    """Raise unless ``plan`` can be sliced into a model of this family in ``layout``."""
    if layout not in ("padded", "compact"):
        raise SliceError(f"layout must be 'padded' or 'compact', got {layout!r}")
    needs_bias = plan.adds_bias and not adapter.always_bias
    if plan.site == "output" and plan.fill == "reconstruct":
        raise SliceError("fill 'reconstruct' refits the down projection's inputs: site 'hidden'")
    if plan.site == "output" and needs_bias and adapter.bias_key is None:
        raise SliceError(_no_bias_message(adapter, "output"))
    if plan.site == "hidden" and needs_bias and layout == "padded" and adapter.bias_key is None:
        raise SliceError(_no_bias_message(adapter, "hidden"))


def slice_layer(
    adapter: MLPAdapter, layer: nn.Module, plan: PrunePlan, index: int, *, layout: str
) -> None:
    """Slice decoder block ``layer`` (number ``index``) in place (``slice_model`` does every
    block, then ``slice_config``; a streaming writer does one block at a time)."""
    if plan.site == "output":
        _zero_output_channels(adapter, layer, plan, index)
    else:
        _slice_hidden_units(adapter, layer, plan, index, layout)


def slice_config(
    config: PretrainedConfig, adapter: MLPAdapter, plan: PrunePlan, *, layout: str
) -> None:
    """The config of the sliced model (widths, bias switch, compact spec), in place."""
    if plan.site == "output":
        if plan.adds_bias and not adapter.always_bias:
            assert adapter.bias_key is not None  # check_sliceable refuses the plan otherwise
            setattr(config, adapter.bias_key, True)
            logger.info("config.%s: -> True (bias holds the channel means)", adapter.bias_key)
        return
    kept_widths = plan.kept_per_layer()
    width = max(kept_widths)
    old = adapter.config_width(config)
    setattr(config, adapter.width_key, width)
    logger.info("config.%s: %d -> %d", adapter.width_key, old, width)
    # the config's bias switch turned on, so the stock (padded) model holds the fill's bias
    bias_key = adapter.bias_key if _uses_bias_key(adapter, plan, layout) else None
    if bias_key is not None:
        logger.info("config.%s: %s -> True", bias_key, getattr(config, bias_key))
        setattr(config, bias_key, True)
    if layout == "compact":
        down_bias = plan.adds_bias and not adapter.always_bias
        setattr(config, COMPACT_KEY, compact_spec(adapter, kept_widths, down_bias))
        logger.info("config.%s: per-layer widths %s", COMPACT_KEY, kept_widths)


def _uses_bias_key(adapter: MLPAdapter, plan: PrunePlan, layout: str) -> bool:
    return plan.adds_bias and adapter.bias_key is not None and layout == "padded"


def compact_spec(adapter: MLPAdapter, widths: list[int], down_bias: bool) -> dict:
    """What the compact modeling file needs to rebuild the per-layer MLP shapes."""
    return {
        "layers": f"{adapter.backbone}.{adapter.layers}",
        "mlp": adapter.mlp,
        "in_projs": list(adapter.in_projs),
        "down": adapter.down,
        "fused_gate_up": adapter.fused_gate_up,
        "conv1d": adapter.conv1d,
        "widths": widths,
        "down_bias": down_bias,
    }


def _no_bias_message(adapter: MLPAdapter, site: str) -> str:
    what = "layout 'compact' or " if site == "hidden" else ""
    return (
        f"fill 'mean' and 'reconstruct' add a constant to the down-projection bias, which stock "
        f"{adapter.family} configs cannot hold; use {what}fill 'zero'"
    )


def _slice_hidden_units(
    adapter: MLPAdapter, layer: nn.Module, plan: PrunePlan, index: int, layout: str
) -> None:
    use_bias_key = _uses_bias_key(adapter, plan, layout)
    kept = torch.tensor(plan.kept[index], dtype=torch.long)
    target = max(plan.kept_per_layer()) if layout == "padded" else len(kept)
    mlp = adapter.get_mlp(layer)
    down = adapter.get_down(layer)
    shift = _fill_shift(adapter, down, plan, index)
    for name, proj in zip(adapter.in_projs, adapter.get_in_projs(layer), strict=True):
        setattr(mlp, name, _sliced_in_proj(adapter, proj, kept, target, add_bias=use_bias_key))
    columns = None if plan.refit is None else plan.refit.weights[index]
    new_down = _sliced_down(adapter, down, kept, target, shift, plan.adds_bias, columns)
    setattr(mlp, adapter.down, new_down)


def _fill_shift(adapter: MLPAdapter, down: Projection, plan: PrunePlan, index: int) -> torch.Tensor:
    """The constant added to the down projection's output: ``W_down[:, dropped] @
    fill[dropped]`` (mean fill), the refit's bias (reconstruct), or zeros."""
    weight = down.weight.detach().double()
    if adapter.conv1d:
        weight = weight.T  # Conv1D stores (in, out)
    if plan.refit is not None:
        return plan.refit.biases[index].double().to(weight.device)
    fill = plan.fill_tensor(index).double()
    fill[plan.keep_mask(index)] = 0.0
    return weight @ fill.to(weight.device)  # (d_model,)


def _new_linear_like(
    adapter: MLPAdapter, ref: Projection, n_in: int, n_out: int, bias: bool
) -> Projection:
    dtype, device = ref.weight.dtype, ref.weight.device
    if adapter.conv1d:
        module = Conv1D(n_out, n_in)
        return module.to(dtype=dtype, device=device)
    return nn.Linear(n_in, n_out, bias=bias, dtype=dtype, device=device)


def _take_units(values: torch.Tensor, kept: torch.Tensor, target: int, dim: int) -> torch.Tensor:
    """Select ``kept`` along ``dim`` and zero-pad that dimension to ``target``."""
    taken = values.index_select(dim, kept.to(values.device))
    pad = target - taken.shape[dim]
    if pad == 0:
        return taken
    shape = list(taken.shape)
    shape[dim] = pad
    return torch.cat([taken, taken.new_zeros(shape)], dim=dim)


def _sliced_in_proj(
    adapter: MLPAdapter, proj: Projection, kept: torch.Tensor, target: int, add_bias: bool
) -> Projection:
    weight = proj.weight.detach()
    bias = proj.bias.detach() if proj.bias is not None else None
    unit_dim = 1 if adapter.conv1d else 0
    if adapter.fused_gate_up:
        half = weight.shape[0] // 2
        pieces = [weight[:half], weight[half:]]
        new_w = torch.cat([_take_units(p, kept, target, 0) for p in pieces], dim=0)
        new_b = None
        if bias is not None:
            new_b = torch.cat([_take_units(b, kept, target, 0) for b in (bias[:half], bias[half:])])
        n_out = 2 * target
    else:
        new_w = _take_units(weight, kept, target, unit_dim)
        new_b = _take_units(bias, kept, target, 0) if bias is not None else None
        n_out = target
    if new_b is None and add_bias:
        new_b = weight.new_zeros(n_out)
    n_in = weight.shape[0] if adapter.conv1d else weight.shape[1]
    module = _new_linear_like(adapter, proj, n_in, n_out, bias=new_b is not None)
    with torch.no_grad():
        module.weight.copy_(new_w)
        if new_b is not None:
            module.bias.copy_(new_b)
    return module


def _sliced_down(
    adapter: MLPAdapter,
    down: Projection,
    kept: torch.Tensor,
    target: int,
    shift: torch.Tensor,
    add_bias: bool,
    columns: torch.Tensor | None = None,
) -> Projection:
    """The sliced down projection; ``columns`` (d_model, n_kept) replace the kept columns."""
    weight = down.weight.detach()
    unit_dim = 0 if adapter.conv1d else 1
    if columns is not None:
        refit = columns.to(device=weight.device, dtype=weight.dtype)
        refit = refit.T if adapter.conv1d else refit
        new_w = _take_units(refit, torch.arange(len(kept)), target, unit_dim)
    else:
        new_w = _take_units(weight, kept, target, unit_dim)
    n_out = weight.shape[1] if adapter.conv1d else weight.shape[0]
    bias = down.bias.detach().double() if down.bias is not None else None
    if add_bias or bias is not None:
        bias = (bias if bias is not None else shift.new_zeros(n_out)) + shift.to(weight.device)
    module = _new_linear_like(adapter, down, target, n_out, bias=bias is not None)
    with torch.no_grad():
        module.weight.copy_(new_w)
        if bias is not None:
            module.bias.copy_(bias.to(weight.dtype))
    return module


def _zero_output_channels(
    adapter: MLPAdapter, layer: nn.Module, plan: PrunePlan, index: int
) -> None:
    """Output site: zero dropped channels' down-projection rows; bias = fill value."""
    needs_bias = plan.adds_bias and not adapter.always_bias
    dropped = ~plan.keep_mask(index)
    fill = plan.fill_tensor(index)
    mlp = adapter.get_mlp(layer)
    down = adapter.get_down(layer)
    if needs_bias:
        for name, proj in zip(adapter.in_projs, adapter.get_in_projs(layer), strict=True):
            if proj.bias is None:
                setattr(mlp, name, _with_zero_bias(proj))
        down = _with_zero_bias(down)
        setattr(mlp, adapter.down, down)
    with torch.no_grad():
        if adapter.conv1d:
            down.weight[:, dropped] = 0.0
        else:
            down.weight[dropped, :] = 0.0
        if down.bias is not None:
            down.bias[dropped] = fill[dropped].to(down.bias.dtype)


def _with_zero_bias(linear: Projection) -> Projection:
    if linear.bias is not None:
        return linear
    w = linear.weight
    module = nn.Linear(w.shape[1], w.shape[0], bias=True, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        module.weight.copy_(w)
        module.bias.zero_()
    return module
