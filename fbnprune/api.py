"""The package's face in code: ``run`` a recipe into a run directory, or ``prune`` a model
held in memory (the way ``llmcompressor.oneshot`` is called)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from fbnprune.plan import PrunePlan
    from fbnprune.recipe import Recipe
    from fbnprune.stages.pipeline import RunSummary


def run(
    recipe: Recipe | str | Path,
    out: str | Path,
    *,
    until: str = "heal",
    overwrite: bool = False,
    progress: bool = True,
) -> RunSummary:
    """Run a recipe into the run directory ``out``, exactly as ``fbnprune run`` does.

    Args:
        recipe: a validated ``Recipe`` or the path of its YAML file.
        out: the run directory; finished stages found there are reused.
        until: the last stage to run (``collect`` ... ``heal``).
        overwrite: replace an earlier run directory instead of resuming it.
        progress: show progress bars.

    Returns:
        The summary the CLI prints: stage times, the plan, parity, checkpoints.
    """
    from fbnprune.recipe import Recipe, load_recipe
    from fbnprune.rundir import RunDir, check_run_dir
    from fbnprune.stages.pipeline import run_pipeline

    recipe_file = None
    if not isinstance(recipe, Recipe):
        recipe_file, recipe = Path(recipe), load_recipe(recipe)
    # what --overwrite must never delete: the recipe file, a local model
    check_run_dir(out, overwrite=overwrite, protected=(recipe_file, recipe.model))
    with RunDir(Path(out)).lock():  # one process at a time in ``out``
        return run_pipeline(recipe, Path(out), until=until, overwrite=overwrite,
                            progress=progress)


def prune(
    model: nn.Module,
    tokenizer: Any,
    tasks: Mapping[str, Sequence[str]] | Sequence[str],
    *,
    budget: float = 0.10,
    selector: str = "ica",
    fill: str = "mean",
    site: str = "hidden",
    allocation: str = "global",
    min_per_layer: float = 0.02,
    layout: str = "padded",
    max_length: int = 128,
    batch_size: int = 8,
    n_components: int = 128,
    ridge: float = 1e-3,
    seed: int = 0,
    progress: bool = False,
) -> tuple[nn.Module, PrunePlan]:
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
    import numpy as np

    from fbnprune.collect import collect_activations
    from fbnprune.discover import GroupICA
    from fbnprune.plan import PrunePlan
    from fbnprune.recipe import DiscoverConfig, PruneConfig, SelectConfig
    from fbnprune.refit import refit_plan
    from fbnprune.rundir import now
    from fbnprune.rundir.runner import versions
    from fbnprune.select import allocate, column_means, layer_bounds, unit_scores
    from fbnprune.slicing import slice_model

    if allocation == "sensitivity":
        raise ValueError("allocation='sensitivity' needs a run directory: use fbnprune.run")
    select = SelectConfig(selector=selector, budget=budget, allocation=allocation,  # type: ignore[arg-type]
                          min_per_layer=min_per_layer)  # validated as a recipe's would be
    PruneConfig(fill=fill, ridge=ridge)  # type: ignore[arg-type]
    prompts = {"task": list(tasks)} if not isinstance(tasks, Mapping) else dict(tasks)
    acts = {
        name: collect_activations(model, tokenizer, list(p), site=site, max_length=max_length,
                                  batch_size=batch_size, progress=progress)
        for name, p in prompts.items()
    }  # fmt: skip
    widths = next(iter(acts.values())).layer_widths
    discover = DiscoverConfig(n_components=n_components)

    def task_scores(matrix: np.ndarray) -> np.ndarray:
        if selector != "ica":
            return unit_scores(selector, model, matrix, seed=seed)
        ica = GroupICA(n_components=discover.n_components, threshold=discover.threshold,
                       max_iter=discover.max_iter, tol=discover.tol, random_state=seed,
                       standardize=discover.standardize).fit(matrix)  # fmt: skip
        return ica.neuron_scores()

    scores = np.max([task_scores(a.matrix) for a in acts.values()], axis=0)
    layers = layer_bounds(widths)
    kept = allocate([scores[a:b] for a, b in layers], select.budget, policy=select.allocation,
                    min_per_layer=select.min_per_layer)  # fmt: skip
    fill_values = None
    if fill == "mean":
        tokens = sum(a.n_tokens for a in acts.values())
        means = sum(column_means(a.matrix).astype(np.float64) * a.n_tokens
                    for a in acts.values()) / tokens  # fmt: skip
        fill_values = [means[a:b].astype(np.float32).tolist() for a, b in layers]
    refit = None
    if fill == "reconstruct":
        refit = refit_plan(model, [a.matrix for a in acts.values()], list(widths), kept,
                           ridge=ridge, progress=progress)  # fmt: skip
    provenance = {
        "calibration_tokens": {t: a.n_tokens for t, a in acts.items()},
        "seed": seed, "budget": budget, "allocation": allocation,
        "min_per_layer": min_per_layer, "selector": selector,
        "kept_per_layer": [len(k) for k in kept], "versions": versions(), "created": now(),
    }  # fmt: skip
    plan = PrunePlan(
        model=str(getattr(model.config, "_name_or_path", "")), model_type=model.config.model_type,
        site=site, fill=fill, layer_widths=list(widths), kept=kept, fill_values=fill_values,
        provenance=provenance, refit=refit,
    )  # fmt: skip
    return slice_model(copy.deepcopy(model), plan, layout=layout).eval(), plan
