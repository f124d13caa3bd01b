"""Score the benchmark grid of one recipe in one process.

Every variant of the grid (``bench.grid``) is a ``PrunePlan`` built from the run's
calibration activations: hidden-site variants are sliced (``BenchConfig.layout``; the check
stage proves slicing equals masking, and sliced models run faster), output-site variants are
masked (no architecture can drop an output channel). Every variant is scored by the same
``Harness`` (lm-eval, offline suite of documents outside the run's documents) as the
original. Finished rows are appended to ``bench/rows.jsonl``; an interrupted benchmark run
again with the same settings resumes where it stopped.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from fbnprune.bench.grid import Variant, grid, variant_plan
from fbnprune.collect.stage import collect
from fbnprune.discover.stage import discover
from fbnprune.evaluate.documents import calibration_documents
from fbnprune.evaluate.harness import Harness
from fbnprune.evaluate.suite import answer_tasks, build_suite, catalog, recipe_tasks
from fbnprune.hashing import digest
from fbnprune.heal.distill import prepare_targets
from fbnprune.heal.train import HealLog, heal_model
from fbnprune.io import atomic_write_text
from fbnprune.models.size import count_parameters
from fbnprune.pruning.mask import masked
from fbnprune.pruning.slicing import slice_model
from fbnprune.recipe import Recipe
from fbnprune.rundir import RunDir
from fbnprune.rundir.context import RunContext
from fbnprune.rundir.layout import RunLayout
from fbnprune.rundir.runner import versions
from fbnprune.select.calibration import RunCalibration

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


def bench_fingerprint(recipe: Recipe) -> str:
    """What every row depends on: rows of another fingerprint are not reused."""
    data = recipe.model_dump(
        mode="json",
        include={
            "model",
            "dtype",
            "seed",
            "tasks",
            "collect",
            "discover",
            "evaluate",
            "heal",
        },
    )
    data["select"] = recipe.select.model_dump(exclude={"selector", "budget"})
    data["prune"] = recipe.prune.model_dump()
    data["bench"] = recipe.bench.model_dump(include={"tasks", "limit", "layout", "heal_steps"})
    return digest(json.dumps(data, sort_keys=True).encode())


class _Rows:
    """``bench/rows.jsonl``: one JSON object per finished variant, appended as they finish."""

    def __init__(self, file: Path, fingerprint: str) -> None:
        self.file, self.fingerprint = file, fingerprint
        self.rows: dict[str, dict[str, Any]] = {}
        if file.is_file():
            for line in file.read_text().splitlines():
                row = json.loads(line)
                if row.get("fingerprint") == fingerprint:
                    self.rows[row["key"]] = row
        file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(file, "".join(json.dumps(r) + "\n" for r in self.rows.values()))

    def add(self, row: dict[str, Any]) -> None:
        row["fingerprint"] = self.fingerprint
        self.rows[row["key"]] = row
        with open(self.file, "a") as handle:
            handle.write(json.dumps(row) + "\n")


def _contexts(recipe: Recipe, run: RunDir, progress: bool) -> dict[str, RunContext]:
    """One context per neuron site the grid needs; the recipe's own site uses the run
    directory (reusing ``fbnprune run``'s collect and discover), the other one a
    sub-directory; both share one loaded model."""
    main = RunContext(recipe, run, progress=progress)
    contexts: dict[str, RunContext] = {recipe.site: main}
    needed = {"hidden"} | ({"output"} if recipe.bench.output_selectors else set())
    for site in needed - {recipe.site}:
        sub = RunDir.open(main.layout.bench_site_dir(site))
        contexts[site] = RunContext(
            recipe.model_copy(update={"site": site}),
            sub,
            progress=progress,
            model_and_tokenizer=main.model_and_tokenizer,
        )
    return contexts


def _calibration(ctx: RunContext, selectors: Sequence[str]) -> RunCalibration:
    """Collect (and, for the ica selector, discover) every task of one site's context."""
    acts = {task: collect(ctx, task) for task in ctx.tasks}
    networks = {task: discover(ctx, task, acts[task]) for task in ctx.tasks if "ica" in selectors}
    return RunCalibration(ctx, acts, networks)


def bench_tasks(recipe: Recipe) -> list[str]:
    """The bench's tasks: ``bench.tasks``, else the recipe's own multiple-choice tasks (every
    wording) and generation tasks, and ppl_news, else bbc_topics and ppl_news."""
    if recipe.bench.tasks is not None:
        return list(recipe.bench.tasks)
    own = list(recipe_tasks(recipe))
    return [*(own or ["bbc_topics"]), "ppl_news"]


def run_bench(
    recipe: Recipe, out: str | Path, *, progress: bool = True, overwrite: bool = False
) -> dict[str, Any]:
    """Score the original and every variant of ``grid(recipe)``; write the report files
    into ``OUT/bench/`` and return the results document."""
    from fbnprune.bench.summary import write_report

    cfg = recipe.bench
    tasks = bench_tasks(recipe)
    known = catalog(recipe)
    suite_tasks = [t for t in tasks if t in known]
    run = RunDir.open(Path(out), overwrite=overwrite)
    run.write_meta(recipe=recipe.name, recipe_fingerprint=recipe.fingerprint(), versions=versions())
    layout = RunLayout(run.path)
    atomic_write_text(layout.recipe_file, recipe.to_yaml())
    bench_dir = layout.bench_dir
    contexts = _contexts(recipe, run, progress)
    main = contexts[recipe.site]
    model, tokenizer = main.model, main.tokenizer
    suite_dir = layout.bench_suite_dir
    if suite_tasks:
        build_suite(
            suite_dir,
            exclude=calibration_documents(recipe, run.path),
            config=recipe.evaluate,
            tasks=suite_tasks,
            recipe=recipe,
        )
    include = ([suite_dir] if suite_tasks else []) + list(recipe.evaluate.include_paths)
    harness = Harness(
        tasks,
        include_paths=include,
        limit=cfg.limit,
        batch_size=recipe.evaluate.batch_size,
        max_length=recipe.evaluate.max_length,
        answer_tasks=answer_tasks(recipe, suite_dir, suite_tasks),
    )
    selectors = {"hidden": cfg.selectors, "output": cfg.output_selectors}
    # collect (and discover) before the grid's clock starts
    cals = {site: _calibration(ctx, selectors[site]) for site, ctx in contexts.items()}
    rows = _Rows(layout.bench_rows_file, bench_fingerprint(recipe))
    variants = grid(recipe)
    todo = [v for v in variants if v.key not in rows.rows]
    logger.info(
        "bench: %d variants (%d done earlier), tasks %s, %s documents per task",
        len(variants),
        len(variants) - len(todo),
        ", ".join(harness.tasks),
        cfg.limit or "all",
    )
    started = time.perf_counter()
    if "original" not in rows.rows:
        t0 = time.perf_counter()
        result = harness.score(model, tokenizer)
        rows.add(
            {
                "key": "original",
                "parameters": count_parameters(model),
                "scores": result,
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        logger.info("bench: original: %s", harness.summary(result))
    heal_cfg = recipe.heal.model_copy(update={"steps": cfg.heal_steps or recipe.heal.steps})
    teacher: tuple | None = None  # the original's targets, computed once for every student
    bar = tqdm(todo, desc="bench", unit="variant", disable=not progress)
    for variant in bar:
        bar.set_postfix_str(variant.key)
        t0 = time.perf_counter()
        plan = variant_plan(cals, variant, recipe)
        row: dict[str, Any] = {
            "key": variant.key,
            **asdict(variant),
            "selector": variant.label,
            "condition": variant.condition,
            "kept": plan.n_kept,
            "kept_fraction": plan.kept_fraction,
        }
        if variant.site == "output":
            with masked(model, plan):
                result = harness.score(model, tokenizer)
            row["parameters"] = count_parameters(model)
        else:
            pruned = slice_model(copy.deepcopy(model), plan, layout=cfg.layout).eval()
            if variant.healed:
                if teacher is None:
                    texts, questions = main.heal_texts()
                    validation, val_questions = main.prompts_of(("heldout",))
                    teacher = prepare_targets(
                        model,
                        tokenizer,
                        texts,
                        heal_cfg,
                        validation=validation,
                        questions=questions,
                        validation_questions=val_questions,
                        answers=main.heal_answers(),
                        validation_answers=main.answers_of(("heldout",)),
                        targets=main.heal_targets(),
                        validation_targets=main.targets_of(("heldout",)),
                    )
                run_cfg = heal_cfg.model_copy(update={"seed": heal_cfg.seed + variant.heal_run})
                pruned, log = heal_model(
                    pruned, model, tokenizer, (), run_cfg, targets=teacher, progress=False
                )
                row["heal"] = _heal_summary(log)
            result = harness.score(pruned, tokenizer)
            row["parameters"] = count_parameters(pruned)
            del pruned
            gc.collect()
        row["scores"] = result
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.add(row)
        logger.info("bench: %s (%.0f s): %s", variant.key, row["seconds"], harness.summary(result))
    bar.close()
    cost = _costs(recipe, cals, model) if cfg.cost else None
    results = {
        "recipe": recipe.name,
        "model": recipe.model,
        "tasks": {
            name: {
                "metric": info.metric,
                "higher_is_better": info.higher_is_better,
                "n_docs": info.n_docs,
            }
            for name, info in harness.tasks.items()
        },
        "settings": {
            **recipe.bench.model_dump(mode="json"),
            "allocation": recipe.select.allocation,
            "min_per_layer": recipe.select.min_per_layer,
            "discover": recipe.discover.model_dump(mode="json"),
            "prune": recipe.prune.model_dump(mode="json"),
            "heal": heal_cfg.model_dump(mode="json"),
            "harness": harness.settings(),
            "calibration_tokens": {t: a.n_tokens for t, a in cals[recipe.site].activations.items()},
            "grid_seconds": round(time.perf_counter() - started, 1),
        },
        "fingerprint": rows.fingerprint,
        "versions": versions(),
        "rows": [rows.rows["original"], *(rows.rows[v.key] for v in variants)],
        "cost": cost,
    }
    write_report(results, bench_dir)
    return results


def _heal_summary(log: HealLog) -> dict[str, Any]:
    return {
        "steps": log.steps,
        "seconds": log.seconds,
        "stopped_by": log.stopped_by,
        "train_loss": [round(v, 5) for v in log.train_loss],
        "validation": log.validation,
    }


def _costs(
    recipe: Recipe, cals: dict[str, RunCalibration], model: PreTrainedModel
) -> dict[str, Any]:
    """Size and speed of the original and of one selector's slice (ICA's, when benched) at
    every budget in the benchmark's layout, and in the other layout at the recipe's budget
    where it exists; all measured interleaved."""
    from fbnprune.cost import costs_markdown, measure_costs
    from fbnprune.pruning.slicing import SliceError

    cfg = recipe.bench
    models: dict[str, PreTrainedModel] = {"original": model}

    selector = "ica" if "ica" in cfg.selectors else cfg.selectors[0]

    def add(name: str, budget: float, layout: str) -> None:
        variant = Variant("hidden", selector, recipe.seed, budget, recipe.prune.fill)
        try:
            models[name] = slice_model(
                copy.deepcopy(model), variant_plan(cals, variant, recipe), layout=layout
            ).eval()
        except SliceError as exc:
            logger.info("cost: no %s (%s)", name, exc)

    for budget in cfg.budgets:
        add(f"{cfg.layout} {budget:.0%}", budget, cfg.layout)
    other = "padded" if cfg.layout == "compact" else "compact"
    if not recipe.select.auto:
        budget = float(recipe.select.budget)
        add(f"{other} {budget:.0%}", budget, other)
    logger.info("cost: measuring %s", ", ".join(models))
    costs = measure_costs(models, repeats=cfg.cost_repeats)
    return {
        "selector": selector,
        "models": {n: c.to_dict() for n, c in costs.items()},
        "markdown": costs_markdown(costs),
    }
