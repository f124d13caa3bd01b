"""``fbnprune bench RECIPE --out DIR``: selectors x budgets x fills (x healing) vs original."""

from __future__ import annotations

import argparse
from pathlib import Path

from fbnprune.cli.args import add_set_argument, fractions, ints, names, optional_names
from fbnprune.cli.run import OVERWRITE_HELP, inputs
from fbnprune.recipe import load_recipe
from fbnprune.rundir import RunDir, RunLayout, check_run_dir
from fbnprune.rundir.layout import BENCH_DIR, BENCH_ROWS, RESULTS_FILE, RESULTS_TABLE

OVERRIDES = {  # flag -> (recipe.bench field, parser, help)
    "--budgets": ("budgets", fractions, "kept fractions, e.g. 0.05,0.1,0.2 or 10%%,30%%"),
    "--selectors": ("selectors", names, "ica, magnitude, wanda, random"),
    "--random-seeds": ("random_seeds", ints, "seeds of the random selector"),
    "--fills": ("fills", names, "zero, mean"),
    "--heal-budgets": (
        "heal_budgets",
        fractions,
        "budgets that also get a healed variant ('' for none)",
    ),
    "--heal-steps": ("heal_steps", int, "distillation steps per healed variant"),
    "--output-selectors": (
        "output_selectors",
        optional_names,
        "selectors masked at the output site ('' for none)",
    ),
    "--tasks": (
        "tasks",
        names,
        "lm-eval tasks (suite: bbc_topics, word_problems, ppl_news, ppl_wiki, ppl_code)",
    ),
    "--limit": ("limit", int, "documents per task"),
}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench",
        help="benchmark selectors x budgets x fills (x healing) against the original",
        description="Score the original model and, from the same calibration activations, "
        "every selector (ica, magnitude, wanda, random with several seeds) at every budget "
        "with dropped units zeroed or replaced by their calibration mean, healed variants "
        "at the heal budgets, and the paper's output site masked; then measure size and "
        "CPU prefill/decode speed of the slices against the original, interleaved in one "
        "process. The grid is the recipe's bench section; flags override it. Writes "
        f"OUT/{BENCH_DIR}/{RESULTS_FILE}, {RESULTS_TABLE}, <task>.png and healing.png. An "
        f"interrupted benchmark resumes from {BENCH_DIR}/{BENCH_ROWS}.",
        epilog="Example: fbnprune bench recipes/demo.yaml --out runs/demo "
        "(reuses the collect and discover stages of `fbnprune run` in the same directory).",
    )
    parser.add_argument("recipe", type=Path, help="recipe YAML (see recipes/)")
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="run directory (collect/discover are shared with fbnprune run)",
    )
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--no-cost", action="store_true", help="skip the size/speed table")
    add_set_argument(parser)
    for flag, (_, kind, text) in OVERRIDES.items():
        parser.add_argument(flag, type=kind, help=text)
    parser.set_defaults(execute=execute)


def execute(args: argparse.Namespace) -> int:
    from fbnprune.bench import run_bench
    from fbnprune.recipe import parse_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    overrides = {
        field: getattr(args, flag[2:].replace("-", "_"))
        for flag, (field, _, _) in OVERRIDES.items()
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.no_cost:
        overrides["cost"] = False
    if overrides:
        raw = recipe.model_dump(mode="json")
        raw["bench"].update(overrides)
        recipe = parse_recipe(raw, origin=f"{args.recipe} (with command-line overrides)")
    check_run_dir(args.out, overwrite=args.overwrite, protected=inputs(args, recipe))
    with RunDir(args.out).lock():  # one process at a time in --out
        results = run_bench(
            recipe, args.out, progress=not args.no_progress, overwrite=args.overwrite
        )
    bench_dir = RunLayout(args.out).bench_dir
    print(f"benchmark: {bench_dir / RESULTS_TABLE}")
    for name in results.get("figures", {}).values():
        print(f"figure: {bench_dir / name}")
    return 0
