"""Stage 7, heal: distil the original into a copy of the checked slice, save it like the
unhealed checkpoints (stage -> reload -> parity -> publish)."""

from __future__ import annotations

import copy
import functools
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fbnprune.check.reload import reload_parity
from fbnprune.heal.distill import Targets
from fbnprune.heal.launch import checked_student, load_student, student_message
from fbnprune.io import atomic_write_text
from fbnprune.parity import ParityResult
from fbnprune.plan import PrunePlan
from fbnprune.pruning.embedding import VocabularyView
from fbnprune.pruning.slicing import slice_model
from fbnprune.pruning.stage import sliced_tokenizer
from fbnprune.recipe import Recipe
from fbnprune.rundir import fingerprint
from fbnprune.rundir.context import RunContext
from fbnprune.rundir.keys import heal_key, teacher_key
from fbnprune.rundir.layout import CHECKPOINT_HEAL
from fbnprune.save.checked import checkpoint_extras, publish, stage_checkpoint

logger = logging.getLogger(__name__)


def heal_layout(recipe: Recipe) -> str:
    """Healing trains the compact slice when the recipe saves one (LoRA adapters would
    bring the padded layout's zero units to life), else the padded one."""
    layouts = recipe.save.layouts
    return "compact" if "compact" in layouts else layouts[0]


def heal(ctx: RunContext, plan: PrunePlan) -> Path:
    """The healed checkpoint (``checkpoint-<layout>-healed/``): reused when fresh and
    unchanged since its check, else healed from ``plan``'s slice."""
    layout = ctx.layout
    healed_dir = layout.checkpoint_dir(heal_layout(ctx.recipe), healed=True)
    outputs = [healed_dir, layout.heal_log_file, layout.heal_parity_file]
    key = heal_key(ctx)
    fresh = ctx.run.is_fresh("heal", key, outputs)
    if fresh:
        changed = layout.read_parity(healed=True).mismatches(healed_dir)
        if changed:
            logger.warning(
                "heal: %s differs from the checked one (%s); healing again",
                healed_dir.name,
                "; ".join(changed),
            )
            fresh = False
    if not fresh and healed_dir.exists():
        # gone before training starts, so that an interrupted heal leaves no checkpoint that
        # the run's recipe no longer describes
        _remove_healed(ctx, healed_dir, "healed under other settings")
    ctx.run.stage("heal", key, outputs, lambda: _heal(ctx, plan))
    return healed_dir


def _remove_healed(ctx: RunContext, healed_dir: Path, why: str) -> None:
    """Remove a healed checkpoint that no longer matches the recipe, with its check."""
    shutil.rmtree(healed_dir)
    ctx.layout.heal_parity_file.unlink(missing_ok=True)
    ctx.run.forget("heal")
    logger.info("heal: removed %s, %s", healed_dir.name, why)


def discard_healed(ctx: RunContext, budget: float) -> None:
    """Healing is off for this recipe: remove a healed checkpoint of an earlier plan."""
    recipe = ctx.recipe
    healed_dir = ctx.layout.checkpoint_dir(heal_layout(recipe), healed=True)
    if healed_dir.exists():  # healed from an earlier plan: it no longer matches
        _remove_healed(ctx, healed_dir, "healed from an earlier plan")
        shutil.rmtree(ctx.layout.heal_dir, ignore_errors=True)
    logger.info(
        "heal: skipped (budget %.0f%% is not below heal.below_budget %.0f%%; "
        "set heal.enabled: true to heal anyway)",
        100 * budget,
        100 * recipe.heal.below_budget,
    )


def teacher_targets_of(ctx: RunContext, plan: PrunePlan | None = None) -> tuple[Targets, str]:
    """The teacher's top-k targets on what healing distils (``ctx.heal_texts``; held-out
    prompts for validation, with the gold answers of labelled documents for the label loss)
    and their key, computed once and kept in the run directory (the layout's
    ``heal_targets_file``): a resumed or re-tuned heal (other lr, steps, ...) and the budget
    search of ``select.budget: auto`` skip the teacher's pass. With ``plan``'s vocabulary
    cut, the texts are read by the trimmed tokenizer and the teacher through the cut
    (``VocabularyView``): its distribution over the kept tokens, in the student's ids."""
    texts, questions = ctx.heal_texts()
    validation, validation_questions = ctx.prompts_of(("heldout",))
    answers, validation_answers = ctx.heal_answers(), ctx.answers_of(("heldout",))
    targets, validation_targets = ctx.heal_targets(), ctx.targets_of(("heldout",))
    from fbnprune.heal.distill import load_targets, prepare_targets, save_targets, targets_key

    cfg, file = ctx.recipe.heal, ctx.layout.heal_targets_file
    vocab = None if plan is None else plan.kept_vocabulary()
    teacher_id = teacher_key(ctx) if vocab is None else fingerprint(teacher_key(ctx), vocab.kept)
    key = targets_key(
        teacher_id,
        cfg,
        texts,
        questions,
        validation,
        validation_questions,
        answers,
        validation_answers,
        targets,
        validation_targets,
    )
    saved = load_targets(file, key)
    if saved is not None:
        logger.info("heal: the teacher's targets reused from %s", ctx.layout.relative(file))
        return saved, key
    teacher = ctx.model if vocab is None else VocabularyView(ctx.model, vocab)
    computed = prepare_targets(
        teacher,
        ctx.tokenizer if plan is None else sliced_tokenizer(ctx, plan),
        texts,
        cfg,
        validation=validation,
        questions=questions,
        validation_questions=validation_questions,
        answers=answers,
        validation_answers=validation_answers,
        targets=targets,
        validation_targets=validation_targets,
        progress=ctx.progress,
    )
    save_targets(file, key, computed)
    return computed, key


def _task_accuracy(ctx: RunContext, tokenizer: Any) -> Callable[[Any], float] | None:
    """The smallest held-out accuracy over the multiple-choice tasks under
    ``verdict.scoring`` (None without such a task), of a student that reads ``tokenizer``:
    logged as healing validates."""
    from fbnprune.evaluate.questions import heldout_accuracy, heldout_questions

    tasks = heldout_questions(ctx)
    if not tasks:
        return None
    recipe = ctx.recipe

    def accuracy(model: Any) -> float:
        return min(heldout_accuracy(model, tokenizer, t, recipe) for t in tasks.values())

    return accuracy


def _heal(ctx: RunContext, plan: PrunePlan) -> dict[str, Any]:
    """Distil on the calibration and healing prompts (held-out prompts only for the logged
    validation loss); the saved checkpoint must reload bit for bit."""
    from fbnprune.heal.train import heal_model, plot_loss

    cfg, layout = ctx.recipe.heal, heal_layout(ctx.recipe)
    texts, _ = ctx.heal_texts()
    targets, key = teacher_targets_of(ctx, plan)
    tokenizer = sliced_tokenizer(ctx, plan)
    reload = None
    if cfg.student == "checkpoint" or ctx.processes > 1:
        # the teacher's part is on disk: free it, then load the student, never both
        folder = checked_student(ctx, layout)
        ctx.release_model()
        reload = functools.partial(load_student, folder, layout, ctx.dtype)
        student = reload()
        if ctx.launch is not None:
            ctx.launch.tell(student_message(ctx, cfg, folder, layout, key))
    else:  # one fresh slice of the layout healed (not every layout the recipe saves)
        student = slice_model(copy.deepcopy(ctx.model), plan, layout=layout).eval()
        # the teacher's part is done (its targets are computed): train without it
        ctx.release_model()
    healed, log = heal_model(
        student,
        None,
        None,
        texts,
        cfg,
        targets=targets,
        state_file=ctx.layout.heal_state_file,
        progress=ctx.progress,
        accelerator=None if ctx.launch is None else ctx.launch.accelerator,
        reload=reload,
        task_accuracy=_task_accuracy(ctx, tokenizer),
    )
    healed = healed.cpu()  # trained on the launch's device; checked and saved from memory
    staged = stage_checkpoint(ctx, healed, layout, tokenizer, healed=True)
    report = reload_parity(ctx, staged, healed)
    result = ParityResult([report], files={staged.final.name: staged.files})
    if not result.passed:
        shutil.rmtree(ctx.layout.staging_root, ignore_errors=True)
        result.raise_if_failed()
    ctx.layout.write_parity(result, healed=True)
    log_text = json.dumps(log.to_dict(), indent=2) + "\n"  # as atomic_write_json writes
    atomic_write_text(ctx.layout.heal_log_file, log_text)
    plot_loss(
        {"healing": log},
        ctx.layout.heal_plot_file,
        title=f"healing {ctx.recipe.model} ({layout}, {cfg.method})",
    )
    extras = {**checkpoint_extras(ctx), CHECKPOINT_HEAL: log_text}
    publish(staged.staging, staged.final, staged.files, extras)
    shutil.rmtree(ctx.layout.staging_root, ignore_errors=True)
    logger.info("heal: saved %s", staged.final)
    return {
        "steps": log.steps,
        "stopped_by": log.stopped_by,
        "loss_first": log.train_loss[0],
        "loss_last": log.train_loss[-1],
        "reload_max_abs": result.worst(),
        "processes": log.processes,
        "validation_accuracy": log.validation_accuracy,
    }
