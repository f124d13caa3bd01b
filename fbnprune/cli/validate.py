"""``fbnprune validate RECIPE``: check a recipe without running it."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from fbnprune.cli.args import add_set_argument
from fbnprune.recipe import Recipe, RecipeError, load_recipe

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "validate",
        help="check a recipe (keys, types, ranges) without running it",
        description="Validate a recipe: unknown keys, wrong types and out-of-range values are "
        "reported with their location. With --data, also load each task's text.",
    )
    parser.add_argument("recipe", type=Path, nargs="+", help="recipe YAML file(s)")
    parser.add_argument(
        "--data",
        action="store_true",
        help="also load every task's documents and check there are enough",
    )
    add_set_argument(parser)
    parser.set_defaults(execute=execute)


def execute(args: argparse.Namespace) -> int:
    for path in args.recipe:
        recipe = load_recipe(path, args.overrides)
        line = (
            f"{path}: ok ({recipe.name}: {recipe.model}, {len(recipe.tasks)} task(s), "
            f"budget {_budget(recipe.select.budget)}, site {recipe.site})"
        )
        if args.data:
            line += "; " + ", ".join(check_data(recipe))
        print(line)
    return 0


def check_data(recipe: Recipe) -> list[str]:
    """Load every task's documents and the model's tokenizer, and raise ``RecipeError`` for
    what the run would hit later: more ICA components than calibration tokens or units.
    Warns when there are fewer than 4 tokens per component. Returns one summary per task."""
    from transformers import AutoConfig, AutoTokenizer

    from fbnprune.collect.activations import tokenize
    from fbnprune.data.fit import question_cut
    from fbnprune.data.task_text import documents_left, load_task
    from fbnprune.discover.group_ica import MIN_TOKENS_PER_COMPONENT, ica_feasible
    from fbnprune.models.loading import resolve_model

    documents = {task.name: load_task(task, seed=recipe.seed) for task in recipe.tasks}
    source = resolve_model(recipe.model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    units = _units(AutoConfig.from_pretrained(source), recipe.site)
    k = recipe.discover.n_components
    summaries = []
    for task in recipe.tasks:
        data = documents[task.name]
        cut = question_cut(data, tokenizer, task.max_length)
        if cut is not None:
            raise RecipeError(cut)
        tokens = sum(
            len(ids) for ids in tokenize(tokenizer, data.texts("calibration"), task.max_length)
        )
        where = f"task {task.name!r}"
        uses_ica = recipe.select.selector == "ica"
        if recipe.discover.scope == "layer":  # each layer's fit lowers its own components
            k = max(1, min(recipe.discover.n_components, tokens - 1, (units or tokens) - 1))
        if uses_ica and not ica_feasible(k, tokens, units or k + 1):
            raise RecipeError(
                f"{where}: discover.n_components={k} needs more than {k} calibration tokens "
                f"and units; the calibration documents give {tokens} tokens"
                + (f" and the model {units} units" if units else "")
                + "; lower discover.n_components or raise calibration_samples/max_length"
            )
        if uses_ica and tokens < MIN_TOKENS_PER_COMPONENT * k:
            logger.warning(
                "%s: only %d calibration tokens for %d ICA components (fewer than "
                "%d per component): networks will be noisy; collect more text or "
                "lower discover.n_components",
                where,
                tokens,
                k,
                MIN_TOKENS_PER_COMPONENT,
            )
        left = documents_left(task, data)
        if left == 0:
            logger.warning(
                "%s: every document is in a split: none is left for the verdict and evaluate "
                "to score; lower calibration_samples, heldout_samples or heal_samples",
                where,
            )
        summaries.append(
            f"{task.name}: {len(data.calibration)}+{len(data.heldout)} docs, "
            f"{tokens} calibration tokens, {left} left for evaluation"
        )
    return summaries


def _units(config: Any, site: str) -> int | None:
    """MLP units at ``site`` from a model config, when its names are the usual ones."""
    config = getattr(config, "text_config", None) or config
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    width = (
        getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
        if site == "hidden"
        else getattr(config, "hidden_size", None)
    )
    if site == "hidden" and width is None and getattr(config, "n_embd", None):
        width = 4 * config.n_embd  # gpt2's default inner width
    return layers * width if layers and width else None


def _budget(budget: float | str) -> str:
    return budget if isinstance(budget, str) else f"{budget:.0%}"
