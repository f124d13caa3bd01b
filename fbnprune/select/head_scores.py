"""Which attention heads to keep (``select.attention_heads``): the ones that write most.

A query head's score is what it adds to the residual stream on the calibration prompts: the
mean square of its output (the input of ``o_proj`` at its channels, over real tokens) times
the squared norm of its ``o_proj`` columns (the magnitude baseline of FLAP and Wanda, for
heads). A key-value group scores the sum of its query heads. ``choose_heads`` keeps, in every
layer, the same number of query heads: whole groups when the count is a multiple of the heads
per group (the best groups), else every group with an equal share of its best heads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fbnprune.collect.activations import token_batches
from fbnprune.head_cut import HeadCut, HeadError, HeadShape
from fbnprune.pruning.heads import attentions, head_shape

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@torch.inference_mode()
def head_scores(
    model: PreTrainedModel,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_length: int = 256,
    batch_size: int = 8,
    progress: bool = False,
) -> list[np.ndarray]:
    """Per layer, every query head's score (float64, shape (query heads,))."""
    modules = attentions(model)
    shape = head_shape(model)
    sums = [torch.zeros(shape.query, dtype=torch.float64) for _ in modules]
    mask: list[torch.Tensor] = []  # the real tokens of the batch running

    def hook(index: int) -> Any:
        def record(_: Any, args: tuple) -> None:
            values = args[0][mask[0].bool()].double()  # (real tokens, heads * head_dim)
            heads = values.reshape(len(values), shape.query, shape.head_dim)
            sums[index] += heads.pow(2).sum(dim=(0, 2)).cpu()

        return record

    handles = [m.o_proj.register_forward_pre_hook(hook(i)) for i, m in enumerate(modules)]
    tokens = 0
    try:
        batches = token_batches(tokenizer, prompts, max_length, batch_size)
        device = next(model.parameters()).device
        for input_ids, attention in tqdm(batches, desc="select: heads", disable=not progress):
            mask[:] = [attention.to(device)]
            model(input_ids=input_ids.to(device), attention_mask=mask[0], use_cache=False)
            tokens += int(attention.sum())
    finally:
        for handle in handles:
            handle.remove()
    out = []
    for index, module in enumerate(modules):
        weight = module.o_proj.weight.detach().double().cpu()  # (d_model, heads * head_dim)
        columns = weight.reshape(weight.shape[0], shape.query, shape.head_dim)
        norms = columns.pow(2).sum(dim=(0, 2))
        out.append((sums[index] / max(tokens, 1) * norms).numpy())
    return out


def choose_heads(scores: list[np.ndarray], shape: HeadShape, keep: int) -> HeadCut:
    """Keep ``keep`` query heads in every layer by ``scores`` (see the module docstring)."""
    if not 0 < keep <= shape.query:
        raise HeadError(f"attention_heads must be in [1, {shape.query}], got {keep}")
    query: list[list[int]] = []
    groups: list[list[int]] = []
    for layer in scores:
        by_group = layer.reshape(shape.groups, shape.per_group)
        if keep % shape.per_group == 0:  # whole groups: the best ones
            count = keep // shape.per_group
            kept_groups = sorted(np.argsort(-by_group.sum(axis=1), kind="stable")[:count].tolist())
            heads = [g * shape.per_group + h for g in kept_groups for h in range(shape.per_group)]
        elif keep % shape.groups == 0:  # every group, its best heads
            share = keep // shape.groups
            kept_groups = list(range(shape.groups))
            heads = sorted(
                g * shape.per_group + h
                for g in kept_groups
                for h in np.argsort(-by_group[g], kind="stable")[:share].tolist()
            )
        else:
            raise HeadError(
                f"attention_heads {keep} keeps neither whole groups ({shape.per_group} heads "
                f"each) nor an equal share of each of the {shape.groups} groups"
            )
        query.append(heads)
        groups.append(kept_groups)
    return HeadCut(query, groups, shape.head_dim)
