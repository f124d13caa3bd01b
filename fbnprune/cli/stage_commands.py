"""``fbnprune collect|discover|...|heal|verdict RECIPE --out DIR``: run up to a stage.

Each stage subcommand runs the pipeline up to and including that stage, reusing finished
earlier stages in the run directory.
"""

from __future__ import annotations

import argparse

from fbnprune.cli.run import add_run_arguments, execute
from fbnprune.rundir.layout import (
    ACTIVATIONS_FILE,
    COLLECT_DIR,
    DISCOVER_DIR,
    HEAL_DIR,
    HEAL_LOG,
    HEAL_PLOT,
    PARITY_FILE,
    PLAN_FILE,
    PRUNE_FILE,
    VERDICT_DIR,
    VERDICT_FILE,
    checkpoint_name,
)

_CHECKPOINT, _HEALED = checkpoint_name("<layout>"), checkpoint_name("<layout>", healed=True)
DESCRIPTIONS = {
    "collect": "record MLP neuron values per real token of each task's calibration text "
    f"({COLLECT_DIR}/<task>/{ACTIVATIONS_FILE}: tokens x neurons)",
    "discover": "group ICA per task: randomized PCA, FastICA, maps z-scored over neurons "
    f"({DISCOVER_DIR}/<task>.npz)",
    "select": "rank neurons by network evidence and keep the budget under the allocation "
    f"policy ({PLAN_FILE})",
    "prune": f"slice the model in memory for each layout; report sizes ({PRUNE_FILE})",
    "check": "compare masked, sliced and saved-and-reloaded logits on held-out text "
    f"({PARITY_FILE}); fails beyond the tolerance",
    "save": f"write the checked checkpoints ({_CHECKPOINT}/) with plan and recipe",
    "heal": "distil the original model into the sliced one on the task's prompts of the "
    "calibration and healing documents "
    f"({_HEALED}/, {HEAL_DIR}/{HEAL_LOG}, {HEAL_DIR}/{HEAL_PLOT}); skipped unless the "
    "recipe's heal section is active (heal.enabled, or a budget below heal.below_budget)",
    "verdict": "score every multiple-choice and generation task on documents outside every "
    "split: the "
    "original, unhealed and healed models, the majority rate and the spread of the answers; "
    f"flag a constant or below-majority model ({VERDICT_DIR}/{VERDICT_FILE})",
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
