"""Overlap of neuron sets: IoU (the seed paper's eq. 12) and the counts built on it.

Networks are boolean rows over all neurons (layers concatenated). Everything here is pure
NumPy on boolean matrices, so it is easy to check against hand-computed cases.
"""

from __future__ import annotations

import numpy as np


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU ``|A and B| / |A or B|`` between every row of ``a`` and every row of ``b``.

    Args:
        a: bool array of shape (n, m): n neuron sets over m neurons.
        b: bool array of shape (p, m).

    Returns:
        float64 array of shape (n, p). Two empty sets have IoU 0 (nothing is shared).
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"iou_matrix needs 2-D arrays, got shapes {a.shape} and {b.shape}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"sets over different neurons: {a.shape[1]} vs {b.shape[1]}")
    inter = a.astype(np.float64) @ b.T.astype(np.float64)  # exact: counts < 2**53
    union = a.sum(axis=1)[:, None] + b.sum(axis=1)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def match_counts(
    templates: np.ndarray, networks: np.ndarray, owners: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """How often each template recurs among individual networks.

    Args:
        templates: bool (n_templates, m).
        networks: bool (n_networks, m): every individual network of every sample unit.
        owners: int (n_networks,): the sample unit each network came from.
        threshold: a network matches a template when their IoU is strictly above it.

    Returns:
        ``(networks_matched, units_matched)``, each int (n_templates,): the number of
        individual networks with IoU > threshold, and the number of sample units holding at
        least one such network.
    """
    if networks.shape[0] == 0:
        zeros = np.zeros(templates.shape[0], dtype=np.int64)
        return zeros, zeros.copy()
    hit = iou_matrix(templates, networks) > threshold
    units = np.array([np.unique(owners[row]).size for row in hit], dtype=np.int64)
    return hit.sum(axis=1).astype(np.int64), units


def chance_iou(size_a: float, size_b: float, n: int) -> float:
    """Expected IoU of two independent uniformly random sets of these sizes out of ``n``."""
    if n <= 0 or size_a + size_b == 0:
        return 0.0
    inter = size_a * size_b / n
    return float(inter / (size_a + size_b - inter))
