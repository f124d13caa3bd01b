"""Stage 6, save, and the one way a checkpoint is written: stage -> reload -> parity ->
publish.

``stage_checkpoint`` saves a model into the run's staging folder, ``reload_parity``
reloads it in the run's dtype and compares its logits with the model in memory, and
``publish`` moves the checked bytes into ``checkpoint-<layout>[-healed]/`` with the plan,
recipe and parity beside them. The check stage stages and compares the sliced models and
save publishes them; heal does all three for its model.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from fbnprune.check import ParityError, ParityReport, ParityResult, check_parity
from fbnprune.integrity import digest_mismatches, file_digests
from fbnprune.io import atomic_directory, atomic_write_text
from fbnprune.rundir.context import RunContext
from fbnprune.rundir.layout import CHECKPOINT_PARITY, CHECKPOINT_PLAN, CHECKPOINT_RECIPE
from fbnprune.save import checkpoint_bytes, save_checkpoint
from fbnprune.stages.keys import check_key

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Staged:
    """A checkpoint saved into staging: its layout, its digests, where it is published."""

    layout: str
    healed: bool
    staging: Path
    final: Path  # where ``publish`` moves it
    files: dict[str, str]


def stage_checkpoint(
    ctx: RunContext, model: PreTrainedModel, layout: str, *, healed: bool = False
) -> Staged:
    """Save ``model`` and the tokenizer into the run's staging folder."""
    staging = ctx.layout.staging_dir(f"{layout}-healed" if healed else layout)
    save_checkpoint(model, ctx.tokenizer, staging)
    final = ctx.layout.checkpoint_dir(layout, healed=healed)
    return Staged(layout, healed, staging, final, file_digests(staging))


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


def checkpoint_extras(ctx: RunContext) -> dict[str, str]:
    """The files every saved checkpoint carries beside its weights."""
    return {
        CHECKPOINT_PLAN: ctx.layout.plan_file.read_text(),
        CHECKPOINT_RECIPE: ctx.recipe.to_yaml(),
        CHECKPOINT_PARITY: ctx.layout.parity_file.read_text(),
    }


def publish(staging: Path, final: Path, checked: dict[str, str], extras: dict[str, str]) -> None:
    """Move the staged checkpoint to ``final`` with ``extras``, if its bytes are ``checked``."""
    changed = digest_mismatches(staging, checked)
    if changed:
        raise ParityError(
            f"the staged {final.name} is not what was checked: "
            f"{'; '.join(changed)}; run the command again"
        )
    with atomic_directory(final) as tmp:
        shutil.copytree(staging, tmp, dirs_exist_ok=True)
        for name, text in extras.items():
            atomic_write_text(tmp / name, text)
    shutil.rmtree(staging)


def recheck_needed(ctx: RunContext, parity: ParityResult) -> bool:
    """Whether check must run again before save: the saved checkpoints differ from the
    bytes check compared (they are checked and saved again), or save is due and the staged
    checkpoints are gone (checked in an earlier process). Forgets the stale stages."""
    layouts = ctx.recipe.save.layouts
    folders = [ctx.layout.checkpoint_dir(layout) for layout in layouts]
    if ctx.run.is_fresh("save", check_key(ctx), folders):
        changed = [
            f"{folder.name}/{line}"
            for folder in folders
            for line in digest_mismatches(folder, parity.files.get(folder.name, {}))
        ]
        if changed:
            logger.warning(
                "save: the saved checkpoints differ from the checked ones (%s); "
                "checking and saving them again",
                "; ".join(changed),
            )
            ctx.run.forget("check")
            ctx.run.forget("save")
        return bool(changed)
    if all(ctx.layout.staging_dir(layout).is_dir() for layout in layouts):
        return False
    ctx.run.forget("check")
    return True


def save(ctx: RunContext, parity: ParityResult) -> dict[str, Path]:
    """The saved checkpoints, layout -> folder: reused when fresh, else the staged ones
    that ``parity`` checked, published."""
    layouts = ctx.recipe.save.layouts
    outputs = [ctx.layout.checkpoint_dir(layout) for layout in layouts]
    ctx.run.stage("save", check_key(ctx), outputs, lambda: _save(ctx, parity))
    return dict(zip(layouts, outputs, strict=True))


def _save(ctx: RunContext, parity: ParityResult) -> dict[str, Any]:
    extras = checkpoint_extras(ctx)
    sizes = {}
    for layout in ctx.recipe.save.layouts:
        staging, final = ctx.layout.staging_dir(layout), ctx.layout.checkpoint_dir(layout)
        publish(staging, final, parity.files.get(final.name, {}), extras)
        sizes[layout] = checkpoint_bytes(final)
        logger.info("save: %s (%.1f MiB of safetensors)", final, sizes[layout] / 2**20)
    shutil.rmtree(ctx.layout.staging_root, ignore_errors=True)
    return {"safetensors_bytes": sizes}
