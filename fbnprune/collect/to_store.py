"""Collect into the activation store: ``collect.storage: zarr``.

The same batches, hooks and real-token rows as ``fbnprune.collect.activations.collect_activations``
(``collect.row_blocks``); the rows go to a ``StoreWriter`` in collection order (samples of
similar length together, each sample's tokens contiguous), so memory holds one batch of
activations and one chunk of rows, never the matrix. From a ``LayerwiseModel`` the rows come
layer by layer and are appended to each layer's array in the same order (the same store).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from fbnprune.collect.activations import Activations, collect_bar, model_of, row_blocks, tokenize
from fbnprune.collect.packing import check_packable
from fbnprune.collect.store import ActivationStore, StoreDtype, StoreWriter
from fbnprune.models.adapters import get_adapter
from fbnprune.models.hooks import site_widths
from fbnprune.models.onload import LayerwiseModel

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


class StoredActivations(Activations):
    """``Activations`` backed by a store: ``matrix`` is read into memory (float32) only when a
    stage asks for it; out-of-core stages use ``store`` instead."""

    def __init__(self, store: ActivationStore) -> None:  # no dataclass init: matrix is lazy
        self.store = store
        self.sample_index = store.sample_index
        self.layer_widths = store.layer_widths
        self.site = store.site
        self.tokens_per_second = store.tokens_per_second

    @functools.cached_property
    def matrix(self) -> np.ndarray:  # type: ignore[override]
        return self.store.numpy()

    def read_matrix(self) -> np.ndarray:
        """The matrix as an array of its own: read from the store, unless already read."""
        cached = self.__dict__.get("matrix")
        if cached is not None:
            return np.array(cached, dtype=np.float32)
        return np.require(self.store.numpy(), np.float32, ["C", "W"])

    @property
    def n_tokens(self) -> int:
        return self.store.shape[0]

    def save(self, directory: Path) -> None:
        """Nothing to do: the store holds the sample index."""

    def __repr__(self) -> str:
        return f"StoredActivations({self.store!r})"


@torch.inference_mode()
def collect_to_store(
    model: PreTrainedModel | LayerwiseModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    path: Path,
    *,
    site: str = "hidden",
    max_length: int = 128,
    batch_size: int = 8,
    dtype: StoreDtype = "float16",
    chunk_tokens: int | None = None,
    packing: bool = False,
    progress: bool = True,
) -> StoredActivations:
    """Run ``model`` over ``prompts`` and store every real token's neurons at ``site`` in an
    activation store at ``path`` (written atomically). Arguments as ``collect_activations``;
    ``dtype`` and ``chunk_tokens`` as ``StoreWriter``. Packed rows give the samples in the
    padded batches' order, so the store's rows are the same either way."""
    module = model_of(model)
    if packing:
        check_packable(module)  # before the store is created
    widths = site_widths(module, get_adapter(module), site)
    ids = tokenize(tokenizer, prompts, max_length)
    lengths = [len(seq) for seq in ids]
    n_tokens, n_neurons = sum(lengths), sum(widths)
    logger.info(
        "collect: %d samples, %d tokens x %d neurons into %s (%.2f GiB %s)",
        len(prompts),
        n_tokens,
        n_neurons,
        path,
        n_tokens * n_neurons * (4 if dtype == "float32" else 2) / 2**30,
        dtype,
    )
    bar = collect_bar(model, n_tokens, site, progress)
    with StoreWriter(
        path,
        n_tokens=n_tokens,
        layer_widths=widths,
        site=site,
        dtype=dtype,
        chunk_tokens=chunk_tokens,
    ) as writer:
        start = time.perf_counter()
        rows = row_blocks(
            model,
            tokenizer,
            ids,
            site=site,
            batch_size=batch_size,
            pack_to=max_length if packing else None,
        )
        try:
            for layer, i, values in rows:
                if layer is None:
                    writer.append(values, i)
                else:
                    writer.append_layer(layer, values, i)
                bar.update(len(values))
        finally:
            rows.close()
            bar.close()
        elapsed = time.perf_counter() - start
        tps = n_tokens / elapsed if elapsed > 0 else float("inf")
        store = writer.commit(tokens_per_second=tps)
    logger.info("collect: %d tokens in %.1f s (%.0f tokens/s)", n_tokens, elapsed, tps)
    return StoredActivations(store)


def store_collector(path: Path, dtype: StoreDtype = "float16") -> Callable[..., StoredActivations]:
    """``collect_activations``'s signature, collecting into the store at ``path`` (its
    ``out_file`` must be None: the store is the output)."""

    def collect(
        model: PreTrainedModel | LayerwiseModel,
        tokenizer: PreTrainedTokenizerBase,
        prompts: list[str],
        *,
        out_file: Path | None = None,
        **kwargs: Any,
    ) -> StoredActivations:
        if out_file is not None:
            raise ValueError("a store collector writes to its store, not to out_file")
        return collect_to_store(model, tokenizer, prompts, path, dtype=dtype, **kwargs)

    return collect
