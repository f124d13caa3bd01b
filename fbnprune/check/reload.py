"""A staged checkpoint reloaded as stock transformers loads it, compared with the model it
was saved from, on the run's held-out prompts and tolerance."""

from __future__ import annotations

from typing import Any

from torch import nn

from fbnprune.check.compare import check_parity
from fbnprune.parity import ParityReport
from fbnprune.rundir.context import RunContext
from fbnprune.save.checked import Staged


def reload_parity(ctx: RunContext, staged: Staged, model: nn.Module) -> ParityReport:
    """Reload the staged checkpoint in the run's dtype and compare its logits with
    ``model``'s (the one it was saved from) on held-out prompts."""
    from transformers import AutoModelForCausalLM

    layout = staged.layout
    reloaded = AutoModelForCausalLM.from_pretrained(
        staged.staging, dtype=ctx.dtype, trust_remote_code=layout == "compact"
    ).eval()
    reference = f"healed-{layout}" if staged.healed else f"sliced-{layout}"
    candidate = f"reloaded-healed-{layout}" if staged.healed else f"reloaded-{layout}"
    return check_parity((reference, model, None), {candidate: reloaded}, **parity_inputs(ctx))


def parity_inputs(ctx: RunContext) -> dict[str, Any]:
    """The prompts, tokenizer, length and tolerance of every parity comparison of a run."""
    cfg = ctx.recipe.check
    return {
        "tokenizer": ctx.tokenizer,
        "prompts": ctx.heldout_prompts(cfg.samples),
        "max_length": ctx.max_length,
        "atol": cfg.atol,
    }
