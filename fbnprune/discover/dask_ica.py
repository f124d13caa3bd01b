"""Group ICA out of core: ``discover.engine: dask``.

The same decomposition as ``fbnprune.discover.group_ica.GroupICA`` with its PCA step on
``dask.array``:

1. one pass over the matrix for every neuron's mean (and standard deviation, with
   ``standardize``), in float64;
2. a randomized SVD of the centred (scaled) matrix, ``dask.array.linalg.svd_compressed``:
   a Gaussian sketch of k + 10 columns, ``power_iter`` subspace iterations re-orthonormalised
   by a tall-skinny QR each time (``iterator="QR"``, numerically stable in float32), 2 passes
   over the data per iteration, and intermediate sketches persisted so the matrix is re-read
   rather than held (``compute=True``);
3. FastICA on the reduced data U * S (tokens x k, in memory) by
   ``fbnprune.discover.group_ica.ica_maps``, exactly as ``GroupICA`` does.

Why ``svd_compressed`` and not ``da.linalg.svd``: the latter is a tall-and-skinny QR that
needs every column in one chunk and computes the full SVD, while calibration matrices are
as often short and wide (8,192 tokens x 458,752 units for Llama-3-8B) as tall; the
randomized sketch needs only k + 10 columns in memory and any chunking.

The matrix is read in blocks of rows x one layer from an ``ActivationStore`` (or a numpy
array / memmap, or any ``dask.array``), every pass again, unless it fits in ``CACHE_SHARE``
of the budget as float32: then it is read once and held. By default the local threaded
scheduler runs it, with row blocks sized so that the threads' working set stays within
``memory``; when a ``dask.distributed`` client is active (``fbnprune run
--scheduler ADDRESS``, ``use_scheduler``), the same graph runs on its cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any, Unpack

import numpy as np

from fbnprune.collect.store import ActivationStore
from fbnprune.discover.group_ica import DiscoverError, GroupICA, ICAParams, check_size

logger = logging.getLogger(__name__)

DEFAULT_MEMORY = "4GiB"
# float32 copies of one block alive per thread at once (read, decoded, centred, product)
BLOCK_COPIES = 4
# share of the budget given to blocks in flight; the rest holds the sketches, the reduced data
# and FastICA
BLOCK_SHARE = 0.5
CONNECT_TIMEOUT = "20s"
# the matrix (float32) is held in memory when it takes at most this share of the budget
CACHE_SHARE = 0.4


def parse_memory(memory: str | int) -> int:
    """Bytes of a budget such as ``"4GiB"``, ``"512MB"`` or a number of bytes."""
    from dask.utils import parse_bytes

    try:
        value = parse_bytes(memory)
    except (ValueError, TypeError) as exc:
        raise DiscoverError(f"discover.memory {memory!r} is not a size such as '4GiB'") from exc
    if value <= 0:
        raise DiscoverError(f"discover.memory must be positive, got {memory!r}")
    return int(value)


def active_client() -> Any | None:
    """The ``dask.distributed`` client computations go to now, if any."""
    try:
        from distributed import default_client
    except ImportError:  # pragma: no cover - distributed is a dependency
        return None
    try:
        return default_client()
    except ValueError:
        return None


@contextlib.contextmanager
def use_scheduler(address: str | None) -> Iterator[Any | None]:
    """Within the block, dask computations run on the ``dask.distributed`` cluster at
    ``address`` (``tcp://host:8786``, or a ``LocalCluster``'s address); ``None`` changes
    nothing. The cluster's workers must be able to read the run directory."""
    if address is None:
        yield None
        return
    from distributed import Client

    try:
        client = Client(address, set_as_default=True, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        raise DiscoverError(f"cannot reach a dask scheduler at {address!r}: {exc}") from None
    with client:
        logger.info(
            "dask: using the cluster at %s (%d workers)",
            address,
            len(client.scheduler_info().get("workers", {})),
        )
        yield client


def row_block(memory: int, widest: int, threads: int, store_rows: int | None = None) -> int:
    """Rows per block such that ``threads`` blocks of ``widest`` columns, ``BLOCK_COPIES``
    float32 copies each, fit in ``BLOCK_SHARE`` of ``memory``; a multiple of the stored
    chunk ``store_rows`` when given (so no chunk is read twice)."""
    rows = int(memory * BLOCK_SHARE) // (threads * BLOCK_COPIES * 4 * widest)
    if store_rows:
        rows = max(store_rows, rows // store_rows * store_rows)
    return max(16, rows)


class DaskGroupICA(GroupICA):
    """``GroupICA`` whose centring and PCA run on ``dask.array``, out of core.

    Args:
        n_components, threshold, max_iter, tol, random_state, standardize: as ``GroupICA``.
        memory: budget of the local run (``"4GiB"``): sets the row blocks read at once.
        power_iter: subspace iterations of the randomized SVD (sklearn's randomized PCA runs
            4 to 7); each costs two passes over the matrix.
        oversamples: extra sketch columns.
        threads: threads of the local scheduler (default: the CPUs).

    Attributes: as ``GroupICA``; also ``scale_`` (with ``standardize``), ``block_rows_``
    (rows per block read), ``cached_`` (whether the matrix was small enough for the budget to
    be read once and held in memory rather than re-read by every pass) and ``scheduler_``
    (``threads`` or the cluster's address).
    """

    def __init__(
        self,
        *,
        memory: str | int = DEFAULT_MEMORY,
        power_iter: int = 4,
        oversamples: int = 10,
        threads: int | None = None,
        **ica: Unpack[ICAParams],
    ) -> None:
        super().__init__(**ica)
        self.memory = memory
        self.power_iter = power_iter
        self.oversamples = oversamples
        self.threads = threads

    def fit(self, X: Any, y: None = None) -> DaskGroupICA:
        """Fit on ``X`` (n_tokens, n_neurons): an ``ActivationStore``, a ``dask.array``, or a
        numpy array / memmap. Returns self."""
        import dask
        import dask.array as da

        budget = parse_memory(self.memory)
        client = active_client()
        threads = self.threads or (os.cpu_count() or 1)
        source = _Source(X)
        n_tokens, n_neurons = source.shape
        k = self.n_components
        check_size(k, n_tokens, n_neurons)
        self.block_rows_ = min(
            n_tokens, row_block(budget, source.widest, threads, source.store_rows)
        )
        X = source.dask(self.block_rows_)
        self.scheduler_ = "threads" if client is None else client.scheduler.address
        if client is not None and isinstance(source.X, np.ndarray):
            logger.warning(
                "discover (dask): the matrix is in this process and is sent to the "
                "cluster's workers; with collect.storage: zarr they read the store "
                "themselves"
            )
        config = {} if client is not None else {"scheduler": "threads", "num_workers": threads}
        logger.info(
            "discover (dask): %d x %d, row blocks of %d, %s, budget %s",
            n_tokens,
            n_neurons,
            self.block_rows_,
            self.scheduler_,
            self.memory,
        )
        # the passes re-read the matrix; when it fits in CACHE_SHARE of the budget (float32)
        # it is read once and held, so the passes cost only the products
        self.cached_ = n_tokens * n_neurons * 4 <= budget * CACHE_SHARE
        with dask.config.set(config):
            if self.cached_:
                X = X.persist()
            total = X.sum(axis=0, dtype=np.float64)
            squares = (X * X).sum(axis=0, dtype=np.float64)
            total, squares = dask.compute(total, squares)
            mean = total / n_tokens
            var = np.maximum(squares / n_tokens - mean**2, 0.0)  # population, as numpy's std
            if self.standardize:
                std = np.sqrt(var)
                std[std == 0] = 1.0
                self.scale_ = std.astype(np.float32)
                mean, var = mean / std, var / std**2
            self.mean_ = mean.astype(np.float32)
            centred = X - self.mean_
            if self.standardize:
                centred = centred / self.scale_
            u, s, v = da.linalg.svd_compressed(
                centred,
                k,
                iterator="QR",
                n_power_iter=self.power_iter,
                n_oversamples=self.oversamples,
                seed=self.random_state,
                compute=True,
            )
            u, s, v = dask.compute(u, s, v)
        reduced = u * s  # (tokens, k), as PCA.fit_transform
        components = v.astype(np.float32)  # (k, neurons)
        total_var = var.sum() * n_tokens / max(n_tokens - 1, 1)  # ddof=1, as PCA
        explained = s.astype(np.float64) ** 2 / max(n_tokens - 1, 1)
        self.pca_components_ = components
        self.explained_variance_ratio_ = (explained / total_var).astype(np.float32)
        return self._fit_maps(reduced, components)


class StoreLayer:
    """One layer's chunk column of an ``ActivationStore``, read as ``DaskGroupICA`` reads a
    store (``discover.scope: layer``, ``fbnprune.discover.layer_ica``)."""

    def __init__(self, store: ActivationStore, layer: int) -> None:
        self.store, self.layer = store, layer
        self.layer_widths = [store.layer_widths[layer]]
        self.chunk_tokens = store.chunk_tokens
        self.shape = (store.shape[0], self.layer_widths[0])

    def dask(self, chunk_tokens: int | None = None) -> Any:
        return self.store.layer_dask(self.layer, chunk_tokens)


class _Source:
    """The matrix to decompose, read lazily as float32 blocks of rows x (a layer | all)."""

    def __init__(self, X: Any) -> None:
        import dask.array as da

        self.X, self.store_rows = X, None
        if isinstance(X, ActivationStore | StoreLayer):
            self.widest, self.store_rows = max(X.layer_widths), X.chunk_tokens
        elif isinstance(X, da.Array):
            self.widest = max(X.chunks[1])
        else:
            if not hasattr(X, "shape") or len(X.shape) != 2:
                raise DiscoverError(
                    "expected a tokens x neurons matrix, got "
                    f"{type(X).__name__} of shape {getattr(X, 'shape', None)}"
                )
            self.widest = X.shape[1]
        self.shape = tuple(int(n) for n in X.shape)

    def dask(self, rows: int) -> Any:
        import dask.array as da

        if isinstance(self.X, ActivationStore | StoreLayer):
            return self.X.dask(rows)
        if isinstance(self.X, da.Array):
            return self.X.astype(np.float32).rechunk({0: rows})
        return da.from_array(self.X, chunks=(rows, self.shape[1])).astype(np.float32)


def discover_input(acts: Any) -> Any:
    """What ``DaskGroupICA.fit`` reads from an ``Activations``: its store when it has one
    (never the matrix in memory), else its matrix (a memmap is read block by block)."""
    return getattr(acts, "store", None) or acts.matrix
