"""ICA fits of the analysis: templates, individual networks, and the component sweep.

- Templates: ``GroupICA(n_templates)`` on the template samples' tokens.
- Individual networks: ``GroupICA(k)`` on the tokens of one unit (one sample, or merged short
  ones), for every unit.
- Component sweep (preservation curve): group ICA at several ``n_components`` on the same
  tokens. Randomized PCA is the dominant cost and its leading components are nested, so
  ``ComponentSweep`` reduces once to the largest k and runs FastICA on the first k reduced
  columns for each k. That is ``GroupICA(k)`` (same centring, whitening, FastICA settings,
  z-scoring, sign convention and threshold) computed from one shared PCA.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from tqdm.auto import tqdm

from fbnprune.analyze.samples import Unit
from fbnprune.discover.group_ica import GroupICA, ica_feasible, ica_maps
from fbnprune.recipe import DiscoverConfig


@dataclass
class NetworkSet:
    """Networks of one ICA fit: z-maps (k, n_neurons) and membership ``|z| >= threshold``."""

    z: np.ndarray
    members: np.ndarray
    converged: bool

    @property
    def sizes(self) -> list[int]:
        return [int(s) for s in self.members.sum(axis=1)]

    def union(self) -> np.ndarray:
        return np.asarray(self.members.any(axis=0))


@dataclass
class IndividualNetworks:
    """Every network of every unit, stacked: ``members`` (n_networks, n_neurons) and the
    unit each came from (``owners``)."""

    members: np.ndarray
    owners: np.ndarray
    n_units: int
    not_converged: int


def fit_group(matrix: np.ndarray, k: int, discover: DiscoverConfig, seed: int) -> NetworkSet:
    """``GroupICA(k)`` on a tokens x neurons matrix."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ica = GroupICA(
            n_components=k,
            threshold=discover.threshold,
            max_iter=discover.max_iter,
            tol=discover.tol,
            random_state=seed,
        ).fit(matrix)
    return NetworkSet(ica.z_maps_, ica.networks_, ica.converged_)


def fit_individual(
    matrix: np.ndarray,
    sample_index: np.ndarray,
    units: list[Unit],
    discover: DiscoverConfig,
    seed: int,
    *,
    progress: bool = False,
    desc: str = "individual ICA",
) -> IndividualNetworks:
    """One ``GroupICA`` per unit, on that unit's tokens only."""
    members, owners, not_converged = [], [], 0
    for u, unit in enumerate(tqdm(units, desc=desc, leave=False, disable=not progress)):
        rows = np.flatnonzero(np.isin(sample_index, unit.samples))
        nets = fit_group(matrix[rows], unit.n_components, discover, seed)
        members.append(nets.members)
        owners.extend([u] * len(nets.members))
        not_converged += not nets.converged
    n = matrix.shape[1]
    stacked = np.concatenate(members) if members else np.zeros((0, n), dtype=bool)
    return IndividualNetworks(
        stacked, np.asarray(owners, dtype=np.int64), len(units), not_converged
    )


class ComponentSweep:
    """Group ICA at several ``n_components`` from one randomized PCA (see module doc)."""

    def __init__(self, matrix: np.ndarray, k_max: int, seed: int) -> None:
        n_tokens, n_neurons = matrix.shape
        if not ica_feasible(k_max, n_tokens, n_neurons):
            raise ValueError(f"k={k_max} needs more than {k_max} tokens and neurons")
        pca = PCA(n_components=k_max, svd_solver="randomized", random_state=seed)
        self.reduced = pca.fit_transform(np.asarray(matrix, dtype=np.float32))
        self.components = pca.components_.astype(np.float64)
        self.k_max, self.seed = k_max, seed

    def networks(self, k: int, discover: DiscoverConfig) -> NetworkSet:
        if not 2 <= k <= self.k_max:
            raise ValueError(f"k={k} outside [2, {self.k_max}]")
        _, z, converged, _ = ica_maps(
            self.reduced[:, :k],
            self.components[:k],
            max_iter=discover.max_iter,
            tol=discover.tol,
            random_state=self.seed,
        )
        return NetworkSet(z.astype(np.float32), np.abs(z) >= discover.threshold, converged)
