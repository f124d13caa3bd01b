"""``fbnprune run RECIPE --out DIR``: every stage into one run directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from fbnprune.cli.args import add_set_argument
from fbnprune.pipeline import STAGES, RunSummary
from fbnprune.recipe import Recipe, load_recipe
from fbnprune.rundir.layout import (
    HEAL_DIR,
    HEAL_LOG,
    HEAL_PLOT,
    LAYOUTS,
    PARITY_FILE,
    PLAN_FILE,
    VERDICT_DIR,
    VERDICT_FILE,
    VERDICT_TABLE,
    checkpoint_name,
)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", type=Path, help="recipe YAML (see recipes/)")
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="run directory; an earlier run there is resumed, finished stages "
        "whose inputs did not change are reused",
    )
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_set_argument(parser)
    parser.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run discover.engine: dask on the dask.distributed cluster at "
        "ADDRESS (tcp://host:8786), whose workers can read --out "
        "(default: local threads within discover.memory)",
    )


OVERWRITE_HELP = (
    "discard the earlier run in --out first (only an fbnprune run directory or an "
    "empty folder is replaced; never the working or home directory, nor a folder "
    "holding the recipe or the model)"
)


def inputs(args: argparse.Namespace, recipe: Recipe) -> tuple[Path, str]:
    """What a command reads and --overwrite must never delete: the recipe file, the model
    (a local directory or .gguf file; a Hub id or packaged name is not a path and is skipped)."""
    return args.recipe, recipe.model


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "run",
        help="run every stage: collect, discover, select, prune, check, save, heal, verdict",
        description=f"Run a recipe end to end into one run directory: the plan ({PLAN_FILE}), "
        f"the parity report ({PARITY_FILE}), one checkpoint per layout "
        f"({', '.join(f'{checkpoint_name(layout)}/' for layout in LAYOUTS)}) and, when the "
        "recipe's heal section is active (by default below 50% kept), a distilled "
        f"{checkpoint_name('<layout>', healed=True)}/ with {HEAL_DIR}/{HEAL_LOG} and "
        f"{HEAL_DIR}/{HEAL_PLOT}; then the verdict: every multiple-choice task (and every "
        "generation task, its written answers scored by exact match or chrF) scored on "
        "documents outside every split, for the original, unhealed and healed models "
        f"({VERDICT_DIR}/{VERDICT_FILE}, {VERDICT_DIR}/{VERDICT_TABLE}), with flags for a "
        "constant or below-majority model.",
    )
    add_run_arguments(parser)
    parser.add_argument(
        "--until",
        choices=STAGES,
        default="verdict",
        help="stop after this stage (default: verdict, the last)",
    )
    parser.set_defaults(execute=execute)


def execute(args: argparse.Namespace) -> int:
    """Run the stages; under ``accelerate launch`` with several processes, the main one runs
    them (holding the lock) and the others only join its heal stage."""
    from fbnprune.accel import Launch, launched_processes, make_accelerator
    from fbnprune.api import run
    from fbnprune.heal.launch import follow

    load_recipe(args.recipe, args.overrides)  # a bad recipe fails at once, in every process
    launch = Launch(make_accelerator()) if launched_processes() > 1 else None
    if launch is not None and not launch.is_main:
        follow(launch)
        return 0
    try:
        summary = run(
            args.recipe,
            args.out,
            until=args.until,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            overrides=args.overrides,
            scheduler=args.scheduler,
            launch=launch,
        )
    finally:
        if launch is not None:
            launch.tell(None)  # heal did not train (off, fresh, or failed): the others exit
    print(format_summary(summary))
    return 0


STOPPED_BY = {
    "steps": "ran its heal.steps",
    "patience": "stopped early: the held-out loss stopped improving (heal.patience)",
    "time": "stopped by heal.max_minutes, before heal.steps: a busier machine heals less",
    "tokens": "stopped by heal.max_tokens",
}


def heal_line(details: dict) -> str:
    """How many steps the heal ran and why it stopped, from the heal stage's details."""
    why = STOPPED_BY.get(details.get("stopped_by", ""), details.get("stopped_by", "?"))
    return (
        f"heal: {details['steps']} steps, {why}; loss {details['loss_first']:.4f} -> "
        f"{details['loss_last']:.4f}"
    )


def format_summary(summary: RunSummary) -> str:
    lines = [f"run directory: {summary.run_dir}"]
    for name, rec in summary.stages.items():
        lines.append(f"  {name:<22} {rec.seconds:8.1f} s  peak {rec.peak_rss_mib:7.0f} MiB")
    if summary.plan is not None:
        lines.append(f"plan: {summary.plan.summary()}")
    if summary.parity is not None:
        lines.append(summary.parity.table())
    for layout, path in summary.checkpoints.items():
        lines.append(f"checkpoint ({layout}): {path}")
    heal = summary.stages.get("heal")
    if heal is not None and "steps" in heal.details:
        lines.append(heal_line(heal.details))
    if summary.verdict is not None:
        from fbnprune.verdict.judgement import verdict_table

        lines += ["", verdict_table(summary.verdict).rstrip()]
    return "\n".join(lines)
