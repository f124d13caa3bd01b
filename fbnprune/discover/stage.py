"""Stage 2, discover: group (or per-layer) ICA of a task's activations, one network score
per unit."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from fbnprune.collect.activations import Activations
from fbnprune.discover.fitting import NetworkScores, fit_networks
from fbnprune.discover.group_ica import GroupICA
from fbnprune.discover.layer_ica import LayerICA
from fbnprune.rundir.context import RunContext
from fbnprune.rundir.keys import discover_key


def discover(ctx: RunContext, task: str, activations: Activations) -> NetworkScores:
    """The task's network scores: reused when fresh, else fitted on ``activations``."""
    file = ctx.layout.discover_file(task)
    ctx.run.stage(
        f"discover:{task}",
        discover_key(ctx, task),
        [file],
        lambda: _discover(ctx, task, activations),
    )
    with np.load(file) as data:
        return NetworkScores(task, data["scores"])


def _discover(ctx: RunContext, task: str, acts: Activations) -> dict[str, Any]:
    # the ICA reads the matrix alone: the model is loaded again by the stage that needs it
    ctx.release_model()
    ica = fit_networks(ctx.recipe.discover, acts, seed=ctx.recipe.seed)
    file = ctx.layout.discover_file(task)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.tmp.npz")
    np.savez(
        tmp,
        scores=ica.neuron_scores(),
        z_maps=ica.z_maps_,
        explained_variance_ratio=ica.explained_variance_ratio_,
        layer_widths=np.asarray(acts.layer_widths),
        scope=np.asarray(ctx.recipe.discover.scope),
        components_per_layer=_components_per_layer(ica, len(acts.layer_widths)),
    )
    os.replace(tmp, file)
    return {
        "n_iter": ica.n_iter_,
        "converged": ica.converged_,
        # per layer with scope: layer (each layer's PCA explains its own units), then averaged
        "explained_variance": float(ica.explained_variance_ratio_.sum(axis=-1).mean()),
        "network_size_median": float(np.median(ica.network_sizes())),
        "union_units": int(ica.union().sum()),
    }


def _components_per_layer(ica: GroupICA | LayerICA, n_layers: int) -> np.ndarray:
    """Maps fitted on each layer's units: its own with scope: layer, all of them for group."""
    if isinstance(ica, LayerICA):
        return ica.n_components_
    return np.full(n_layers, ica.n_components)
