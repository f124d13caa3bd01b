"""Mask: apply a PrunePlan with reversible hooks, leaving the weights untouched.

Inside ``masked(model, plan)`` every dropped unit (or output channel) is replaced by its fill
value (zero or calibration mean); with ``fill: reconstruct`` dropped units read zero and a
second hook adds the refit's correction ``(V - W_K) h_K + c`` to the down projection's output.
Leaving the block removes the hooks. A masked model is the reference that a sliced model must
reproduce.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from fbnprune.models.adapters import MLPAdapter, get_adapter
from fbnprune.models.hooks import SiteHooks, site_hook, site_widths
from fbnprune.models.onload import down_weight, down_weights
from fbnprune.plan import PrunePlan
from fbnprune.pruning.depth import skipped_blocks
from fbnprune.pruning.heads import masked_heads

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class _Replace:
    """Per-layer replacement of dropped values; tensors are bound per layer, not by closure."""

    def __init__(self, keep: list[torch.Tensor], fill: list[torch.Tensor]) -> None:
        self.keep, self.fill = keep, fill

    def __call__(self, layer: int, values: torch.Tensor) -> torch.Tensor:
        keep = self.keep[layer].to(values.device)
        fill = self.fill[layer].to(device=values.device, dtype=values.dtype)
        return torch.where(keep, values, fill)


class _RefitCorrection:
    """Adds ``h_K @ (V - W_K)^T + c`` to a down projection's output (float64 deltas, cast
    to the activations' dtype), given the down projection's input ``h``."""

    def __init__(self, downs: dict[int, np.ndarray], plan: PrunePlan) -> None:
        """``downs``: the down projections (float64 (d_model, units)) of the layers hooked."""
        assert plan.refit is not None
        self.kept = [torch.tensor(k, dtype=torch.long) for k in plan.kept]
        self.delta = {
            i: plan.refit.weights[i].double() - torch.from_numpy(w[:, plan.kept[i]])
            for i, w in downs.items()
        }
        self.bias = [b.double() for b in plan.refit.biases]

    def __call__(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        kept = hidden.index_select(-1, self.kept[layer].to(hidden.device))
        delta = self.delta[layer].to(device=hidden.device, dtype=hidden.dtype)
        bias = self.bias[layer].to(device=hidden.device, dtype=hidden.dtype)
        return kept @ delta.T + bias


class _CorrectionHook:
    def __init__(self, index: int, correction: _RefitCorrection) -> None:
        self.index, self.correction = index, correction

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + self.correction(self.index, args[0])


@contextlib.contextmanager
def _refit_hooks(model: PreTrainedModel, adapter: MLPAdapter, plan: PrunePlan) -> Iterator[None]:
    correction = _RefitCorrection(dict(enumerate(down_weights(model))), plan)
    handles = [
        adapter.get_down(layer).register_forward_hook(_CorrectionHook(i, correction))
        for i, layer in enumerate(adapter.get_layers(model))
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def masked(model: PreTrainedModel, plan: PrunePlan) -> Masked:
    """Context manager: ``model`` behaves as pruned by ``plan`` until the block exits.
    A plan that does not fit the model is refused here, before any hook is attached."""
    adapter = get_adapter(model)
    plan.check_fits(site_widths(model, adapter, plan.site), model.config.model_type)
    keep = [plan.keep_mask(i) for i in range(plan.n_layers)]
    fill = [plan.fill_tensor(i) for i in range(plan.n_layers)]
    hooks: list[contextlib.AbstractContextManager] = [
        SiteHooks(model, adapter, plan.site, _Replace(keep, fill))
    ]
    if plan.fill == "reconstruct":
        hooks.append(_refit_hooks(model, adapter, plan))
    heads = plan.head_cut()
    if heads is not None:
        hooks.append(masked_heads(model, heads))
    if plan.dropped_layers:
        hooks.append(skipped_blocks(model, plan.dropped_layers))
    return Masked(hooks)


@contextlib.contextmanager
def masked_layer(
    adapter: MLPAdapter, layer: nn.Module, index: int, plan: PrunePlan
) -> Iterator[None]:
    """Context manager: decoder block ``layer`` (number ``index``) behaves as ``plan`` prunes
    it (``masked`` for one block, e.g. one onloaded from a checkpoint)."""
    keep = [plan.keep_mask(i) for i in range(plan.n_layers)]
    fill = [plan.fill_tensor(i) for i in range(plan.n_layers)]
    handles = [site_hook(adapter, layer, index, plan.site, _Replace(keep, fill))]
    if plan.fill == "reconstruct":
        correction = _RefitCorrection({index: down_weight(adapter, layer)}, plan)
        hook = _CorrectionHook(index, correction)
        handles.append(adapter.get_down(layer).register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class Masked:
    """The hooks of one ``masked`` call: attached on entry, in order, removed on exit."""

    def __init__(self, hooks: list[contextlib.AbstractContextManager]) -> None:
        self.hooks = hooks
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Masked:
        for hook in self.hooks:
            self._stack.enter_context(hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
