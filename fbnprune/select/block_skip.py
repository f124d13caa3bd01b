"""Which decoder blocks to drop (``select.drop_layers``): those the model needs least.

For every block, the original model is run with that block alone passing its input through
(``pruning.depth.skipped_blocks``), and the KL divergence of its next-token distribution
from the original's is averaged over the real tokens of a few calibration prompts (the
measure of Shortened LLaMA's and Minitron's depth pruning). The blocks of smallest KL are
dropped; the record keeps every block's KL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from fbnprune.collect.activations import token_batches
from fbnprune.models.adapters import get_adapter
from fbnprune.pruning.depth import check_droppable, skipped_blocks
from fbnprune.select.sensitivity import logprobs

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def block_skip_kl(
    model: PreTrainedModel,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_length: int = 256,
    batch_size: int = 8,
    progress: bool = False,
) -> list[float]:
    """Per decoder block: mean KL(original || original with that block skipped)."""
    batches = token_batches(tokenizer, prompts, max_length, batch_size)
    reference = logprobs(model, batches)
    out = []
    n_layers = len(get_adapter(model).get_layers(model))
    for layer in tqdm(range(n_layers), desc="select: blocks", unit="block", disable=not progress):
        with skipped_blocks(model, [layer]):
            skipped = logprobs(model, batches)
        kl = [(r.exp() * (r - s)).sum(-1) for r, s in zip(reference, skipped, strict=True)]
        out.append(float(torch.cat(kl).mean()))
    return out


def blocks_to_drop(kl: list[float], count: int) -> list[int]:
    """The ``count`` blocks of smallest KL (the earlier one first on ties), sorted."""
    check_droppable(len(kl), list(range(count)))
    order = sorted(range(len(kl)), key=lambda i: (kl[i], i))
    return sorted(order[:count])
