"""Check: prove that a sliced model computes what the masked model computes.

Logits of a reference (e.g. the masked original) are compared with those of each candidate
(sliced in memory, saved-and-reloaded, ...) on held-out text, at real tokens only. A report
gives max and mean |delta| per candidate and fails beyond its stated tolerance.

Exactness is proven in float64: there, masked and sliced models agree to rounding (measured
0.0 on SmolLM2-135M), while in float32 different summation orders alone move logits by up to
~1e-3 after 30 layers. A float32 comparison is therefore reported for information
(``gating=False``), and the saved checkpoint is compared with the in-memory slice in the
model's own dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from fbnprune.collect.activations import token_batches
from fbnprune.parity import Comparison, ParityError, ParityReport, ParityResult
from fbnprune.pruning.embedding import VocabularyView
from fbnprune.vocabulary import Vocabulary

__all__ = [
    "Comparison",
    "ParityError",
    "ParityReport",
    "ParityResult",
    "check_parity",
    "real_token_logits",
]


@torch.inference_mode()
def real_token_logits(
    model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """Logits at real tokens of every batch, concatenated: (n_tokens, vocab) float32."""
    return torch.cat([_batch_logits(model, batch) for batch in batches])


def _batch_logits(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """One batch's logits at its real tokens, float32 on the CPU (the padded output freed)."""
    device = next(model.parameters()).device
    input_ids, attention = batch
    logits = model(
        input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False
    ).logits
    return logits[attention.to(device).bool()].float().cpu()


def check_parity(
    reference: tuple[str, nn.Module, Callable[[], contextlib.AbstractContextManager] | None],
    candidates: Mapping[str, nn.Module],
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    atol: float = 1e-4,
    max_length: int = 128,
    batch_size: int = 1,
    gating: bool = True,
    vocabulary: Vocabulary | None = None,
) -> ParityReport:
    """Compare each candidate's logits with the reference's on ``prompts``.

    Args:
        reference: (name, model, context) where ``context()`` (e.g. ``masked(model, plan)``)
            is entered around each of the reference's forward passes (never around a
            candidate's); ``None`` for no context.
        candidates: name -> model to compare.
        tokenizer: the candidates' tokenizer (the reference's too, without ``vocabulary``).
        prompts: held-out texts.
        batch_size: prompts per forward pass (one: a single prompt's positions x vocabulary
            logits in memory at a time).
        atol: largest allowed max |delta logits|.
        gating: whether a failure of this report fails the check.
        vocabulary: the candidates' vocabulary cut: the reference reads the same tokens by
            their original ids, and its logits are compared at the kept ids.
    """
    batches = token_batches(tokenizer, prompts, max_length, batch_size)
    name, model, context = reference
    read = model if vocabulary is None else VocabularyView(model, vocabulary)
    worst = dict.fromkeys(candidates, 0.0)
    total = dict.fromkeys(candidates, 0.0)
    n_tokens = count = 0
    # batch by batch, reduced on the fly: one batch's logits of the reference and of one
    # candidate in memory, never every position x vocabulary of the prompts at once
    for batch in batches:
        with torch.inference_mode(), context() if context is not None else contextlib.nullcontext():
            ref = _batch_logits(read, batch)
        for cand_name, cand in candidates.items():
            with torch.inference_mode():
                delta = _batch_logits(cand, batch).sub_(ref).abs_()
            largest = float(delta.max())
            if not largest <= worst[cand_name]:  # larger, or NaN (which must fail the check)
                worst[cand_name] = largest
            total[cand_name] += float(delta.sum(dtype=torch.float64))
        n_tokens, count = n_tokens + ref.shape[0], count + ref.numel()
        del ref
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    report = ParityReport(name, atol, n_tokens, dtype=dtype, gating=gating)
    for cand_name in candidates:
        max_abs, mean_abs = worst[cand_name], total[cand_name] / count
        report.comparisons.append(Comparison(cand_name, max_abs, mean_abs, max_abs <= atol))
    return report
