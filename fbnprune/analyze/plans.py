"""Plans over neuron sets, and scoring a model under one.

A lesion of a network is the plan that keeps every neuron but the network's; preserving
networks is the plan that keeps only their union. Both are ``PrunePlan`` objects applied
with ``masked``, so the analysis cuts exactly what the pipeline would.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from fbnprune.analyze.metric import Metric
from fbnprune.plan import PrunePlan
from fbnprune.pruning.mask import masked
from fbnprune.select.selection import top_indices

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def split_layers(values: np.ndarray, layer_widths: list[int]) -> list[np.ndarray]:
    """A per-neuron vector (layers concatenated) as one piece per layer."""
    bounds = np.cumsum([0, *layer_widths])
    if values.shape[0] != bounds[-1]:
        raise ValueError(f"{values.shape[0]} values for {bounds[-1]} neurons")
    return [values[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def keep_plan(
    keep: np.ndarray,
    layer_widths: list[int],
    *,
    model: str,
    model_type: str,
    site: str,
    fill_values: np.ndarray | None = None,
    provenance: dict[str, Any] | None = None,
) -> PrunePlan:
    """The plan that keeps the neurons where ``keep`` (bool, all layers) is True; dropped
    neurons read zero, or their ``fill_values`` (per neuron) when given."""
    keep = np.asarray(keep, dtype=bool)
    kept = [np.flatnonzero(k).tolist() for k in split_layers(keep, layer_widths)]
    fills = None
    if fill_values is not None:
        fills = [v.astype(float).tolist() for v in split_layers(fill_values, layer_widths)]
    return PrunePlan(
        model=model,
        model_type=model_type,
        site=site,
        fill="zero" if fills is None else "mean",
        layer_widths=list(layer_widths),
        kept=kept,
        fill_values=fills,
        provenance=provenance or {},
    )


def lesion_plan(network: np.ndarray, layer_widths: list[int], **kwargs: Any) -> PrunePlan:
    """The plan that zeroes the neurons of ``network`` (bool, all layers) and keeps the rest."""
    return keep_plan(~np.asarray(network, dtype=bool), layer_widths, **kwargs)


def random_set(n: int, size: int, seed: int) -> np.ndarray:
    """A uniformly random set of ``size`` of ``n`` neurons (bool), fixed by ``seed``."""
    chosen = np.zeros(n, dtype=bool)
    chosen[np.random.default_rng(seed).choice(n, size=size, replace=False)] = True
    return chosen


def top_set(values: np.ndarray, size: int) -> np.ndarray:
    """The ``size`` neurons with the largest ``values`` (bool; ties broken by index)."""
    chosen = np.zeros(values.shape[0], dtype=bool)
    chosen[top_indices(np.asarray(values), size)] = True
    return chosen


def score_under(
    model: PreTrainedModel, metric: Metric, plan: PrunePlan | None, *, progress: bool = False
) -> dict[str, float]:
    """The metric of ``model`` masked by ``plan`` (unmasked when None)."""
    if plan is None:
        return metric.score(model, progress=progress)
    with masked(model, plan):
        return metric.score(model, progress=progress)


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return {"mean": float(arr.mean()), "std": std}
