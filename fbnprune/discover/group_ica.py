"""Discover: functional networks by group ICA over a tokens x neurons matrix.

As in fMRI group ICA (CanICA, GIFT): centre the matrix, reduce it with randomized PCA to
``n_components``, run FastICA in the reduced space, and project the mixing matrix back to
neurons. Each component then has a *map* over all neurons; z-scored across neurons, its
entries with ``|z| >= threshold`` form one functional network.

Sign convention: ICA components have no intrinsic sign. Each map is flipped so that its
heavier tail is positive (positive skewness), which makes maps comparable across runs and
plots; network membership uses ``|z|``, so the flip never changes a network.
"""

from __future__ import annotations

import warnings
from typing import Self, TypedDict

import numpy as np
from sklearn.decomposition import PCA, FastICA
from sklearn.exceptions import ConvergenceWarning

from fbnprune.errors import FbnpruneError


class DiscoverError(FbnpruneError, ValueError):
    """Data that group ICA cannot decompose as asked."""


class ICAParams(TypedDict, total=False):
    """``GroupICA``'s parameters, for estimators that take them on (``DaskGroupICA``)."""

    n_components: int
    threshold: float
    max_iter: int
    tol: float
    random_state: int | None
    standardize: bool


class GroupICA:
    """Group ICA network discovery, in the form of a scikit-learn estimator.

    Args:
        n_components: number of PCA components kept and of independent components.
        threshold: |z| at or above which a neuron belongs to a component's network
            (the seed paper uses 3.6).
        max_iter: FastICA iterations.
        tol: FastICA tolerance.
        random_state: seed of the randomized PCA and of FastICA.
        standardize: divide every neuron by its standard deviation before the PCA, so the
            decomposition is not drawn to the loudest neurons (maps are then over
            standardised neurons).
        copy: when False, ``fit`` centres (and scales) a writable float32 ``X`` in place and
            leaves it overwritten, as scikit-learn's ``PCA(copy=False)``: the fit then holds
            one matrix, not two. The result is the same either way.

    Attributes:
        mean_: ndarray of shape (n_neurons,): per-neuron mean that was removed.
        pca_components_: ndarray of shape (n_components, n_neurons).
        explained_variance_ratio_: ndarray of shape (n_components,).
        maps_: ndarray of shape (n_components, n_neurons): the mixing matrix projected back
            to neurons, sign-flipped to positive skew.
        z_maps_: ndarray of shape (n_components, n_neurons): ``maps_`` z-scored per row.
        networks_: bool ndarray of shape (n_components, n_neurons): ``|z_maps_| >= threshold``.
        n_iter_: FastICA iterations run.
        converged_: whether FastICA converged within ``max_iter``.
    """

    def __init__(
        self,
        *,
        n_components: int = 128,
        threshold: float = 3.6,
        max_iter: int = 400,
        tol: float = 1e-4,
        random_state: int | None = 0,
        standardize: bool = False,
        copy: bool = True,
    ) -> None:
        self.n_components = n_components
        self.threshold = threshold
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.standardize = standardize
        self.copy = copy

    def fit(self, X: np.ndarray, y: None = None) -> GroupICA:
        """Fit on ``X`` of shape (n_tokens, n_neurons). Returns self."""
        given = X
        X = np.asarray(X, dtype=np.float32)
        n_tokens, n_neurons = X.shape
        k = self.n_components
        check_size(k, n_tokens, n_neurons)
        # may the fit overwrite X? its own conversion, or the caller's array with copy=False
        own = X.flags.writeable and (
            not self.copy or not isinstance(given, np.ndarray) or not np.may_share_memory(X, given)
        )
        if self.standardize:
            std = X.std(axis=0, dtype=np.float64)
            std[std == 0] = 1.0
            self.scale_ = std.astype(np.float32)
            if own:
                X /= self.scale_
            else:
                X, own = X / self.scale_, True
        pca = PCA(
            n_components=k,
            svd_solver="randomized",
            random_state=self.random_state,
            copy=not own,
        )
        reduced = pca.fit_transform(X)  # (tokens, k), centred inside
        self.mean_ = pca.mean_
        self.pca_components_ = pca.components_
        self.explained_variance_ratio_ = pca.explained_variance_ratio_
        return self._fit_maps(reduced, pca.components_)

    def _fit_maps(self, reduced: np.ndarray, components: np.ndarray) -> Self:
        """FastICA in the reduced space (``reduced``: tokens x k, ``components``: k x
        neurons): the maps, their z-scores and networks; a warning when it did not converge.
        The last step of ``fit``, whatever engine did the PCA."""
        maps, z, self.converged_, self.n_iter_ = ica_maps(
            reduced,
            components,
            max_iter=self.max_iter,
            tol=self.tol,
            random_state=self.random_state,
        )
        if not self.converged_:
            warnings.warn(
                f"FastICA did not converge in {self.max_iter} iterations; networks may be "
                "noisy (raise discover.max_iter)",
                ConvergenceWarning,
                stacklevel=3,  # the caller of fit
            )
        self.maps_ = maps.astype(np.float32)
        self.z_maps_ = z.astype(np.float32)
        self.networks_ = np.abs(self.z_maps_) >= self.threshold
        return self

    def neuron_scores(self) -> np.ndarray:
        """Network evidence per neuron: the largest ``|z|`` over all maps, shape (n_neurons,)."""
        return np.abs(self.z_maps_).max(axis=0)

    def union(self) -> np.ndarray:
        """Neurons in at least one network (the paper's "preserve all networks")."""
        return np.asarray(self.networks_.any(axis=0))

    def network_sizes(self) -> np.ndarray:
        """Units in each network, shape (n_components,)."""
        return np.asarray(self.networks_.sum(axis=1))


# fewer calibration tokens than this per ICA component gives noisy networks
MIN_TOKENS_PER_COMPONENT = 4


def ica_feasible(k: int, n_tokens: int, n_neurons: int) -> bool:
    """Whether a k-component group ICA of a tokens x neurons matrix is defined."""
    return k < n_tokens and k < n_neurons


def check_size(k: int, n_tokens: int, n_neurons: int) -> None:
    """Raise when ``k`` components cannot be fitted on ``n_tokens`` x ``n_neurons``; warn when
    there are too few tokens per component. Called from an estimator's ``fit`` (the warning
    points at fit's caller)."""
    if not ica_feasible(k, n_tokens, n_neurons):
        raise DiscoverError(
            f"group ICA with n_components={k} needs more than {k} tokens and neurons; "
            f"got {n_tokens} tokens x {n_neurons} neurons. Collect more text or lower "
            "discover.n_components."
        )
    if n_tokens < MIN_TOKENS_PER_COMPONENT * k:
        warnings.warn(
            f"only {n_tokens} tokens for {k} ICA components (fewer than "
            f"{MIN_TOKENS_PER_COMPONENT} per component): networks will be noisy; collect "
            "more text or lower discover.n_components",
            RuntimeWarning,
            stacklevel=3,
        )


def ica_maps(
    reduced: np.ndarray,
    components: np.ndarray,
    *,
    max_iter: int,
    tol: float,
    random_state: int | None,
) -> tuple[np.ndarray, np.ndarray, bool, int]:
    """FastICA on PCA-reduced data ``reduced`` (tokens, k) whose PCA ``components`` are
    (k, neurons): the mixing matrix projected back to neurons (float64 maps, (k, neurons)),
    the maps z-scored per row, both flipped to positive skew; whether FastICA converged and
    its iterations."""
    k = reduced.shape[1]
    ica = FastICA(
        n_components=k,
        whiten="unit-variance",
        max_iter=max_iter,
        tol=tol,
        random_state=random_state,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        ica.fit(reduced.astype(np.float64))
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    # reduced ~= S @ A.T  and  X - mean ~= reduced @ V  =>  X - mean ~= S @ (A.T @ V)
    maps = ica.mixing_.T @ components.astype(np.float64)
    z = _zscore_rows(maps)
    flip = np.where((z**3).mean(axis=1) < 0, -1.0, 1.0)[:, None]
    return maps * flip, z * flip, converged, int(ica.n_iter_)


def _zscore_rows(a: np.ndarray) -> np.ndarray:
    std = a.std(axis=1, keepdims=True)
    std[std == 0] = 1.0
    return (a - a.mean(axis=1, keepdims=True)) / std
