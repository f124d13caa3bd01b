"""The model cut to a ``HeadCut`` (``fbnprune.head_cut``): attention heads masked or sliced.

``masked_heads`` zeroes the dropped heads' outputs at the input
of the output projection (the masked reference: a dropped group serves only dropped heads);
``slice_heads`` keeps their rows of q/k/v (and biases) and columns of o. Families with
separate ``q_proj``/``k_proj``/``v_proj``/``o_proj`` under ``self_attn`` (Llama, Mistral,
Qwen2, Gemma 3) are supported; fused projections (Phi-3, GPT-2, GPT-NeoX) are refused.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fbnprune.head_cut import HeadCut, HeadError, HeadShape
from fbnprune.models.adapters import get_adapter

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

ATTENTION = "self_attn"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def attentions(model: PreTrainedModel) -> list[Any]:
    """Every decoder block's attention module; ``HeadError`` for an unsupported family."""
    blocks = get_adapter(model).get_layers(model)
    out: list[Any] = []  # family modules: q_proj ... o_proj, head_dim, num_key_value_groups
    for block in blocks:
        attention = getattr(block, ATTENTION, None)
        if attention is None or not all(hasattr(attention, p) for p in PROJECTIONS):
            raise HeadError(
                f"{model.config.model_type}: attention heads are cut only where q_proj, k_proj, "
                "v_proj and o_proj are separate (Llama, Mistral, Qwen2, Gemma 3)"
            )
        out.append(attention)
    return out


def head_shape(model: PreTrainedModel) -> HeadShape:
    """The model's attention shape, read from its first block's projections."""
    attention = attentions(model)[0]
    head_dim = int(attention.head_dim)
    query = attention.q_proj.weight.shape[0] // head_dim
    groups = attention.k_proj.weight.shape[0] // head_dim
    return HeadShape(query, groups, head_dim)


class _ZeroDropped:
    """A pre-hook on ``o_proj``: the dropped query heads' outputs read zero."""

    def __init__(self, keep: torch.Tensor) -> None:
        self.keep = keep  # (query heads * head_dim,) bool

    def __call__(self, _: nn.Module, args: tuple) -> tuple:
        values = args[0]
        keep = self.keep.to(values.device)
        return (values * keep.to(values.dtype), *args[1:])


def _dims(heads: list[int], head_dim: int) -> torch.Tensor:
    """The channels of ``heads`` in a (heads * head_dim) projection."""
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


@contextlib.contextmanager
def masked_heads(model: PreTrainedModel, cut: HeadCut) -> Iterator[None]:
    """Inside the block, the dropped query heads of every layer contribute nothing."""
    modules = attentions(model)
    shape = head_shape(model)
    cut.check(shape, len(modules))
    handles = []
    for attention, query in zip(modules, cut.query, strict=True):
        keep = torch.zeros(shape.query * shape.head_dim, dtype=torch.bool)
        keep[_dims(query, shape.head_dim)] = True
        handles.append(attention.o_proj.register_forward_pre_hook(_ZeroDropped(keep)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def slice_heads(model: PreTrainedModel, cut: HeadCut) -> PreTrainedModel:
    """Keep only the cut's heads (in place): rows of q/k/v, columns of o, the config's head
    counts and the modules' grouping; return the model."""
    modules = attentions(model)
    shape = head_shape(model)
    cut.check(shape, len(modules))
    for attention, query, groups in zip(modules, cut.query, cut.groups, strict=True):
        q_dims, kv_dims = _dims(query, shape.head_dim), _dims(groups, shape.head_dim)
        attention.q_proj = _kept(attention.q_proj, q_dims, dim=0)
        attention.k_proj = _kept(attention.k_proj, kv_dims, dim=0)
        attention.v_proj = _kept(attention.v_proj, kv_dims, dim=0)
        attention.o_proj = _kept(attention.o_proj, q_dims, dim=1)
        attention.num_key_value_groups = len(query) // len(groups)
    config = model.config.get_text_config()
    config.head_dim = shape.head_dim  # no longer hidden_size / num_attention_heads
    config.num_attention_heads = len(cut.query[0])
    config.num_key_value_heads = len(cut.groups[0])
    logger.info(
        "config: %d -> %d query heads, %d -> %d key-value groups per layer",
        shape.query,
        len(cut.query[0]),
        shape.groups,
        len(cut.groups[0]),
    )
    return model


def _kept(linear: nn.Linear, index: torch.Tensor, *, dim: int) -> nn.Linear:
    """A copy of ``linear`` with only ``index`` of its outputs (``dim=0``: rows, and their
    bias) or of its inputs (``dim=1``: columns, the bias whole)."""
    weight = linear.weight.detach().index_select(dim, index.to(linear.weight.device))
    bias: torch.Tensor | None = linear.bias
    if bias is not None and dim == 0:
        bias = bias.detach().index_select(0, index.to(bias.device))
    new = nn.Linear(
        weight.shape[1],
        weight.shape[0],
        bias=bias is not None,
        dtype=weight.dtype,
        device=weight.device,
    )
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new
