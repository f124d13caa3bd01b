"""``fbnprune analyze RECIPE --out DIR``: templates, recurrence, lesions, preservation curve."""

from __future__ import annotations

import argparse
from pathlib import Path

from fbnprune.cli.args import add_set_argument, ints, names


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "analyze",
        help="functional-network analysis: recurrence, lesions, preservation curve",
        description="Reproduce the seed paper's analyses for a recipe's model and tasks: "
        "template networks (group ICA per task) and their recurrence among networks of "
        "single samples (IoU), templates shared across tasks, lesions of each network "
        "against random controls, and the preservation curve (keep only the networks' "
        "union at several n_components, zero and mean fill), at the hidden and output sites. "
        "Writes report.md, analysis.json and PNG figures into --out. Defaults come from the "
        "recipe's optional analyze: section; the flags override it.",
        epilog="Example (small and quick): fbnprune analyze recipes/analyze-gemma3.yaml "
        "--out runs/analyze-smoke --samples 8 --eval-docs 10 --components 10,32",
    )
    parser.add_argument("recipe", type=Path, help="recipe YAML (see recipes/)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier analysis in --out (only an fbnprune analysis "
        "or an empty folder is replaced; never the working or home directory, "
        "nor a folder holding the recipe or the model)",
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=None,
        metavar="N",
        help="samples per task for templates, and as many for individual ICA (default 100)",
    )
    parser.add_argument(
        "--templates",
        type=int,
        default=None,
        metavar="K",
        dest="n_templates",
        help="template networks per task (default 10)",
    )
    parser.add_argument(
        "--components",
        type=ints,
        default=None,
        metavar="K1,K2",
        dest="preserve_components",
        help="n_components of the preservation curve (default 10,64,128,256,512)",
    )
    parser.add_argument(
        "--eval-docs",
        type=int,
        default=None,
        metavar="M",
        help="documents scored per measured task (default 50)",
    )
    parser.add_argument(
        "--metric-tasks",
        type=names,
        default=None,
        metavar="T1,T2",
        help="tasks measured under lesions and preservation, 'all' or "
        "'none' (default: the first task)",
    )
    parser.add_argument(
        "--sites",
        type=names,
        default=None,
        metavar="S1,S2",
        help="hidden, output or both (default both)",
    )
    parser.add_argument(
        "--seeds",
        type=ints,
        default=None,
        metavar="S1,S2",
        dest="random_seeds",
        help="seeds of the random controls (default 0,1,2)",
    )
    parser.add_argument(
        "--short-samples",
        choices=("merge", "reduce", "skip"),
        default=None,
        help="individual ICA on samples too short for their components (default merge)",
    )
    parser.add_argument("--batch-size", type=int, default=None, metavar="B")
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda (default cpu)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_set_argument(parser)
    parser.set_defaults(execute=execute)


def execute(args: argparse.Namespace) -> int:
    from fbnprune.analyze import analyze, metric_tasks, resolve_config
    from fbnprune.analyze.study import check_out_dir
    from fbnprune.cli.run import inputs
    from fbnprune.recipe import load_recipe
    from fbnprune.rundir import RunDir

    recipe = load_recipe(args.recipe, args.overrides)
    config = resolve_config(
        recipe,
        samples=args.samples,
        n_templates=args.n_templates,
        preserve_components=args.preserve_components,
        eval_docs=args.eval_docs,
        metric_tasks=args.metric_tasks,
        sites=args.sites,
        random_seeds=args.random_seeds,
        short_samples=args.short_samples,
        batch_size=args.batch_size,
    )
    metric_tasks(recipe, config)  # fail on a bad name before loading the model
    check_out_dir(args.out, args.overwrite, protected=inputs(args, recipe))
    with RunDir(args.out).lock():  # one process at a time in --out
        model = tokenizer = None
        if args.device:
            import torch

            from fbnprune.models.loading import load_model

            dtype = getattr(torch, recipe.dtype)
            model, tokenizer = load_model(
                recipe.model, dtype=dtype, device=args.device, allow_pickle=recipe.allow_pickle
            )
        result = analyze(
            recipe,
            args.out,
            config=config,
            model=model,
            tokenizer=tokenizer,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    print(summary(result.data))
    print(f"report: {args.out / 'report.md'}")
    return 0


def summary(data: dict) -> str:
    """A few lines: per measured task and site, the original metric, all-templates lesion,
    same-size random lesion, and the preservation curve."""
    lines = []
    for task, metric in data["metrics"].items():
        key = metric["primary"]
        lines.append(f"{task}: original {key} {metric['original'][key]:.4g}")
        for site, sd in data["sites"].items():
            les = sd["lesions"][task]
            same = les["random_same_size_summary"]
            curve = ", ".join(
                f"k={r['k']} {100 * r['kept_fraction']:.1f}% -> "
                f"{r['zero'][key]:.3g}/{r['mean'][key]:.3g}"
                for r in sd["preservation"][task]["rows"]
            )
            lines.append(
                f"  {site}: all templates ({les['all']['size']} neurons) -> "
                f"{les['all']['scores'][key]:.4g}; random same size -> "
                f"{same['mean']:.4g} ± {same['std']:.2g}; keep union (zero/mean "
                f"fill): {curve}"
            )
    total = data["timings"].get("total")
    if total is not None:
        lines.append(f"total {total:.0f} s")
    return "\n".join(lines)
