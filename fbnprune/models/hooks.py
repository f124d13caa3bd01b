"""Owned forward hooks on MLP sites: every handle is tracked and removed.

A *site* is where fbnprune reads or edits MLP neurons:
``hidden`` is the input of the down projection (one value per MLP unit) and ``output`` is the
output of the down projection (one value per d_model channel). Hook functions are bound per
layer with explicit arguments, never with a closure over a loop variable (the seed code's
late-binding bug made every layer use the last layer's mask).
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from fbnprune.models.adapters import MLPAdapter

SiteFn = Callable[[int, torch.Tensor], torch.Tensor | None]
"""Called as ``fn(layer_index, values)`` with values of shape (batch, seq, width); may return
replacement values of the same shape."""


class SiteHooks:
    """Context manager that attaches ``fn`` to the chosen site of every MLP layer."""

    def __init__(self, model: nn.Module, adapter: MLPAdapter, site: str, fn: SiteFn) -> None:
        if site not in ("hidden", "output"):
            raise ValueError(f"site must be 'hidden' or 'output', got {site!r}")
        self.model, self.adapter, self.site, self.fn = model, adapter, site, fn
        self.handles: list[RemovableHandle] = []

    def attach(self) -> SiteHooks:
        for index, layer in enumerate(self.adapter.get_layers(self.model)):
            self.handles.append(site_hook(self.adapter, layer, index, self.site, self.fn))
        return self

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def __enter__(self) -> SiteHooks:
        return self.attach()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()


class _PreHook:
    """Forward pre-hook on the down projection: sees and may replace its input."""

    def __init__(self, index: int, fn: SiteFn) -> None:
        self.index, self.fn = index, fn

    def __call__(self, module: nn.Module, args: tuple) -> tuple | None:
        new = self.fn(self.index, args[0])
        return None if new is None else (new, *args[1:])


class _PostHook:
    """Forward hook on the down projection: sees and may replace its output."""

    def __init__(self, index: int, fn: SiteFn) -> None:
        self.index, self.fn = index, fn

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        return self.fn(self.index, output)


def site_hook(
    adapter: MLPAdapter, layer: nn.Module, index: int, site: str, fn: SiteFn
) -> RemovableHandle:
    """Attach ``fn`` (called with ``index``) to the site of one decoder layer ``layer``."""
    down = adapter.get_down(layer)
    if site == "hidden":
        return down.register_forward_pre_hook(_PreHook(index, fn))
    return down.register_forward_hook(_PostHook(index, fn))


def site_widths(model: nn.Module, adapter: MLPAdapter, site: str) -> list[int]:
    """Number of neurons per layer at a site."""
    layers = adapter.get_layers(model)
    if site == "hidden":
        return [adapter.hidden_width(layer) for layer in layers]
    return [adapter.output_width(layer) for layer in layers]
