"""How a model calls its decoder layers: recorded once, replayed one layer at a time.

``capture_layer_calls`` runs the backbone over token batches with every decoder block
replaced by a ``_Recorder`` that notes what the block is called with and hands its hidden
states on unchanged. So the blocks themselves never run (their weights may still be on the
meta device), and what is recorded per layer is exactly what the model's own forward passes
it: the attention mask of that layer's type (sliding or full, as Gemma3 and Qwen2 choose per
layer), the position embeddings, position ids (a packed batch's restart at every sample, and
its masks keep each sample to itself: ``fbnprune.collect.packing``). Replaying block ``i`` on the
hidden states block ``i - 1`` produced, with these arguments, is the model's forward, one
block at a time (llm-compressor's sequential pipeline works the same way).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fbnprune.models.adapters import get_adapter

if TYPE_CHECKING:
    from transformers import PreTrainedModel

LayerCall = tuple[tuple[Any, ...], dict[str, Any]]
"""A block's call without its hidden states: the other positional arguments, and kwargs."""


@dataclass
class LayerCalls:
    """What the decoder blocks of one model were called with, per token batch.

    Attributes:
        inputs: per batch, the hidden states entering block 0, shape (batch, seq, d_model).
        calls: per batch, per block, its ``LayerCall``.
    """

    inputs: list[torch.Tensor]
    calls: list[list[LayerCall]]

    def replay(
        self, layer: nn.Module, index: int, batch: int, hidden: torch.Tensor
    ) -> torch.Tensor:
        """Block ``index`` (the module ``layer``) run on ``hidden`` for batch ``batch``."""
        args, kwargs = self.calls[batch][index]
        out = layer(hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out


class _Recorder(nn.Module):
    """Stands in for a block: records its call, returns its hidden states unchanged. Other
    attributes (e.g. ``attention_type``) are read from the block it replaces."""

    def __init__(self, block: nn.Module, sink: list[LayerCall]) -> None:
        super().__init__()
        self.block = block
        self.sink = sink

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.sink.append((tuple(args[1:]), kwargs))
        return hidden


@torch.inference_mode()
def capture_layer_calls(
    model: PreTrainedModel,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor] | Mapping[str, torch.Tensor]],
) -> LayerCalls:
    """Run ``model``'s backbone (embeddings and what precedes the blocks; the blocks are
    stood in for) over ``(input_ids, attention_mask)`` batches, or the backbone's keyword
    inputs (e.g. ``input_ids`` and ``position_ids`` of packed rows), on the device of its
    first parameter; return the blocks' inputs and calls."""
    adapter = get_adapter(model)
    blocks = adapter.get_layer_list(model)
    originals = list(blocks)
    device = next(model.parameters()).device
    inputs: list[torch.Tensor] = []
    calls: list[list[LayerCall]] = []
    current: list[LayerCall] = []
    first_inputs: list[torch.Tensor] = []

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        first_inputs.append(args[0] if args else kwargs["hidden_states"])

    recorders = [_Recorder(block, current) for block in originals]
    handle = recorders[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for i, recorder in enumerate(recorders):
            blocks[i] = recorder
        backbone = adapter.get_backbone(model)
        for batch in batches:
            if not isinstance(batch, Mapping):
                batch = {"input_ids": batch[0], "attention_mask": batch[1]}
            current.clear()
            first_inputs.clear()
            backbone(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
            inputs.append(first_inputs[0].detach())
            calls.append(list(current))
    finally:
        handle.remove()
        for i, block in enumerate(originals):
            blocks[i] = block
    return LayerCalls(inputs, calls)
