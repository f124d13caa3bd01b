"""The heal stage's student from disk, and the processes of an ``accelerate launch`` other
than the main one: they wait for the main process to reach the heal stage (it computes or
reuses the teacher's targets and frees the teacher), then train the same student from the
checked checkpoint on their share of the same targets. Only the main process writes into
the run directory."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fbnprune.heal.distill import HealError, load_targets
from fbnprune.integrity import digest_mismatches
from fbnprune.recipe import HealConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from fbnprune.accel import Launch
    from fbnprune.rundir.context import RunContext

logger = logging.getLogger(__name__)


def load_student(folder: Path, layout: str, dtype: torch.dtype) -> PreTrainedModel:
    """The checked slice saved in ``folder`` (``checkpoint-<layout>/``), in ``dtype``; the
    compact layout's classes ship with it (``trust_remote_code``)."""
    from transformers import AutoModelForCausalLM

    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, trust_remote_code=layout == "compact"
    )
    return model.eval()


def checked_student(ctx: RunContext, layout: str) -> Path:
    """``checkpoint-<layout>/``, refused unless its files are the ones check compared."""
    folder = ctx.layout.checkpoint_dir(layout)
    recorded = ctx.layout.read_parity().files.get(folder.name)
    if not folder.is_dir() or not recorded:
        raise HealError(f"heal: no checked {folder.name}/ to load the student from")
    changed = digest_mismatches(folder, recorded)
    if changed:
        raise HealError(
            f"heal: {folder.name}/ differs from the checked one ({'; '.join(changed)}); "
            "run fbnprune save again"
        )
    return folder


def student_message(
    ctx: RunContext, cfg: HealConfig, folder: Path, layout: str, targets_key: str
) -> dict[str, Any]:
    """What the other processes need to train alongside the main one."""
    return {
        "cfg": cfg.model_dump_json(),
        "student": str(folder),
        "layout": layout,
        "dtype": ctx.recipe.dtype,
        "targets": str(ctx.layout.heal_targets_file),
        "targets_key": targets_key,
        "state_file": str(ctx.layout.heal_state_file),
    }


def follow(launch: Launch) -> None:
    """A process other than the main one: wait for the main process's message, then train
    (nothing to do when it sends none: healing is off, fresh, or failed before training)."""
    from fbnprune.heal.train import heal_model

    message = launch.listen()
    if message is None:
        return
    cfg = HealConfig.model_validate_json(message["cfg"])
    targets = load_targets(Path(message["targets"]), message["targets_key"])
    if targets is None:
        raise HealError(f"heal: no teacher targets in {message['targets']}")
    load = functools.partial(
        load_student, Path(message["student"]), message["layout"], getattr(torch, message["dtype"])
    )
    logger.info(
        "heal: process %d of %d trains %s",
        launch.accelerator.process_index,
        launch.processes,
        message["student"],
    )
    heal_model(
        load(),
        None,
        None,
        [],
        cfg,
        targets=targets,
        accelerator=launch.accelerator,
        state_file=Path(message["state_file"]),
        progress=False,
        reload=load,
    )
