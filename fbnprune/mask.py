"""Mask: apply a PrunePlan with reversible hooks, leaving the weights untouched.

Inside ``masked(model, plan)`` every dropped unit (or output channel) is replaced by its fill
value (zero or calibration mean); leaving the block removes the hooks. A masked model is the
reference that a sliced model must reproduce.
"""

from __future__ import annotations

import torch
from torch import nn

from fbnprune.adapters import get_adapter
from fbnprune.hooks import SiteHooks, site_widths
from fbnprune.plan import PrunePlan


class _Replace:
    """Per-layer replacement of dropped values; tensors are bound per layer, not by closure."""

    def __init__(self, keep: list[torch.Tensor], fill: list[torch.Tensor]) -> None:
        self.keep, self.fill = keep, fill

    def __call__(self, layer: int, values: torch.Tensor) -> torch.Tensor:
        keep = self.keep[layer].to(values.device)
        fill = self.fill[layer].to(device=values.device, dtype=values.dtype)
        return torch.where(keep, values, fill)


def masked(model: nn.Module, plan: PrunePlan) -> SiteHooks:
    """Context manager: ``model`` behaves as pruned by ``plan`` until the block exits."""
    adapter = get_adapter(model)
    plan.check_fits(site_widths(model, adapter, plan.site), model.config.model_type)
    keep = [plan.keep_mask(i) for i in range(plan.n_layers)]
    fill = [plan.fill_tensor(i) for i in range(plan.n_layers)]
    return SiteHooks(model, adapter, plan.site, _Replace(keep, fill))
