"""Collect: record MLP neuron values per real token into one tokens x neurons matrix.

Rows are the real (non-padding) tokens of every sample, in sample order; columns are the
neurons of all layers concatenated (layer 0's units first). The matrix is preallocated at
its exact size, in memory or as a memory-mapped ``.npy`` file, and filled batch by batch, so
memory never holds more than one batch of activations beyond the matrix itself.

The rows come from ``sample_rows`` (the whole model in memory, one forward pass per batch,
hooks on every layer) or, for a ``LayerwiseModel`` (``collect.onload: sequential``), from
``layer_rows``: the embeddings once, then one decoder block at a time over every batch,
holding only that block's weights and the batches' hidden states. Both run the same batches
through the same operations, so they record the same values, bit for bit. With ``pack_to``
(``collect.packing``) the batches are packed rows instead of padded ones
(``fbnprune.collect.packing``): the same rows of the matrix, in the same order.
"""

from __future__ import annotations

import logging
import mmap
import os
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from fbnprune.collect.packing import Batch, check_packable, length_order, packed_batches
from fbnprune.errors import FbnpruneError
from fbnprune.models.adapters import get_adapter
from fbnprune.models.hooks import SiteHooks, site_hook, site_widths
from fbnprune.models.layercalls import capture_layer_calls
from fbnprune.models.onload import LayerwiseModel
from fbnprune.rundir.layout import ACTIVATIONS_FILE, SAMPLE_INDEX_FILE

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


class CollectError(FbnpruneError, ValueError):
    """Input that cannot produce an activation matrix."""


@dataclass
class Activations:
    """A tokens x neurons activation matrix and its bookkeeping.

    Attributes:
        matrix: float32 array of shape (n_tokens, n_neurons) (may be a memmap).
        sample_index: int array of shape (n_tokens,): which sample each row came from.
        layer_widths: neurons per layer; columns are layers concatenated in order.
        site: ``hidden`` or ``output``.
        tokens_per_second: real tokens processed per second during collection.
    """

    matrix: np.ndarray
    sample_index: np.ndarray
    layer_widths: list[int]
    site: str
    tokens_per_second: float = float("nan")

    @property
    def n_tokens(self) -> int:
        return self.matrix.shape[0]

    def read_matrix(self) -> np.ndarray:
        """The matrix as a writable float32 array of its own. A memory-mapped ``.npy`` is
        read from its file, so its pages are not mapped beside the copy."""
        matrix = self.matrix
        name = matrix.filename if isinstance(matrix, np.memmap) else None
        if name is not None and str(name).endswith(".npy"):
            data = np.load(name)
            if data.shape == matrix.shape and data.dtype == np.float32:
                return data
        return np.array(matrix, dtype=np.float32)

    def release_pages(self) -> None:
        """Drop the resident pages of a memory-mapped matrix: the file is read again where a
        later stage touches it, and what a stage read stays out of the next ones' memory."""
        release_mapped_pages(self.matrix)

    def layer_slices(self) -> list[slice]:
        bounds = np.cumsum([0, *self.layer_widths])
        return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def split_by_layer(self, values: np.ndarray) -> list[np.ndarray]:
        """Split a per-neuron vector (n_neurons,) into per-layer pieces."""
        return [values[s] for s in self.layer_slices()]

    def save(self, directory: Path) -> None:
        """Write ``sample_index.npy`` and ``meta``; the matrix is saved by ``collect``."""
        np.save(directory / SAMPLE_INDEX_FILE, self.sample_index)

    @classmethod
    def load(cls, directory: Path, layer_widths: list[int], site: str) -> Activations:
        matrix = np.load(directory / ACTIVATIONS_FILE, mmap_mode="r")
        sample_index = np.load(directory / SAMPLE_INDEX_FILE)
        return cls(matrix, sample_index, layer_widths, site)


def release_mapped_pages(array: np.ndarray) -> None:
    """Unmap the resident pages of a memory-mapped (shared, file-backed) array; a no-op for
    other arrays. The page cache keeps their content, written pages included: the array
    reads the same, and its pages count in the process's memory again only when touched."""
    mapping, advice = getattr(array, "_mmap", None), getattr(mmap, "MADV_DONTNEED", None)
    if mapping is not None and advice is not None:
        mapping.madvise(advice)


# a collect's memory-mapped matrix gives back its written pages every this many bytes
RELEASE_EVERY = 256 * 2**20


def tokenize(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_length: int
) -> list[list[int]]:
    """Token ids of each prompt, truncated to ``max_length``."""
    if not prompts:
        raise CollectError("no samples to collect from")
    ids = tokenizer(prompts, truncation=True, max_length=max_length)["input_ids"]
    empty = [i for i, seq in enumerate(ids) if len(seq) == 0]
    if empty:
        raise CollectError(f"{len(empty)} sample(s) tokenize to nothing (e.g. #{empty[0]})")
    return ids


def iter_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Sample indices grouped in batches of similar length (less padding, same result)."""
    order = length_order(lengths)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def pad_batch(
    ids: list[list[int]], batch: list[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and attention mask for the given samples."""
    width = max(len(ids[i]) for i in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, i in enumerate(batch):
        input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
        attention[row, : len(ids[i])] = 1
    return input_ids, attention


def token_batches(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_length: int, batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(input_ids, attention_mask)`` batches of the prompts, right-padded, similar lengths
    together."""
    ids = tokenize(tokenizer, prompts, max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return [pad_batch(ids, b, pad_id) for b in iter_batches([len(s) for s in ids], batch_size)]


def model_batches(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    ids: list[list[int]],
    batch_size: int,
    pack_to: int | None,
) -> list[Batch]:
    """The forward passes of a collection: ``batch_size`` right-padded samples of similar
    length each, or (``pack_to``) ``batch_size`` packed rows of up to ``pack_to`` tokens
    (refused, ``PackingError``, for a model packing would not give the same values). Either
    way the spans list the samples in ``iter_batches``'s order."""
    if pack_to is not None:
        check_packable(model)
        return packed_batches(ids, batch_size, pack_to)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for batch in iter_batches([len(seq) for seq in ids], batch_size):
        input_ids, attention = pad_batch(ids, batch, pad_id)
        spans = [(i, row, 0) for row, i in enumerate(batch)]
        batches.append(Batch({"input_ids": input_ids, "attention_mask": attention}, spans))
    return batches


@torch.inference_mode()
def sample_rows(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    ids: list[list[int]],
    *,
    site: str,
    batch_size: int,
    pack_to: int | None = None,
) -> Generator[tuple[int, np.ndarray], None, None]:
    """Run ``model`` over the tokenized samples ``ids``, similar lengths batched together (or
    packed in rows of up to ``pack_to`` tokens), and yield each sample's index with its real
    tokens' neurons at ``site``: a float32 array (n_tokens of the sample, n_neurons), valid
    until the next item. The hooks are removed when the iteration ends or is abandoned."""
    adapter = get_adapter(model)
    widths = site_widths(model, adapter, site)
    col = np.concatenate([[0], np.cumsum(widths)])
    lengths = [len(seq) for seq in ids]
    # the hooks fill one (batch, seq, neurons) buffer; it is re-bound per batch shape and
    # read by ``record`` at call time
    buffer = np.empty((0, 0, int(col[-1])), dtype=np.float32)

    def record(layer: int, values: torch.Tensor) -> None:
        buffer[: values.shape[0], : values.shape[1], col[layer] : col[layer + 1]] = (
            values.detach().float().cpu().numpy()
        )

    batches = model_batches(model, tokenizer, ids, batch_size, pack_to)
    backbone = adapter.get_backbone(model)
    device = next(model.parameters()).device
    with SiteHooks(model, adapter, site, record):
        for batch in batches:
            shape = batch.inputs["input_ids"].shape
            if buffer.shape[:2] != shape:
                buffer = np.empty((*shape, int(col[-1])), dtype=np.float32)
            backbone(**{k: v.to(device) for k, v in batch.inputs.items()}, use_cache=False)
            for i, row, start in batch.spans:  # contiguous writes, real tokens only
                yield i, buffer[row, start : start + lengths[i]]


@torch.inference_mode()
def layer_rows(
    source: LayerwiseModel,
    tokenizer: PreTrainedTokenizerBase,
    ids: list[list[int]],
    *,
    site: str,
    batch_size: int,
    pack_to: int | None = None,
) -> Generator[tuple[int, int, np.ndarray], None, None]:
    """``sample_rows`` one decoder block at a time: yield ``(layer, sample, values)``, the
    sample's real tokens' neurons of that layer (float32, (n_tokens of the sample, width)),
    layer after layer, the samples of each layer in ``sample_rows``'s order. Memory holds
    one block's weights (``source.onload``) and the hidden states of every batch."""
    model, adapter = source.model, source.adapter
    lengths = [len(seq) for seq in ids]
    batches = model_batches(model, tokenizer, ids, batch_size, pack_to)
    calls = capture_layer_calls(model, [batch.inputs for batch in batches])
    hidden = calls.inputs
    seen: list[np.ndarray] = []

    def record(layer: int, values: torch.Tensor) -> None:
        seen.append(values.detach().float().cpu().numpy())

    for index in range(source.n_layers):
        with source.onload(index) as block:
            handle = site_hook(adapter, block, index, site, record)
            try:
                for b, batch in enumerate(batches):
                    hidden[b] = calls.replay(block, index, b, hidden[b])
                    values = seen.pop()
                    for i, row, start in batch.spans:
                        yield index, i, values[row, start : start + lengths[i]]
            finally:
                handle.remove()


def row_blocks(
    model: PreTrainedModel | LayerwiseModel,
    tokenizer: PreTrainedTokenizerBase,
    ids: list[list[int]],
    *,
    site: str,
    batch_size: int,
    pack_to: int | None = None,
) -> Generator[tuple[int | None, int, np.ndarray], None, None]:
    """``(layer, sample, values)`` blocks of the activation matrix: whole rows (``layer``
    None) from a model in memory (``sample_rows``), one layer's columns at a time from a
    ``LayerwiseModel`` (``layer_rows``); packed in rows of up to ``pack_to`` tokens if given."""
    if isinstance(model, LayerwiseModel):
        yield from layer_rows(
            model, tokenizer, ids, site=site, batch_size=batch_size, pack_to=pack_to
        )
    else:
        rows = sample_rows(model, tokenizer, ids, site=site, batch_size=batch_size, pack_to=pack_to)
        for i, values in rows:
            yield None, i, values


def model_of(model: PreTrainedModel | LayerwiseModel) -> PreTrainedModel:
    """The model (of a ``LayerwiseModel``: its model, blocks maybe on meta)."""
    return model.model if isinstance(model, LayerwiseModel) else model


@torch.inference_mode()
def collect_activations(
    model: PreTrainedModel | LayerwiseModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    site: str = "hidden",
    max_length: int = 128,
    batch_size: int = 8,
    out_file: Path | None = None,
    packing: bool = False,
    progress: bool = True,
) -> Activations:
    """Run ``model`` over ``prompts`` and record every real token's neurons at ``site``.

    Args:
        model: a causal LM with a supported architecture, in memory or a ``LayerwiseModel``
            (run one decoder block at a time).
        tokenizer: its tokenizer (needs a pad token or an EOS token).
        prompts: the texts, one sample each.
        site: ``hidden`` (MLP units) or ``output`` (MLP output channels).
        max_length: tokens kept per sample.
        batch_size: samples per forward pass (packed rows with ``packing``).
        out_file: if given, the matrix is a memory-mapped ``.npy`` there (written atomically);
            otherwise it lives in memory.
        packing: pack short samples into rows of up to ``max_length`` tokens, positions
            restarting at each sample (``fbnprune.collect.packing``); the same rows, in the
            same order.
        progress: show a progress bar.

    Returns:
        The filled ``Activations``.
    """
    module = model_of(model)
    if packing:
        check_packable(module)  # before the matrix is allocated
    widths = site_widths(module, get_adapter(module), site)
    cols = np.concatenate([[0], np.cumsum(widths)])
    ids = tokenize(tokenizer, prompts, max_length)
    lengths = [len(seq) for seq in ids]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    n_tokens, n_neurons = int(offsets[-1]), sum(widths)
    logger.info(
        "collect: %d samples, %d tokens x %d neurons (%.2f GiB float32)",
        len(prompts),
        n_tokens,
        n_neurons,
        n_tokens * n_neurons * 4 / 2**30,
    )

    tmp_file = None
    if out_file is None:
        matrix = np.empty((n_tokens, n_neurons), dtype=np.float32)
    else:
        tmp_file = out_file.with_name(f".{out_file.name}.tmp")
        matrix = np.lib.format.open_memmap(
            tmp_file, mode="w+", dtype=np.float32, shape=(n_tokens, n_neurons)
        )

    bar = collect_bar(model, n_tokens, site, progress)
    start = time.perf_counter()
    pack_to = max_length if packing else None
    rows = row_blocks(model, tokenizer, ids, site=site, batch_size=batch_size, pack_to=pack_to)
    written = 0
    try:
        for layer, i, values in rows:
            if layer is None:
                matrix[offsets[i] : offsets[i + 1]] = values
            else:
                matrix[offsets[i] : offsets[i + 1], cols[layer] : cols[layer + 1]] = values
            bar.update(len(values))
            written += values.nbytes
            if written >= RELEASE_EVERY:  # the matrix need not stay resident as it is written
                release_mapped_pages(matrix)
                written = 0
        elapsed = time.perf_counter() - start
    except BaseException:
        if tmp_file is not None:
            del matrix
            tmp_file.unlink(missing_ok=True)
        raise
    finally:
        rows.close()
        bar.close()

    if out_file is not None and tmp_file is not None:
        assert isinstance(matrix, np.memmap)
        matrix.flush()
        del matrix
        os.replace(tmp_file, out_file)
        matrix = np.load(out_file, mmap_mode="r")
    sample_index = np.repeat(np.arange(len(prompts), dtype=np.int32), lengths)
    tps = n_tokens / elapsed if elapsed > 0 else float("inf")
    logger.info("collect: %d tokens in %.1f s (%.0f tokens/s)", n_tokens, elapsed, tps)
    return Activations(matrix, sample_index, widths, site, tps)


def collect_bar(
    model: PreTrainedModel | LayerwiseModel, n_tokens: int, site: str, progress: bool
) -> tqdm:
    """The progress bar of a collection: tokens, times the layers when layer by layer."""
    if isinstance(model, LayerwiseModel):
        return tqdm(
            total=n_tokens * model.n_layers,
            unit="tok",
            disable=not progress,
            desc=f"collect ({site}, layer by layer)",
        )
    return tqdm(total=n_tokens, unit="tok", desc=f"collect ({site})", disable=not progress)
