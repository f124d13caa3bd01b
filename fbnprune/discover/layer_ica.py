"""Per-layer ICA: ``discover.scope: layer``, one decomposition per layer's column block.

Group ICA (``GroupICA``, ``DaskGroupICA``) decomposes all layers' units together, so one
network may span layers and the PCA holds every unit at once. ``LayerICA`` fits a copy of
either estimator on each layer's columns alone: memory holds one layer's block (a memmap's
pages are released after each layer; a store is read one layer's chunk column at a time),
and each layer gets its own ``n_components`` maps, z-scored within the layer.

Components per layer: ``min(n_components, width - 1, n_tokens - 1)``, the most a PCA of
that block allows (``ica_feasible``); a layer narrower than 2 units, or fewer than 2 tokens,
is an error. With one layer this is exactly the group fit.

The results keep ``GroupICA``'s shapes in a *block layout*: ``z_maps_[:, layer]`` holds that
layer's maps in its first ``n_components_[layer]`` rows and zeros below (z = 0 is in no
network), so ``neuron_scores`` (max |z| over maps), ``union`` and select read them as they
read a group fit's. Rows of different layers' blocks are unrelated decompositions.
"""

from __future__ import annotations

import copy
import mmap
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from fbnprune.discover.group_ica import DiscoverError, GroupICA

# rows copied from a memmap between releases of its pages (bounds the file pages resident)
COPY_BYTES = 64 * 2**20


def layer_components(n_components: int, n_tokens: int, widths: Sequence[int]) -> list[int]:
    """Components of each layer's fit: ``min(n_components, width - 1, n_tokens - 1)``."""
    ks = [min(n_components, w - 1, n_tokens - 1) for w in widths]
    if min(ks, default=0) < 1:
        raise DiscoverError(
            f"per-layer ICA needs at least 2 tokens and 2 units per layer; got {n_tokens} "
            f"tokens and layer widths {sorted(set(widths))}"
        )
    return ks


def release_pages(X: Any) -> None:
    """Drop the pages of a memmap that this process has read (they stay in the page cache,
    off this process's resident memory); anything else is left alone."""
    mapping = getattr(X, "_mmap", None)
    if isinstance(mapping, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def read_columns(X: Any, start: int, stop: int) -> np.ndarray:
    """``X[:, start:stop]`` as a float32 array in memory, copied from a memmap a few rows at a
    time with its pages released, so only the block itself stays resident."""
    n_rows = X.shape[0]
    out = np.empty((n_rows, stop - start), dtype=np.float32)
    step = max(1, COPY_BYTES // (4 * max(1, stop - start)))
    for row in range(0, n_rows, step):
        out[row : row + step] = X[row : row + step, start:stop]
        release_pages(X)
    return out


class LayerICA:
    """One ``GroupICA`` (or ``DaskGroupICA``) per layer, in the form of a scikit-learn
    meta-estimator.

    Args:
        estimator: the unfitted estimator copied for every layer (its ``n_components`` is
            lowered where a layer allows fewer; every other parameter is kept, the
            ``random_state`` too).
        layer_widths: units per layer; columns are layers concatenated in order.

    Attributes:
        n_components_: int ndarray of shape (n_layers,): components fitted per layer.
        maps_, z_maps_: float32 ndarrays of shape (max(n_components_), n_neurons), in the
            block layout (see the module docstring).
        networks_: bool ndarray of the same shape: ``|z_maps_| >= threshold``.
        explained_variance_ratio_: ndarray of shape (n_layers, max(n_components_)), within
            each layer, zeros past its components.
        n_iter_: the most FastICA iterations of any layer.
        converged_: whether every layer's FastICA converged.
    """

    def __init__(self, *, estimator: GroupICA, layer_widths: Sequence[int]) -> None:
        self.estimator = estimator
        self.layer_widths = layer_widths

    @property
    def threshold(self) -> float:
        return self.estimator.threshold

    def fit(self, X: Any, y: None = None) -> LayerICA:
        """Fit on ``X`` of shape (n_tokens, n_neurons): a numpy array or memmap, an
        ``ActivationStore``, or (with a ``DaskGroupICA``) a ``dask.array``. Returns self."""
        widths = [int(w) for w in self.layer_widths]
        n_tokens, n_neurons = (int(n) for n in X.shape)
        if sum(widths) != n_neurons:
            raise DiscoverError(
                f"layer widths sum to {sum(widths)}, the matrix has {n_neurons} columns"
            )
        ks = layer_components(self.estimator.n_components, n_tokens, widths)
        rows = max(ks)
        self.maps_ = np.zeros((rows, n_neurons), dtype=np.float32)
        self.z_maps_ = np.zeros((rows, n_neurons), dtype=np.float32)
        self.explained_variance_ratio_ = np.zeros((len(widths), rows), dtype=np.float32)
        iters, converged = [], []
        bounds = np.cumsum([0, *widths])
        for layer, (k, start, stop) in enumerate(zip(ks, bounds[:-1], bounds[1:], strict=True)):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fit = self._layer_estimator(k).fit(self._block(X, layer, int(start), int(stop)))
            for w in caught:  # the layer's warnings (convergence, few tokens), named
                warnings.warn(f"layer {layer}: {w.message}", w.category, stacklevel=2)
            self.maps_[:k, start:stop] = fit.maps_
            self.z_maps_[:k, start:stop] = fit.z_maps_
            self.explained_variance_ratio_[layer, :k] = fit.explained_variance_ratio_
            iters.append(fit.n_iter_)
            converged.append(fit.converged_)
            release_pages(X)
        self.n_components_ = np.asarray(ks)
        self.n_iter_ = max(iters)
        self.converged_ = all(converged)
        self.networks_ = np.abs(self.z_maps_) >= self.threshold
        return self

    def _layer_estimator(self, k: int) -> GroupICA:
        estimator = copy.deepcopy(self.estimator)
        estimator.n_components = k
        return estimator

    def _block(self, X: Any, layer: int, start: int, stop: int) -> Any:
        """What the layer's estimator reads: the dask engine a lazy view (a store's chunk
        column, a memmap's columns), the in-memory one the block itself."""
        from fbnprune.collect.store import ActivationStore
        from fbnprune.discover.dask_ica import DaskGroupICA, StoreLayer

        lazy = isinstance(self.estimator, DaskGroupICA)
        if isinstance(X, ActivationStore):
            return StoreLayer(X, layer) if lazy else X.layer(layer)
        if lazy or not isinstance(X, np.ndarray):  # a dask.array stays lazy
            return X[:, start:stop]
        return read_columns(X, start, stop)

    def neuron_scores(self) -> np.ndarray:
        """Network evidence per neuron: the largest ``|z|`` over its layer's maps."""
        return np.abs(self.z_maps_).max(axis=0)

    def union(self) -> np.ndarray:
        """Neurons in at least one of their layer's networks."""
        return np.asarray(self.networks_.any(axis=0))

    def network_sizes(self) -> np.ndarray:
        """Units in each network, layer by layer (``n_components_.sum()`` networks)."""
        bounds = np.cumsum([0, *self.layer_widths])
        return np.concatenate(
            [
                self.networks_[:k, a:b].sum(axis=1)
                for k, a, b in zip(self.n_components_, bounds[:-1], bounds[1:], strict=True)
            ]
        )
