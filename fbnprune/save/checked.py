"""The one way a run writes a checkpoint: stage -> reload -> parity -> publish.

``stage_checkpoint`` saves a model into the run's staging folder,
``fbnprune.check.reload.reload_parity`` reloads it in the run's dtype and compares its logits
with the model in memory, and ``publish`` moves the checked bytes into
``checkpoint-<layout>[-healed]/`` with the plan, recipe and parity beside them. The check
stage stages and compares the sliced models and the save stage publishes them; heal does all
three for its model.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fbnprune.integrity import digest_mismatches, file_digests
from fbnprune.io import atomic_directory, atomic_write_text
from fbnprune.parity import ParityError
from fbnprune.rundir.context import RunContext
from fbnprune.rundir.layout import CHECKPOINT_PARITY, CHECKPOINT_PLAN, CHECKPOINT_RECIPE
from fbnprune.save.checkpoint import save_checkpoint

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class Staged:
    """A checkpoint saved into staging: its layout, its digests, where it is published,
    and the tokenizer saved with it."""

    layout: str
    healed: bool
    staging: Path
    final: Path  # where ``publish`` moves it
    files: dict[str, str]
    tokenizer: Any = field(default=None, repr=False, compare=False)


def stage_checkpoint(
    ctx: RunContext, model: PreTrainedModel, layout: str, tokenizer: Any, *, healed: bool = False
) -> Staged:
    """Save ``model`` and its ``tokenizer`` (``pruning.stage.sliced_tokenizer``) into the run's
    staging folder."""
    staging = ctx.layout.staging_dir(f"{layout}-healed" if healed else layout)
    save_checkpoint(model, tokenizer, staging)
    final = ctx.layout.checkpoint_dir(layout, healed=healed)
    return Staged(layout, healed, staging, final, file_digests(staging), tokenizer)


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
