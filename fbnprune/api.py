"""The package's face in code: ``run`` a recipe into a run directory, or ``prune`` a model
held in memory (the way ``llmcompressor.oneshot`` is called)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from fbnprune.accel import Launch
    from fbnprune.pipeline import RunSummary
    from fbnprune.plan import PrunePlan
    from fbnprune.recipe import Recipe
    from fbnprune.recipe.base import Allocation, Fill, Layout, Selector, Site


def run(
    recipe: Recipe | str | Path,
    out: str | Path,
    *,
    until: str = "verdict",
    overwrite: bool = False,
    progress: bool = True,
    overrides: Sequence[str] = (),
    scheduler: str | None = None,
    launch: Launch | None = None,
) -> RunSummary:
    """Run a recipe into the run directory ``out``, exactly as ``fbnprune run`` does (the CLI
    calls this).

    Args:
        recipe: a validated ``Recipe`` or the path of its YAML file.
        out: the run directory; finished stages found there are reused.
        until: the last stage to run (``collect`` ... ``verdict``).
        overwrite: replace an earlier run directory instead of resuming it.
        progress: show progress bars.
        overrides: ``KEY=VALUE`` settings applied to a recipe file (``--set``).
        scheduler: the address of a ``dask.distributed`` cluster for ``discover.engine:
            dask`` (None: local threads).
        launch: the main process of an ``accelerate launch``, whose other processes join
            its heal stage (``fbnprune.accel.Launch``).

    Returns:
        The summary the CLI prints: stage times, the plan, parity, checkpoints, verdict.
    """
    from fbnprune.discover.dask_ica import use_scheduler
    from fbnprune.pipeline import run_pipeline
    from fbnprune.recipe import Recipe, load_recipe
    from fbnprune.rundir import RunDir, check_run_dir

    recipe_file = None
    if not isinstance(recipe, Recipe):
        recipe_file, recipe = Path(recipe), load_recipe(recipe, overrides)
    elif overrides:
        raise ValueError("overrides apply to a recipe file; change a Recipe with model_copy")
    # what --overwrite must never delete: the recipe file, a local model
    check_run_dir(out, overwrite=overwrite, protected=(recipe_file, recipe.model))
    # one process at a time in ``out``
    with RunDir(Path(out)).lock(), use_scheduler(scheduler):
        return run_pipeline(
            recipe, Path(out), until=until, overwrite=overwrite, progress=progress, launch=launch
        )


def prune(
    model: PreTrainedModel,
    tokenizer: Any,
    tasks: Mapping[str, Sequence[str]] | Sequence[str],
    *,
    budget: float = 0.10,
    selector: Selector = "ica",
    fill: Fill = "mean",
    site: Site = "hidden",
    allocation: Allocation = "global",
    min_per_layer: float = 0.02,
    layout: Layout = "padded",
    max_length: int = 128,
    batch_size: int = 8,
    n_components: int = 128,
    ridge: float = 1e-3,
    seed: int = 0,
    progress: bool = False,
) -> tuple[PreTrainedModel, PrunePlan]:
    """Prune ``model`` in memory for the prompts of ``tasks``; nothing is written to disk.

    Args:
        model: a causal LM of a supported family; it is copied, not changed.
        tokenizer: its tokenizer.
        tasks: calibration prompts, one list per task name (or one list for one task).
        budget: fraction of MLP units kept, in (0, 1].
        selector: ``ica``, ``magnitude``, ``wanda`` or ``random``.
        fill: how dropped units are compensated: ``zero``, ``mean`` or ``reconstruct``.
        site: ``hidden`` (MLP units) or ``output`` (MLP output channels).
        allocation: ``global`` or ``uniform`` (``sensitivity`` needs a run: use ``run``).
        min_per_layer: floor on the fraction kept in every layer.
        layout: ``padded`` or ``compact``.
        max_length, batch_size: tokens per prompt and prompts per forward pass.
        n_components, seed: the ICA's components and random state (``ica`` selector).
        ridge: the refit's ridge term (``reconstruct`` fill).
        progress: show progress bars.

    Returns:
        The sliced copy of ``model`` (in eval mode) and its ``PrunePlan``.
    """
    from fbnprune.collect.activations import collect_activations
    from fbnprune.discover.fitting import NetworkScores, fit_networks
    from fbnprune.pruning.slicing import slice_model
    from fbnprune.recipe import DiscoverConfig, PruneConfig, SelectConfig
    from fbnprune.select.calibration import Calibration
    from fbnprune.select.planning import plan_of

    if allocation == "sensitivity":
        raise ValueError("allocation='sensitivity' needs a run directory: use fbnprune.run")
    select = SelectConfig(
        selector=selector, budget=budget, allocation=allocation, min_per_layer=min_per_layer
    )  # validated as a recipe's would be
    PruneConfig(fill=fill, ridge=ridge)
    prompts = {"task": list(tasks)} if not isinstance(tasks, Mapping) else dict(tasks)
    acts = {
        name: collect_activations(
            model,
            tokenizer,
            list(p),
            site=site,
            max_length=max_length,
            batch_size=batch_size,
            progress=progress,
        )
        for name, p in prompts.items()
    }
    networks: dict[str, NetworkScores] = {}
    if selector == "ica":
        discover = DiscoverConfig(n_components=n_components)
        networks = {
            name: NetworkScores(name, fit_networks(discover, a, seed=seed).neuron_scores())
            for name, a in acts.items()
        }
    calibration = Calibration(acts, networks, model=lambda: model)
    plan = plan_of(
        calibration,
        select,
        fill,
        seed=seed,
        ridge=ridge,
        model=str(getattr(model.config, "_name_or_path", "")),
        model_type=model.config.model_type,
        site=site,
        progress=progress,
    )
    return slice_model(copy.deepcopy(model), plan, layout=layout).eval(), plan
