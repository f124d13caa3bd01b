"""Packing (``collect.packing``): short samples share rows of up to ``max_length`` tokens.

A packed row holds several samples one after the other, with no padding between them; its
position ids restart at 0 at every sample, and no attention mask is passed. transformers
(``masking_utils.find_packed_sequence_indices``, >= 5.0) reads such position ids as packed
sequences and builds the block-diagonal causal mask itself, for every layer type (sliding
windows are measured in positions, so they stay within their sample too), with sdpa and eager
attention; rotary and learned absolute positions (GPT-2) follow the same position ids. So every
token sees exactly what it sees alone: the tests compare packed and unpacked activations of
every supported family (max |difference| 1.0e-7 in float32 on the tiny models, from the
different shapes of the matrix products).

Rows are filled next-fit over the samples sorted longest first (the order the padded batches
take), so the samples come out of the packed rows in that same order: the activation matrix
and the store get the same rows in the same order, and nothing waits in memory for an earlier
sample. A row's unused tail holds copies of its first token with positions of their own: a
block of its own that no real token sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fbnprune.errors import FbnpruneError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

PACKED_FAMILIES = frozenset(
    {"llama", "mistral", "qwen2", "gemma3_text", "phi3", "gpt_neox", "gpt2"}
)
"""``model_type``s whose packed activations the tests compare with the unpacked ones."""
PACKED_ATTENTION = ("sdpa", "eager")
"""Attention implementations that honour the packed mask transformers builds (compared)."""


class PackingError(FbnpruneError, ValueError):
    """A model (or input) with which packing would not give the unpacked activations."""


@dataclass
class Batch:
    """One forward pass: the backbone's inputs and where each sample's real tokens lie.

    Attributes:
        inputs: ``input_ids`` (rows, width) with ``attention_mask`` (padded) or
            ``position_ids`` (packed), as the backbone takes them.
        spans: ``(sample, row, first column)`` of every sample in the batch, in order.
    """

    inputs: dict[str, torch.Tensor]
    spans: list[tuple[int, int, int]]


def length_order(lengths: list[int]) -> list[int]:
    """Sample indices, longest first, ties by index: the order of padded and packed batches."""
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Samples in rows of at most ``capacity`` tokens: next-fit over ``length_order``, so the
    rows, read one after the other, list the samples in that order."""
    rows: list[list[int]] = []
    used = capacity
    for i in length_order(lengths):
        if lengths[i] > capacity:
            raise PackingError(f"sample #{i} has {lengths[i]} tokens, rows hold {capacity}")
        if used + lengths[i] > capacity:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += lengths[i]
    return rows


def packed_batch(ids: list[list[int]], rows: list[list[int]]) -> Batch:
    """``input_ids`` and ``position_ids`` of packed ``rows`` (sample indices into ``ids``)."""
    width = max(sum(len(ids[i]) for i in row) for row in rows)
    input_ids = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    spans = []
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            end = start + len(ids[i])
            input_ids[r, start:end] = torch.tensor(ids[i])
            positions[r, start:end] = torch.arange(len(ids[i]))
            spans.append((i, r, start))
            start = end
        input_ids[r, start:] = input_ids[r, 0]
        positions[r, start:] = torch.arange(width - start)
    return Batch({"input_ids": input_ids, "position_ids": positions}, spans)


def packed_batches(ids: list[list[int]], batch_size: int, capacity: int) -> list[Batch]:
    """The samples ``ids`` packed in rows of up to ``capacity`` tokens, ``batch_size`` rows a
    forward pass; the spans, batch after batch, list the samples in ``length_order``."""
    rows = pack_rows([len(seq) for seq in ids], capacity)
    return [packed_batch(ids, rows[b : b + batch_size]) for b in range(0, len(rows), batch_size)]


def check_packable(model: PreTrainedModel) -> None:
    """Raise ``PackingError`` unless packing gives ``model`` its unpacked activations: a
    family and an attention implementation the tests compare, and a transformers that builds
    packed masks from position ids."""
    config = model.config
    family = getattr(config, "model_type", None)
    if family not in PACKED_FAMILIES:
        raise PackingError(
            f"collect.packing is not verified for model_type {family!r} (verified: "
            f"{', '.join(sorted(PACKED_FAMILIES))}); collect without packing"
        )
    attention = getattr(config, "_attn_implementation", None)
    if attention not in PACKED_ATTENTION:
        raise PackingError(
            f"collect.packing needs sdpa or eager attention (the model uses {attention!r}): "
            "only their packed masks are compared with unpacked activations; load the model "
            "with attn_implementation='sdpa' or collect without packing"
        )
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError as err:
        raise PackingError(
            "collect.packing needs a transformers that reads packed position ids "
            "(transformers.masking_utils.find_packed_sequence_indices)"
        ) from err
