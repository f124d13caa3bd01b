"""``fbnprune collect|discover|select|prune|check|save|heal RECIPE --out DIR``: run up to a stage.

Each stage subcommand runs the pipeline up to and including that stage, reusing finished
earlier stages in the run directory.
"""

from __future__ import annotations

import argparse

from fbnprune.cli.run import add_run_arguments, execute

DESCRIPTIONS = {
    "collect": "record MLP neuron values per real token of each task's calibration text "
    "(collect/<task>/activations.npy: tokens x neurons)",
    "discover": "group ICA per task: randomized PCA, FastICA, maps z-scored over neurons "
    "(discover/<task>.npz)",
    "select": "rank neurons by network evidence and keep the budget under the allocation "
    "policy (plan.json)",
    "prune": "slice the model in memory for each layout; report sizes (prune.json)",
    "check": "compare masked, sliced and saved-and-reloaded logits on held-out text "
    "(parity.json); fails beyond the tolerance",
    "save": "write the checked checkpoints (checkpoint-<layout>/) with plan and recipe",
    "heal": "distil the original model into the sliced one on the task's prompts of the "
    "calibration and healing documents "
    "(checkpoint-<layout>-healed/, heal/log.json, heal/loss.png); skipped unless the "
    "recipe's heal section is active (heal.enabled, or a budget below heal.below_budget)",
}


def register(sub: argparse._SubParsersAction) -> None:
    for stage, text in DESCRIPTIONS.items():
        parser = sub.add_parser(
            stage,
            help=text.split(" (")[0],
            description=f"{text}. Earlier stages run first if needed.",
        )
        add_run_arguments(parser)
        parser.set_defaults(execute=execute, until=stage)
