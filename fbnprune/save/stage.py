"""Stage 6, save: publish the checkpoints that the check stage staged and compared
(``checked``), and check again first where the saved or staged bytes are not the checked
ones."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from fbnprune.parity import ParityResult
from fbnprune.rundir.context import RunContext
from fbnprune.rundir.keys import check_key
from fbnprune.save.checked import checkpoint_extras, publish
from fbnprune.save.checkpoint import checkpoint_bytes

logger = logging.getLogger(__name__)


def recheck_needed(ctx: RunContext, parity: ParityResult) -> bool:
    """Whether check must run again before save: the saved checkpoints differ from the
    bytes check compared (they are checked and saved again), or save is due and the staged
    checkpoints are gone (checked in an earlier process). Forgets the stale stages."""
    layouts = ctx.recipe.save.layouts
    folders = [ctx.layout.checkpoint_dir(layout) for layout in layouts]
    if ctx.run.is_fresh("save", check_key(ctx), folders):
        changed = [
            f"{folder.name}/{line}" for folder in folders for line in parity.mismatches(folder)
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
