"""``fbnprune evaluate RUN_DIR``: lm-eval on the original and pruned models of a run."""

from __future__ import annotations

import argparse
from pathlib import Path

from fbnprune.cli.args import names, positive
from fbnprune.evaluate.run_eval import MODEL_KINDS
from fbnprune.recipe import EVAL_SUITE_TASKS
from fbnprune.rundir.layout import (
    CHECKPOINT_PREFIX,
    DOCUMENTS_FILE,
    EVAL_DIR,
    PLAN_FILE,
    RESULTS_FILE,
    RESULTS_TABLE,
    SUITE_DIR,
)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "evaluate",
        help="score the original, masked, sliced and saved models with lm-eval",
        description="Score a run's models on the same lm-eval tasks with the same settings, "
        f"in one process: the original, the original masked by {PLAN_FILE}, the model sliced in "
        f"memory (one per layout) and every saved {CHECKPOINT_PREFIX}*/ directory (healed ones "
        "included). The offline suite (the recipe's own multiple-choice tasks, one per "
        "wording, its generation tasks as generate_until tasks, and "
        f"{', '.join(EVAL_SUITE_TASKS)}) is generated into "
        f"RUN_DIR/{EVAL_DIR}/{SUITE_DIR}/ from documents outside every split the run used "
        f"({DOCUMENTS_FILE}). Writes RUN_DIR/{EVAL_DIR}/{RESULTS_FILE} and "
        f"RUN_DIR/{EVAL_DIR}/{RESULTS_TABLE}.",
        epilog="Multiple-choice tasks report acc: acc_norm divides each label's "
        "log-likelihood by its length in characters, which favours the longest label when "
        "labels are single words. Example: fbnprune evaluate runs/demo --limit 40 "
        "--models original,sliced",
    )
    parser.add_argument("run_dir", type=Path, help="run directory made by `fbnprune run`")
    parser.add_argument(
        "--tasks",
        type=names,
        default=None,
        metavar="T1,T2",
        help="suite tasks, lm-eval task/group/tag names (built-ins outside the suite need "
        "the network) or names from --include-path (default: the recipe's evaluate.tasks, "
        "else the recipe's own multiple-choice and generation tasks and the perplexity "
        "tasks; the whole suite when it has none)",
    )
    parser.add_argument(
        "--models",
        type=names,
        default=list(MODEL_KINDS),
        metavar="K1,K2",
        help=f"which variants to score, from {','.join(MODEL_KINDS)} (default: all)",
    )
    parser.add_argument(
        "--limit",
        type=positive,
        default=None,
        metavar="N",
        help="at most N documents per task (default: the recipe's evaluate.limit, else all)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive,
        default=None,
        metavar="B",
        help="lm-eval batch size (default: the recipe's evaluate.batch_size, 8)",
    )
    parser.add_argument(
        "--max-length",
        type=positive,
        default=None,
        metavar="L",
        help="context window in tokens (default: the model's)",
    )
    parser.add_argument(
        "--include-path",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="a directory of your own lm-eval YAML tasks (repeatable)",
    )
    parser.add_argument(
        "--device", default=None, help="torch device for every model, e.g. cuda (default: cpu)"
    )
    parser.set_defaults(execute=execute)


def execute(args: argparse.Namespace) -> int:
    from fbnprune.evaluate import evaluate_run
    from fbnprune.evaluate.results import results_markdown

    results = evaluate_run(
        args.run_dir,
        tasks=args.tasks,
        models=args.models,
        limit=args.limit,
        batch_size=args.batch_size,
        include_paths=args.include_path,
        device=args.device,
        max_length=args.max_length,
    )
    print(results_markdown(results), end="")
    from fbnprune.rundir.layout import RunLayout

    print(f"results: {RunLayout(args.run_dir).eval_results_file}")
    return 0
