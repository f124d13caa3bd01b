"""What discovery gives: a task's ICA fitted with the recipe's engine and scope, and the
network score of each unit that selection reads."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fbnprune.collect.activations import Activations
from fbnprune.discover.dask_ica import DaskGroupICA, discover_input
from fbnprune.discover.group_ica import GroupICA
from fbnprune.discover.layer_ica import LayerICA
from fbnprune.recipe import DiscoverConfig


@dataclass(frozen=True)
class NetworkScores:
    """A task's ICA evidence per unit: ``scores`` of shape (n_units,), max |z| over maps."""

    task: str
    scores: np.ndarray


def fit_networks(cfg: DiscoverConfig, acts: Activations, *, seed: int) -> GroupICA | LayerICA:
    """The ICA of one task's activations, fitted with the engine and scope ``cfg`` names
    (the discover stage's, and ``fbnprune.prune``'s in memory)."""
    estimator: Callable[..., GroupICA] = GroupICA
    data: Any = discover_input(acts)  # scope layer: one layer's columns at a time
    if cfg.engine == "dask":
        estimator = functools.partial(DaskGroupICA, memory=cfg.memory)
    elif cfg.scope == "group":  # one copy of the matrix in memory, centred in place
        estimator = functools.partial(GroupICA, copy=False)
        data = acts.read_matrix()
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
