"""The whole-model cuts a plan may carry besides the MLP's: attention heads
(``select.attention_heads``), decoder blocks (``select.drop_layers``) and the vocabulary
(``prune.vocabulary: task``), each chosen on the run's calibration prompts and recorded in the
plan's provenance with the evidence it was chosen by."""

from __future__ import annotations

import logging
from typing import Any

from fbnprune.head_cut import HeadCut
from fbnprune.plan import PrunePlan
from fbnprune.pruning.embedding import vocabulary_rows
from fbnprune.pruning.heads import head_shape
from fbnprune.rundir.context import RunContext
from fbnprune.select.block_skip import block_skip_kl, blocks_to_drop
from fbnprune.select.head_scores import choose_heads, head_scores
from fbnprune.select.task_tokens import task_vocabulary

logger = logging.getLogger(__name__)


def add_whole_model_cuts(ctx: RunContext, plan: PrunePlan) -> None:
    """Set the recipe's head, depth and vocabulary cuts on ``plan`` (in place)."""
    r, provenance = ctx.recipe, plan.provenance
    if r.select.attention_heads:
        cut, provenance["heads"] = heads_to_keep(ctx)
        plan.heads = cut.to_dict()
        logger.info(
            "select: %d of %d query heads and %d of %d key-value groups kept per layer",
            len(cut.query[0]),
            provenance["heads"]["query_heads"],
            len(cut.groups[0]),
            provenance["heads"]["groups"],
        )
    if r.select.drop_layers:
        plan.dropped_layers, provenance["layers"] = layers_to_drop(ctx)
        logger.info(
            "select: decoder blocks %s dropped (the least KL when skipped)", plan.dropped_layers
        )
    if r.prune.vocabulary == "task":
        vocab, provenance["vocabulary"] = task_vocabulary(ctx, vocabulary_rows(ctx.empty_model()))
        plan.vocabulary = vocab.to_dict()
        logger.info(
            "select: %(kept)d of %(original)d tokens kept (%(used)d used by the task's "
            "prompts and answers; the rest special tokens, byte pieces and merge parents)",
            provenance["vocabulary"],
        )


def layers_to_drop(ctx: RunContext) -> tuple[list[int], dict[str, Any]]:
    """The ``select.drop_layers`` blocks the original needs least, and their record."""
    cfg = ctx.recipe.select
    prompts = ctx.calibration_prompts()[: cfg.sensitivity_samples]
    kl = block_skip_kl(
        ctx.model,
        ctx.tokenizer,
        prompts,
        max_length=ctx.max_length,
        batch_size=ctx.recipe.collect.batch_size,
        progress=ctx.progress,
    )
    dropped = blocks_to_drop(kl, cfg.drop_layers)
    record = {
        "dropped": dropped,
        "skip_kl": kl,
        "prompts": len(prompts),
        "how": "each block skipped alone in the original; mean next-token KL from the "
        "original over the prompts' real tokens; the blocks of smallest KL dropped",
    }
    return dropped, record


def heads_to_keep(ctx: RunContext) -> tuple[HeadCut, dict[str, Any]]:
    """The ``select.attention_heads`` heads of every layer that write most, and the record
    (every head's score)."""
    prompts = ctx.calibration_prompts()
    model = ctx.model
    scores = head_scores(
        model,
        ctx.tokenizer,
        prompts,
        max_length=ctx.max_length,
        batch_size=ctx.recipe.collect.batch_size,
        progress=ctx.progress,
    )
    shape = head_shape(model)
    cut = choose_heads(scores, shape, ctx.recipe.select.attention_heads)
    record = {
        "query_heads": shape.query,
        "groups": shape.groups,
        "head_dim": shape.head_dim,
        "scores": [s.tolist() for s in scores],
        "prompts": len(prompts),
        "how": "mean square of each query head's output at o_proj's input over the "
        "calibration prompts' real tokens, times the squared norm of its o_proj columns",
    }
    return cut, record
