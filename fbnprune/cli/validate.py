"""``fbnprune validate RECIPE``: check a recipe without running it."""

from __future__ import annotations

import argparse
from pathlib import Path

from fbnprune.recipe import load_recipe


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
    parser.set_defaults(execute=execute)


def execute(args: argparse.Namespace) -> int:
    for path in args.recipe:
        recipe = load_recipe(path)
        line = (
            f"{path}: ok ({recipe.name}: {recipe.model}, {len(recipe.tasks)} task(s), "
            f"budget {recipe.select.budget:.0%}, site {recipe.site})"
        )
        if args.data:
            from fbnprune.data import load_task

            counts = []
            for task in recipe.tasks:
                data = load_task(task, seed=recipe.seed)
                counts.append(f"{task.name}: {len(data.calibration)}+{len(data.heldout)} docs")
            line += "; " + ", ".join(counts)
        print(line)
    return 0
