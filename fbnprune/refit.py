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

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from fbnprune.errors import FbnpruneError
from fbnprune.models.adapters import MLPAdapter
from fbnprune.models.onload import LayerwiseModel, down_projections

if TYPE_CHECKING:
    from transformers import PreTrainedModel

CHUNK_ROWS = 4096


class RefitError(FbnpruneError, ValueError):
    """A refit that cannot be computed or does not fit its plan."""


@dataclass
class Refit:
    """New down-projection columns for the kept units, and a bias shift, per layer.

    Attributes:
        weights: per layer, float32 tensor of shape (d_model, n_kept): the kept columns.
        biases: per layer, float32 tensor of shape (d_model,): added to the down bias.
        ridge: the relative ridge term the refit was solved with.
    """

    weights: list[torch.Tensor]
    biases: list[torch.Tensor]
    ridge: float

    def save(self, file: Path) -> str:
        """Write a safetensors file (atomically); return its sha256."""
        tensors = {}
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            tensors[f"layer{i}.weight"] = w.contiguous()
            tensors[f"layer{i}.bias"] = b.contiguous()
        tmp = file.with_name(f".{file.name}.tmp")
        save_file(tensors, str(tmp), metadata={"ridge": repr(self.ridge)})
        tmp.replace(file)
        return file_digest(file)

    @classmethod
    def load(cls, file: Path, n_layers: int, ridge: float) -> Refit:
        tensors = load_file(str(file))
        weights = [tensors[f"layer{i}.weight"] for i in range(n_layers)]
        biases = [tensors[f"layer{i}.bias"] for i in range(n_layers)]
        return cls(weights, biases, ridge)

    def check_fits(self, kept_per_layer: list[int], d_model: int | None = None) -> None:
        shapes = [tuple(w.shape) for w in self.weights]
        counts = [s[1] for s in shapes]
        if counts != list(kept_per_layer):
            raise RefitError(f"refit has {counts} columns per layer, plan keeps {kept_per_layer}")
        if d_model is not None and any(s[0] != d_model for s in shapes):
            raise RefitError(f"refit rows {sorted({s[0] for s in shapes})} != d_model {d_model}")


def file_digest(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def down_weights(model: PreTrainedModel) -> list[np.ndarray]:
    """Every layer's down projection as a float64 (d_model, units) array."""
    return [w.double().cpu().numpy() for w in down_projections(model)]


def down_weight(adapter: MLPAdapter, layer: nn.Module) -> np.ndarray:
    """One decoder block's down projection as a float64 (d_model, units) array."""
    weight = adapter.get_down(layer).weight.detach().double().cpu()
    return (weight.T if adapter.conv1d else weight).numpy()


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
