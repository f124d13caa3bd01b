"""The orchestrator: the stages in order over one run directory, each reused when fresh.

Every stage is a function of the run's context and the artifacts of the stages before it
(``Artifacts``); ``STEPS`` lists them, and ``run_pipeline`` runs them up to ``until``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fbnprune.accel import Launch
from fbnprune.check import stage as check
from fbnprune.collect import stage as collect
from fbnprune.collect.activations import Activations
from fbnprune.discover import stage as discover
from fbnprune.discover.fitting import NetworkScores
from fbnprune.heal import stage as heal
from fbnprune.io import atomic_write_text
from fbnprune.parity import ParityResult
from fbnprune.plan import PrunePlan
from fbnprune.pruning import stage as prune
from fbnprune.pruning.stage import PruneReport, Slices
from fbnprune.recipe import Recipe
from fbnprune.rundir import RunDir, StageRecord
from fbnprune.rundir.context import RunContext
from fbnprune.rundir.keys import check_key, heal_key
from fbnprune.rundir.memory import memory_report
from fbnprune.rundir.runner import versions
from fbnprune.save import stage as save
from fbnprune.select import stage as select
from fbnprune.select.calibration import RunCalibration
from fbnprune.verdict import stage as verdict


@dataclass
class Artifacts:
    """What the stages of one run have produced so far."""

    activations: dict[str, Activations] = field(default_factory=dict)
    networks: dict[str, NetworkScores] = field(default_factory=dict)
    plan: PrunePlan | None = None
    slices: Slices | None = None
    prune_report: PruneReport | None = None
    parity: ParityResult | None = None
    checkpoints: dict[str, Path] = field(default_factory=dict)
    verdict: dict[str, Any] | None = None


@dataclass
class RunSummary:
    run_dir: Path
    stages: dict[str, StageRecord]
    plan: PrunePlan | None
    parity: ParityResult | None
    checkpoints: dict[str, Path]
    executed: list[str] = field(default_factory=list)  # the stages computed, not reused
    verdict: dict[str, Any] | None = None  # verdict/verdict.json, when the stage ran


def _collect(ctx: RunContext, art: Artifacts) -> None:
    art.activations = {task: collect.collect(ctx, task) for task in ctx.tasks}


def _discover(ctx: RunContext, art: Artifacts) -> None:
    if ctx.recipe.select.selector == "ica":
        art.networks = {
            task: discover.discover(ctx, task, art.activations[task]) for task in ctx.tasks
        }


def _select(ctx: RunContext, art: Artifacts) -> None:
    art.plan = select.select(ctx, RunCalibration(ctx, art.activations, art.networks))
    art.slices = Slices(ctx, art.plan)
    for acts in art.activations.values():  # read again from disk if the verdict asks
        acts.release_pages()


def _prune(ctx: RunContext, art: Artifacts) -> None:
    assert art.plan is not None and art.slices is not None
    art.prune_report = prune.prune(ctx, art.plan, art.slices)


def _check(ctx: RunContext, art: Artifacts) -> None:
    assert art.plan is not None and art.slices is not None
    art.parity = check.check(ctx, art.plan, art.slices)


def _save(ctx: RunContext, art: Artifacts) -> None:
    assert art.plan is not None and art.slices is not None and art.parity is not None
    if save.recheck_needed(ctx, art.parity):
        art.parity = check.check(ctx, art.plan, art.slices)
    art.checkpoints = save.save(ctx, art.parity)


def _heal(ctx: RunContext, art: Artifacts) -> None:
    assert art.plan is not None
    recipe = ctx.recipe
    if art.slices is not None:
        art.slices.release()  # saved: heal slices or loads its own student
    if recipe.heal.active(art.plan.budget):
        layout = heal.heal_layout(recipe)
        art.checkpoints[f"{layout}-healed"] = heal.heal(ctx, art.plan)
    else:
        heal.discard_healed(ctx, art.plan.budget)


def _verdict(ctx: RunContext, art: Artifacts) -> None:
    assert art.plan is not None
    healed = ctx.recipe.heal.active(art.plan.budget)
    upstream = heal_key(ctx) if healed else check_key(ctx)

    def calibration() -> RunCalibration:
        return RunCalibration(ctx, art.activations, art.networks)

    art.verdict = verdict.verdict(ctx, art.checkpoints, upstream, calibration)


STEPS: list[tuple[str, Callable[[RunContext, Artifacts], None]]] = [
    ("collect", _collect),
    ("discover", _discover),
    ("select", _select),
    ("prune", _prune),
    ("check", _check),
    ("save", _save),
    ("heal", _heal),
    ("verdict", _verdict),
]
STAGES = tuple(name for name, _ in STEPS)


def run_pipeline(
    recipe: Recipe,
    out: Path,
    *,
    until: str = "verdict",
    overwrite: bool = False,
    progress: bool = True,
    launch: Launch | None = None,
) -> RunSummary:
    """Run the recipe's stages up to ``until`` into ``out``; reuse stages that are fresh.
    ``launch``: the main process of an ``accelerate launch``, whose others join its heal."""
    if until not in STAGES:
        raise ValueError(f"unknown stage {until!r}; stages: {', '.join(STAGES)}")
    run = RunDir.open(out, overwrite=overwrite, protected=(recipe.model,))
    run.write_meta(recipe=recipe.name, recipe_fingerprint=recipe.fingerprint(), versions=versions())
    ctx = RunContext(recipe, run, progress=progress, launch=launch)
    atomic_write_text(ctx.layout.recipe_file, recipe.to_yaml())
    ctx.layout.write_documents(ctx.document_ids())
    art = Artifacts()
    for _, step in STEPS[: STAGES.index(until) + 1]:
        step(ctx, art)
    run.write_meta(memory=memory_report(run.path))  # each stage's peak against its needs
    stages = {name: StageRecord(**rec) for name, rec in run.ledger()["stages"].items()}
    return RunSummary(
        run.path, stages, art.plan, art.parity, art.checkpoints, run.executed, art.verdict
    )
