"""Stage 2, discover: group (or per-layer) ICA of a task's activations, one network score
per unit."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fbnprune.collect import Activations
from fbnprune.discover import GroupICA
from fbnprune.layer_ica import LayerICA
from fbnprune.recipe import DiscoverConfig
from fbnprune.rundir.context import RunContext
from fbnprune.scale.discover import DaskGroupICA, discover_input
from fbnprune.stages.keys import discover_key


@dataclass(frozen=True)
class NetworkScores:
    """A task's ICA evidence per unit: ``scores`` of shape (n_units,), max |z| over maps."""

    task: str
    scores: np.ndarray


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


def fit_networks(cfg: DiscoverConfig, acts: Activations, *, seed: int) -> GroupICA | LayerICA:
    """The ICA of one task's activations, fitted with the engine and scope ``cfg`` names
    (the discover stage's, and ``fbnprune.prune``'s in memory)."""
    estimator: Callable[..., GroupICA] = GroupICA
    data: Any = acts.matrix if cfg.scope == "group" else discover_input(acts)
    if cfg.engine == "dask":
        estimator = functools.partial(DaskGroupICA, memory=cfg.memory)
        data = discover_input(acts)
    ica = estimator(
        n_components=cfg.n_components,
        threshold=cfg.threshold,
        max_iter=cfg.max_iter,
        tol=cfg.tol,
        random_state=seed,
        standardize=cfg.standardize,
    )
    if cfg.scope == "layer":  # one layer's block at a time: a store's, or a memmap's columns
        return LayerICA(estimator=ica, layer_widths=acts.layer_widths).fit(data)
    return ica.fit(data)


def _discover(ctx: RunContext, task: str, acts: Activations) -> dict[str, Any]:
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
