"""Refit: least-squares reconstruction of the MLP output from the kept units (``fill:
reconstruct``).

Per layer, with ``H`` the calibration activations of the hidden units (tokens x units),
``W`` the down projection (d_model x units) and ``K`` the kept units, the refit solves the
ridge least-squares problem

    min_{V, c}  || [H_K, 1] [V, c]^T - H W^T ||^2  +  lam * ||V||^2

in float64 and replaces the kept columns of ``W`` by ``V`` (d_model x |K|) and adds ``c``
(d_model) to the down projection's bias. ``lam = ridge * mean(diag(H_K^T H_K))``, so the
``ridge`` setting does not depend on the activations' scale; the bias is not penalised.
With every unit kept and ``ridge = 0`` the solution is ``W`` itself and ``c = 0``. FLAP's
bias compensation (``fill: mean``) is the special case that keeps ``V = W_K``.

The normal equations need only ``H_K^T H`` (|K| x units) and column sums, accumulated in
float64 over row chunks of the (memory-mapped) matrix, so the cost is about
``tokens x units x |K|`` per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from fbnprune.models.onload import LayerwiseModel, down_projections
from fbnprune.plan import Refit, RefitError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

CHUNK_ROWS = 4096


def solve_layer(
    hidden: Sequence[np.ndarray], down: np.ndarray, kept: list[int], *, ridge: float
) -> tuple[np.ndarray, np.ndarray]:
    """The refit of one layer.

    Args:
        hidden: arrays of shape (n_tokens_i, n_units): the layer's calibration activations,
            one per task (may be memmap views); their tokens are pooled.
        down: float64 array of shape (d_model, n_units): the layer's down projection.
        kept: sorted kept unit indices.
        ridge: relative ridge term (see the module docstring).

    Returns:
        ``(V, c)``: float64 arrays of shapes (d_model, n_kept) and (d_model,).
    """
    n_units = down.shape[1]
    n_tokens = sum(h.shape[0] for h in hidden)
    keep = np.asarray(kept, dtype=np.int64)
    cross = np.zeros((len(keep), n_units))  # H_K^T H
    sums = np.zeros(n_units)  # 1^T H
    for part in hidden:
        for start in range(0, part.shape[0], CHUNK_ROWS):
            block = np.asarray(part[start : start + CHUNK_ROWS], dtype=np.float64)
            cross += block[:, keep].T @ block
            sums += block.sum(axis=0)
    k = len(keep)
    gram = np.empty((k + 1, k + 1))  # [H_K, 1]^T [H_K, 1]
    gram[:k, :k] = cross[:, keep]
    gram[:k, k] = gram[k, :k] = sums[keep]
    gram[k, k] = n_tokens
    rhs = np.empty((k + 1, down.shape[0]))  # [H_K, 1]^T H W^T
    rhs[:k] = cross @ down.T
    rhs[k] = sums @ down.T
    if k and ridge > 0:
        lam = ridge * float(np.mean(np.diag(gram)[:k]))
        gram[np.arange(k), np.arange(k)] += lam
    try:
        solution = np.linalg.solve(gram, rhs)
    except np.linalg.LinAlgError:  # singular (e.g. dead kept units with ridge 0)
        solution = np.linalg.lstsq(gram, rhs, rcond=None)[0]
    return solution[:k].T, solution[k]


def refit_plan(
    model: PreTrainedModel | LayerwiseModel,
    matrices: Sequence[np.ndarray],
    layer_widths: list[int],
    kept: list[list[int]],
    *,
    ridge: float,
    progress: bool = False,
) -> Refit:
    """Refit every layer of ``model`` on the calibration ``matrices`` (tokens x all units,
    one per task). One layer at a time: its down projection (read alone from the
    checkpoint of a ``LayerwiseModel``) and its columns of the matrices."""
    bounds = np.cumsum([0, *layer_widths])
    weights, biases = [], []
    downs = down_projections(model)
    bar = tqdm(downs, desc="refit", unit="layer", total=len(layer_widths), disable=not progress)
    for i, projection in enumerate(bar):
        down = projection.double().cpu().numpy()
        if i >= len(layer_widths) or down.shape[1] != layer_widths[i]:
            raise RefitError("the refit needs the hidden site (the down projection's inputs)")
        columns = [m[:, bounds[i] : bounds[i + 1]] for m in matrices]
        v, c = solve_layer(columns, down, kept[i], ridge=ridge)
        weights.append(torch.from_numpy(v.astype(np.float32)))
        biases.append(torch.from_numpy(c.astype(np.float32)))
    if len(weights) != len(layer_widths):
        raise RefitError(f"the model has {len(weights)} layers, the widths {len(layer_widths)}")
    return Refit(weights, biases, ridge)
