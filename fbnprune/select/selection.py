"""Select: score neurons, then keep an exact budget of them under an allocation policy.

Scorers turn evidence into one score per neuron (higher = keep first):

- ``ica``: the largest ``|z|`` of the neuron over all group-ICA maps; the neurons whose score
  reaches the threshold are exactly the union of the functional networks.
- ``magnitude``: mean ``|activation|`` over calibration tokens.
- ``wanda``: Wanda-style weight x activation: ``||W_down[:, j]||_2 * rms(activation_j)``
  (hidden site only).
- ``random``: a seeded random permutation (the control).

Ranking by score makes any budget reachable, whether or not it matches the networks' union.
Allocation policies: ``global`` (one ranking over all layers), ``uniform`` (the same
fraction in every layer) and ``sensitivity`` (more units for the layers whose cut moves the
model's output most, measured by ``fbnprune.select.sensitivity``); all honour a per-layer floor so
no layer is emptied by accident.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from fbnprune.errors import FbnpruneError
from fbnprune.models.onload import LayerwiseModel, down_projections

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class SelectError(FbnpruneError, ValueError):
    """A selection that cannot be made as asked."""


def magnitude_scores(matrix: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Mean absolute activation per neuron, computed in row chunks (memmap friendly)."""
    total = np.zeros(matrix.shape[1], dtype=np.float64)
    for start in range(0, matrix.shape[0], chunk):
        total += np.abs(matrix[start : start + chunk]).sum(axis=0, dtype=np.float64)
    return (total / matrix.shape[0]).astype(np.float32)


def column_means(matrix: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Mean activation per neuron (the ``fill: mean`` value), in float64 then float32."""
    total = np.zeros(matrix.shape[1], dtype=np.float64)
    for start in range(0, matrix.shape[0], chunk):
        total += matrix[start : start + chunk].sum(axis=0, dtype=np.float64)
    return (total / matrix.shape[0]).astype(np.float32)


def rms_scores(matrix: np.ndarray, chunk: int = 4096) -> np.ndarray:
    total = np.zeros(matrix.shape[1], dtype=np.float64)
    for start in range(0, matrix.shape[0], chunk):
        block = matrix[start : start + chunk].astype(np.float64)
        total += (block * block).sum(axis=0)
    return np.sqrt(total / matrix.shape[0]).astype(np.float32)


def wanda_scores(model: PreTrainedModel | LayerwiseModel, matrix: np.ndarray) -> np.ndarray:
    """``||W_down[:, j]||_2 * rms(x_j)`` per hidden unit, layers concatenated (the down
    projections read one layer at a time)."""
    norms = [
        torch.linalg.vector_norm(weight.float(), dim=0).cpu().numpy()  # over d_model
        for weight in down_projections(model)
    ]
    column_norms = np.concatenate(norms)
    if column_norms.shape[0] != matrix.shape[1]:
        raise SelectError("wanda scores need the hidden site (MLP units)")
    return column_norms * rms_scores(matrix)


def random_scores(n_neurons: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n_neurons).astype(np.float32)


# the model a scorer may ask for: loaded (or onloaded layer by layer) only when asked
ModelSource = Callable[[], "PreTrainedModel | LayerwiseModel"]

# selectors that score units from activations alone (``ica`` needs the discover stage)
ACTIVATION_SCORERS: dict[str, Callable[[ModelSource, np.ndarray, int], np.ndarray]] = {
    "magnitude": lambda model, matrix, seed: magnitude_scores(matrix),
    "wanda": lambda model, matrix, seed: wanda_scores(model(), matrix),
    "random": lambda model, matrix, seed: random_scores(matrix.shape[1], seed),
}


def unit_scores(selector: str, model: ModelSource, matrix: np.ndarray, *, seed: int) -> np.ndarray:
    """One score per unit (higher: keep first) by an activation selector of the registry;
    ``model`` is called only by the selectors that read weights (wanda)."""
    if selector not in ACTIVATION_SCORERS:
        raise ValueError(f"unknown selector {selector!r}")
    return ACTIVATION_SCORERS[selector](model, matrix, seed)


def layer_bounds(widths: list[int]) -> list[tuple[int, int]]:
    """(start, stop) of every layer's columns in the concatenated unit axis."""
    bounds = np.cumsum([0, *widths]).tolist()
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def allocate(
    layer_scores: list[np.ndarray],
    budget: float,
    *,
    policy: str = "global",
    min_per_layer: float = 0.0,
    max_per_layer: float = 1.0,
    sensitivity: list[float] | None = None,
    power: float = 0.5,
) -> list[list[int]]:
    """Kept indices per layer: exactly ``round(budget * n_neurons)`` in total.

    Args:
        layer_scores: one score array per layer (higher = keep first).
        budget: fraction of all neurons to keep, in (0, 1].
        policy: ``global``, ``uniform`` or ``sensitivity``.
        min_per_layer: floor on each layer's kept fraction (at least one unit when > 0).
        max_per_layer: cap on each layer's kept fraction (``sensitivity`` only).
        sensitivity: per layer, how much cutting that layer alone moves the output
            (``sensitivity`` only).
        power: a layer's share grows as ``sensitivity ** power`` (``sensitivity`` only).

    Returns:
        Sorted kept indices for every layer.
    """
    if not 0 < budget <= 1:
        raise SelectError(f"budget must be in (0, 1], got {budget}")
    widths = [len(s) for s in layer_scores]
    total = max(1, round(budget * sum(widths)))
    floors = [min(w, math.ceil(min_per_layer * w)) for w in widths]
    if sum(floors) > total:
        raise SelectError(
            f"the per-layer floor ({min_per_layer:.1%} of each layer = {sum(floors)} units) "
            f"exceeds the budget ({total} units); lower select.min_per_layer"
        )
    if policy in ("uniform", "sensitivity"):
        if policy == "uniform":
            counts = _proportional_counts(widths, total)
            counts = [max(c, f) for c, f in zip(counts, floors, strict=True)]
            _trim_to_total(counts, floors, total)
        else:
            counts = _sensitivity_counts(widths, total, floors, sensitivity, max_per_layer, power)
        pairs = zip(layer_scores, counts, strict=True)
        return [sorted(top_indices(s, c).tolist()) for s, c in pairs]
    if policy != "global":
        raise SelectError(f"unknown allocation policy {policy!r} (global, uniform, sensitivity)")

    chosen = [set(top_indices(s, f).tolist()) for s, f in zip(layer_scores, floors, strict=True)]
    remaining = total - sum(floors)
    flat_scores = np.concatenate(layer_scores)
    layer_of = np.repeat(np.arange(len(widths)), widths)
    offsets = np.concatenate([[0], np.cumsum(widths)])
    for flat in _rank(flat_scores):
        if remaining == 0:
            break
        layer = int(layer_of[flat])
        unit = int(flat - offsets[layer])
        if unit not in chosen[layer]:
            chosen[layer].add(unit)
            remaining -= 1
    return [sorted(c) for c in chosen]


def _rank(scores: np.ndarray) -> np.ndarray:
    """Indices by descending score, ties broken by index (deterministic)."""
    return np.lexsort((np.arange(len(scores)), -scores.astype(np.float64)))


def top_indices(scores: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` highest-scoring indices, ties broken by index."""
    return _rank(scores)[:count]


def _proportional_counts(widths: list[int], total: int) -> list[int]:
    """Split ``total`` across layers proportionally to width (largest remainder)."""
    exact = [total * w / sum(widths) for w in widths]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(widths)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _sensitivity_counts(
    widths: list[int],
    total: int,
    floors: list[int],
    sensitivity: list[float] | None,
    max_per_layer: float,
    power: float,
) -> list[int]:
    """Units per layer proportional to ``width * sensitivity ** power`` within the bounds."""
    if sensitivity is None or len(sensitivity) != len(widths):
        raise SelectError("allocation 'sensitivity' needs one sensitivity per layer")
    caps = [max(f, math.floor(max_per_layer * w)) for f, w in zip(floors, widths, strict=True)]
    if sum(caps) < total:
        raise SelectError(
            f"the per-layer cap ({max_per_layer:.1%} of each layer = {sum(caps)} units) "
            f"is below the budget ({total} units); raise select.max_per_layer"
        )
    pairs = zip(widths, sensitivity, strict=True)
    weights = [w * max(float(s), 0.0) ** power for w, s in pairs]
    return bounded_counts(weights, total, floors, caps)


def bounded_counts(
    weights: list[float], total: int, floors: list[int], caps: list[int]
) -> list[int]:
    """Integer counts summing to ``total``: ``clip(t * weight, floor, cap)`` per layer, with
    the one scale ``t`` that makes them sum to ``total`` (found by bisection; the sum grows
    with ``t``), then rounded by largest remainder within the caps."""
    if not sum(floors) <= total <= sum(caps):
        raise SelectError(f"no counts within the floors and caps sum to {total}")
    w = np.asarray(weights, dtype=np.float64)
    if not (w > 0).any():
        w = np.ones_like(w)
    lo, hi = np.asarray(floors, dtype=np.float64), np.asarray(caps, dtype=np.float64)
    low, high = 0.0, 1.0
    while np.clip(high * w, lo, hi).sum() < total:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if np.clip(mid * w, lo, hi).sum() < total else (low, mid)
    exact = np.clip(high * w, lo, hi)
    counts = [int(math.floor(x)) for x in exact]
    order = sorted(range(len(counts)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order * 2:  # largest remainders first, within the caps
        if sum(counts) >= total:
            break
        if counts[i] < caps[i]:
            counts[i] += 1
    _trim_to_total(counts, floors, total)
    return counts


def _trim_to_total(counts: list[int], floors: list[int], total: int) -> None:
    """Remove units from the largest layers (above their floors) until the sum is ``total``."""
    while sum(counts) > total:
        i = max(range(len(counts)), key=lambda j: (counts[j] - floors[j], -j))
        counts[i] -= 1
