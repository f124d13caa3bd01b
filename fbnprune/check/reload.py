"""A staged checkpoint reloaded as stock transformers loads it, compared with the model it
was saved from, on the run's held-out prompts and tolerance."""

from __future__ import annotations

from typing import Any

from torch import nn

from fbnprune.check.compare import check_parity
from fbnprune.parity import ParityError, ParityReport
from fbnprune.rundir.context import RunContext
from fbnprune.save.checked import Staged


def reload_parity(ctx: RunContext, staged: Staged, model: nn.Module) -> ParityReport:
    """Reload the staged checkpoint in the run's dtype and compare its logits with
    ``model``'s (the one it was saved from) on held-out prompts, both reading them with the
    tokenizer reloaded from the checkpoint (which must be the one saved)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    layout = staged.layout
    reloaded = AutoModelForCausalLM.from_pretrained(
        staged.staging, dtype=ctx.dtype, trust_remote_code=layout == "compact"
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(staged.staging, local_files_only=True)
    if staged.tokenizer is not None and tokenizer.get_vocab() != staged.tokenizer.get_vocab():
        raise ParityError(
            f"{staged.staging.name}: the tokenizer reloads with another vocabulary than the "
            "one saved"
        )
    reference = f"healed-{layout}" if staged.healed else f"sliced-{layout}"
    candidate = f"reloaded-healed-{layout}" if staged.healed else f"reloaded-{layout}"
    inputs = parity_inputs(ctx, tokenizer)
    return check_parity((reference, model, None), {candidate: reloaded}, **inputs)


def parity_inputs(ctx: RunContext, tokenizer: Any = None) -> dict[str, Any]:
    """The prompts, tokenizer (``ctx.tokenizer`` unless given), length and tolerance of
    every parity comparison of a run."""
    cfg = ctx.recipe.check
    return {
        "tokenizer": ctx.tokenizer if tokenizer is None else tokenizer,
        "prompts": ctx.heldout_prompts(cfg.samples),
        "max_length": ctx.max_length,
        "atol": cfg.atol,
    }
