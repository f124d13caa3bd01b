"""Layer sensitivity: how much the model's output moves when one layer alone is cut.

For every layer, the plan that keeps every unit elsewhere and only that layer's top-scoring
``budget`` fraction there (dropped units at their calibration mean) is applied by masking,
and the KL divergence of the next-token distribution from the original's is averaged over
the real tokens of a few calibration prompts. ``allocate(policy="sensitivity")`` then gives
the layers whose cut costs most a larger share of the same total.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fbnprune.collect.activations import token_batches
from fbnprune.plan import PrunePlan
from fbnprune.pruning.mask import masked
from fbnprune.select.selection import top_indices

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@torch.inference_mode()
def logprobs(model: nn.Module, batches: list) -> list[torch.Tensor]:
    out = []
    for input_ids, attention in batches:
        logits = model(input_ids=input_ids, attention_mask=attention).logits
        out.append(F.log_softmax(logits[attention.bool()].float(), dim=-1))
    return out


def layer_sensitivity(
    model: PreTrainedModel,
    tokenizer,
    prompts: list[str],
    layer_scores: list[np.ndarray],
    budget: float,
    *,
    unit_means: list[np.ndarray] | None,
    model_name: str = "",
    max_length: int = 256,
    batch_size: int = 8,
    progress: bool = False,
) -> list[float]:
    """Per layer: mean KL(original || model with only that layer cut to ``budget``).

    Args:
        model: the original model (hooks are attached and removed; weights untouched).
        tokenizer: its tokenizer.
        prompts: calibration prompts the KL is measured on.
        layer_scores: the selector's scores per layer (the kept units are its top ones).
        budget: the fraction of the layer's units kept.
        unit_means: per layer, every unit's calibration mean (the fill), or None for zero.
    """
    widths = [len(s) for s in layer_scores]
    batches = token_batches(tokenizer, prompts, max_length, batch_size)
    reference = logprobs(model, batches)
    fill_values = None if unit_means is None else [m.astype(float).tolist() for m in unit_means]
    out = []
    for layer in tqdm(range(len(widths)), desc="sensitivity", unit="layer", disable=not progress):
        kept = [list(range(w)) for w in widths]
        count = max(1, math.ceil(budget * widths[layer]))
        kept[layer] = sorted(top_indices(layer_scores[layer], count).tolist())
        plan = PrunePlan(
            model=model_name,
            model_type=model.config.model_type,
            site="hidden",
            fill="zero" if fill_values is None else "mean",
            layer_widths=widths,
            kept=kept,
            fill_values=fill_values,
        )
        with masked(model, plan):
            cut = logprobs(model, batches)
        kl = [(r.exp() * (r - c)).sum(-1) for r, c in zip(reference, cut, strict=True)]
        out.append(float(torch.cat(kl).mean()))
    return out
