"""Evaluate a run directory: the original, masked, sliced and saved models, one harness.

``evaluate_run`` generates the offline suite from documents outside the run's calibration
set (``RUN_DIR/eval/suite/``), loads the tasks once, scores every requested variant with the
same settings and writes ``RUN_DIR/eval/results.json`` and ``results.md``.

Variants (``--models``):
- ``original``: the recipe's model, as the run loads it (``RunContext``).
- ``masked``: the original inside ``masked(model, plan)`` (hooks; no weights change).
- ``sliced``: one per layout of the recipe (``sliced-padded``, ``sliced-compact``), sliced in
  memory from a copy of the original, built when its turn comes and dropped after.
- ``checkpoint``: every saved ``checkpoint-*/`` directory, loaded from disk with its own
  tokenizer, once its files are the bytes the run checked (``save.verified``:
  ``trust_remote_code`` only for fbnprune's own modeling file, verified).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from fbnprune.evaluate.documents import calibration_documents
from fbnprune.evaluate.errors import EvalError
from fbnprune.evaluate.harness import Harness, ModelAndTokenizer, ModelSpec
from fbnprune.evaluate.results import build_results, write_results
from fbnprune.evaluate.suite import answer_tasks, build_suite, catalog, default_tasks
from fbnprune.io import atomic_write_text
from fbnprune.models.size import count_parameters
from fbnprune.plan import PrunePlan
from fbnprune.pruning.mask import masked
from fbnprune.recipe import Recipe, load_recipe
from fbnprune.rundir import RunDir
from fbnprune.rundir.context import RunContext
from fbnprune.rundir.layout import (
    CHECKPOINT_PREFIX,
    LAYOUTS,
    PLAN_FILE,
    RECIPE_FILE,
    RunLayout,
    checkpoint_name,
)
from fbnprune.save.verified import verify_checkpoint

logger = logging.getLogger(__name__)

MODEL_KINDS = ("original", "masked", "sliced", "checkpoint")


def evaluate_run(
    run_dir: str | Path,
    *,
    tasks: Sequence[str] | None = None,
    models: Sequence[str] = MODEL_KINDS,
    limit: int | None = None,
    batch_size: int | None = None,
    include_paths: Sequence[str | Path] = (),
    device: str | None = None,
    max_length: int | None = None,
    context: RunContext | None = None,
    write: bool = True,
) -> dict[str, Any]:
    """Score the run's model variants on the same tasks; return (and write) the results.

    Args:
        run_dir: a run directory holding ``recipe.yaml`` (and ``plan.json`` for anything
            but the original).
        tasks: task names; the recipe's ``evaluate.tasks`` if None.
        models: kinds of variant, from ``MODEL_KINDS``.
        limit, batch_size, max_length: override the recipe's ``evaluate`` settings.
        include_paths: more directories of lm-eval YAML tasks (besides the recipe's).
        device: where models run (None: where they are, the CPU for the run's).
        context: the run's ``RunContext``, to take the original model from (one is made
            from ``recipe.yaml`` if None; pass one to reuse a loaded model).
        write: write ``eval/results.json`` and ``eval/results.md``.
    """
    run_dir = Path(run_dir)
    if context is None:
        context = RunContext(run_recipe(run_dir), RunDir(run_dir), progress=False)
    recipe = context.recipe
    cfg = recipe.evaluate
    kinds = _check_kinds(models)
    task_names = list(dict.fromkeys(tasks or cfg.tasks or default_tasks(recipe)))
    plan = _load_plan(run_dir) if set(kinds) - {"original"} else None

    include: list[str | Path] = []
    known = catalog(recipe)
    suite_tasks = [t for t in task_names if t in known]
    layout = RunLayout(run_dir)
    suite_dir = layout.eval_suite_dir
    if suite_tasks:
        exclude = calibration_documents(recipe, run_dir)
        build_suite(suite_dir, exclude=exclude, config=cfg, tasks=suite_tasks, recipe=recipe)
    include += [suite_dir] if suite_tasks else []
    include += [*cfg.include_paths, *include_paths]
    harness = Harness(
        task_names,
        include_paths=include,
        limit=limit or cfg.limit,
        batch_size=batch_size or cfg.batch_size,
        device=device,
        max_length=max_length or cfg.max_length,
        answer_tasks=answer_tasks(recipe, suite_dir, suite_tasks),
    )

    variants, described = model_variants(context, plan, kinds, run_dir)
    timings: dict[str, float] = {}
    spreads: dict[str, dict[str, Any]] = {}
    answers: dict[str, dict[str, list[dict[str, Any]]]] = {}
    scores = harness.score_all(variants, timings=timings, spreads=spreads, answers=answers)
    settings = {
        **harness.settings(),
        "tasks": list(harness.tasks),
        "suite": str(suite_dir.resolve()) if suite_tasks else None,
        "suite_seed": cfg.seed,
        "calibration_excluded": True,
        "seconds": timings,
        "plan": _plan_summary(plan),
        "recipe": recipe.name,
        "model": recipe.model,
        "scoring": recipe.verdict.scoring,
    }
    results = build_results(
        scores,
        harness.tasks,
        models=described,
        settings=settings,
        versions=eval_versions(),
        spreads=spreads,
    )
    if write:
        json_file, md_file = write_results(results, layout.eval_dir)
        logger.info("evaluation results: %s, %s", json_file, md_file)
        if harness.written:
            _write_answers(answers, layout.eval_predictions)
            logger.info("written answers: %s", layout.eval_predictions)
    return results


def _write_answers(answers: dict[str, dict[str, list[dict[str, Any]]]], file: Path) -> None:
    """Every model's written answers to the generation tasks, one JSON line each."""
    lines = [
        json.dumps({"model": model, "task": task, **record}, ensure_ascii=False)
        for model, tasks in answers.items()
        for task, records in tasks.items()
        for record in records
    ]
    atomic_write_text(file, "\n".join(lines) + "\n")


def run_recipe(run_dir: Path) -> Recipe:
    """The recipe a run directory was made with (``RUN_DIR/recipe.yaml``)."""
    if not run_dir.is_dir():
        raise EvalError(f"run directory not found: {run_dir}")
    file = RunLayout(run_dir).recipe_file
    if not file.is_file():
        raise EvalError(f"{run_dir} holds no {RECIPE_FILE}; is it an fbnprune run directory?")
    return load_recipe(file)


def model_variants(
    context: RunContext, plan: PrunePlan | None, kinds: Sequence[str], run_dir: Path
) -> tuple[dict[str, ModelSpec], dict[str, dict[str, Any]]]:
    """The variants to score (name -> model spec) and a description of each, which the
    specs complete (parameters) when they are built."""
    variants: dict[str, ModelSpec] = {}
    described: dict[str, dict[str, Any]] = {}
    recipe = context.recipe
    if "original" in kinds:
        variants["original"] = (context.model, context.tokenizer)
        described["original"] = {
            "source": recipe.model,
            "parameters": count_parameters(context.model),
        }
    if "masked" in kinds and plan is not None:
        variants["masked"] = _masked(context, plan)
        described["masked"] = {
            "source": f"original with {PLAN_FILE} applied by hooks",
            "kept_fraction": plan.kept_fraction,
        }
    if "sliced" in kinds and plan is not None:
        for layout in recipe.save.layouts:
            info = {"source": f"original sliced in memory ({layout} layout)"}
            variants[f"sliced-{layout}"] = _sliced(context, plan, layout, info)
            described[f"sliced-{layout}"] = info
    if "checkpoint" in kinds:
        order = {checkpoint_name(layout): i for i, layout in enumerate(LAYOUTS)}
        dirs = sorted(
            RunLayout(run_dir).saved_checkpoints(),
            key=lambda d: (order.get(d.name, len(order)), d.name),
        )
        if not dirs:
            logger.warning(
                "no saved %s*/ in %s; run the save stage to score one", CHECKPOINT_PREFIX, run_dir
            )
        for directory in dirs:
            info = {"source": str(directory.resolve())}
            variants[directory.name] = checkpoint_model(context, directory, info)
            described[directory.name] = info
    if not variants:
        raise EvalError(f"nothing to evaluate for --models {','.join(kinds)} in {run_dir}")
    return variants, described


def eval_versions() -> dict[str, str]:
    import datasets
    import lm_eval

    from fbnprune.rundir.runner import versions

    return {**versions(), "lm_eval": lm_eval.__version__, "datasets": datasets.__version__}


# --- variants ---------------------------------------------------------------------------------


def _masked(
    context: RunContext, plan: PrunePlan
) -> Callable[[], contextlib.AbstractContextManager]:
    @contextlib.contextmanager
    def enter() -> Iterator[ModelAndTokenizer]:
        with masked(context.model, plan):
            yield context.model, context.tokenizer

    return enter


def _sliced(
    context: RunContext, plan: PrunePlan, layout: str, info: dict[str, Any]
) -> Callable[[], contextlib.AbstractContextManager]:
    @contextlib.contextmanager
    def enter() -> Iterator[ModelAndTokenizer]:
        from fbnprune.pruning.slicing import slice_model
        from fbnprune.pruning.stage import sliced_tokenizer

        model = slice_model(copy.deepcopy(context.model), plan, layout=layout).eval()
        info["parameters"] = count_parameters(model)
        try:
            yield model, sliced_tokenizer(context, plan)
        finally:
            del model
            gc.collect()

    return enter


def checkpoint_model(
    context: RunContext, directory: Path, info: dict[str, Any]
) -> Callable[[], contextlib.AbstractContextManager]:
    """A saved checkpoint, loaded from disk when entered with its own tokenizer (the
    original's if it has none); ``info`` receives its parameters."""

    @contextlib.contextmanager
    def enter() -> Iterator[ModelAndTokenizer]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        remote = verify_checkpoint(context.layout.root, directory)  # before any of it loads
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=context.dtype, trust_remote_code=remote
        ).eval()
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory)
        except (OSError, ValueError):
            logger.warning("%s: no loadable tokenizer, using the original's", directory)
            tokenizer = context.tokenizer
        info.update(parameters=count_parameters(model), trust_remote_code=remote)
        try:
            yield model, tokenizer
        finally:
            del model
            gc.collect()

    return enter


# --- checks -----------------------------------------------------------------------------------


def _check_kinds(models: Sequence[str]) -> list[str]:
    kinds = list(dict.fromkeys(models))
    unknown = [k for k in kinds if k not in MODEL_KINDS]
    if unknown or not kinds:
        raise EvalError(f"unknown model kind(s) {unknown}; choose from {', '.join(MODEL_KINDS)}")
    return kinds


def _load_plan(run_dir: Path) -> PrunePlan:
    run = RunLayout(run_dir)
    if not run.plan_file.is_file():
        raise EvalError(
            f"{run_dir} holds no {PLAN_FILE}, so there is no pruned model to score; run "
            "`fbnprune select` (or `fbnprune run`) first, or pass --models original"
        )
    return run.read_plan()


def _plan_summary(plan: PrunePlan | None) -> dict[str, Any] | None:
    if plan is None:
        return None
    keys = ("selector", "budget", "allocation", "recipe_fingerprint")
    return {
        "site": plan.site,
        "fill": plan.fill,
        "kept": plan.n_kept,
        "units": plan.n_units,
        "kept_fraction": plan.kept_fraction,
        **{k: plan.provenance[k] for k in keys if k in plan.provenance},
    }
