"""Templates and recurrence (the seed paper's Table 1) and the cross-task view.

For every template network (group ICA over one task's template samples) and every task's
individual networks (ICA on single samples), count the individual networks whose IoU with
the template is above the threshold (0.2 in the paper), and the sample units that hold at
least one. Templates of one task against individuals of another give the cross-task
recurrence; templates against templates (the IoU matrix) say whether tasks share networks.

A task's templates can share a *core*: neurons in at least half of them (typically
high-variance outlier units that exceed the z threshold in most maps). A core inflates every
IoU, so the counts are also given with the template task's core removed from both sides.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fbnprune.analyze.networks import IndividualNetworks, NetworkSet
from fbnprune.analyze.overlap import chance_iou, iou_matrix, match_counts


def core(members: np.ndarray) -> np.ndarray:
    """Neurons in at least half of the networks (bool over neurons)."""
    return members.sum(axis=0) >= max(1, len(members)) / 2


def mean_pairwise_iou(members: np.ndarray) -> float:
    """Mean IoU over distinct pairs of networks (0 for fewer than two)."""
    if len(members) < 2:
        return 0.0
    iou = iou_matrix(members, members)
    return float(iou[np.triu_indices(len(members), k=1)].mean())


def _median_size(members: np.ndarray) -> float:
    return float(np.median(members.sum(axis=1))) if len(members) else 0.0


def recurrence(
    templates: dict[str, NetworkSet],
    individuals: dict[str, IndividualNetworks],
    threshold: float,
) -> dict[str, Any]:
    """Counts per template (rows: template task) and individual task (columns)."""
    n = next(iter(templates.values())).members.shape[1]
    counts: dict[str, dict[str, Any]] = {}
    chance: dict[str, dict[str, list[float]]] = {}
    for t, tmpl in templates.items():
        counts[t], chance[t] = {}, {}
        keep = ~core(tmpl.members)
        for u, ind in individuals.items():
            nets, units = match_counts(tmpl.members, ind.members, ind.owners, threshold)
            bare, _ = match_counts(tmpl.members & keep, ind.members & keep, ind.owners, threshold)
            counts[t][u] = {
                "networks": nets.tolist(),
                "units": units.tolist(),
                "networks_without_core": bare.tolist(),
                "n_units": ind.n_units,
                "n_networks": len(ind.members),
            }
            median = _median_size(ind.members)
            chance[t][u] = [chance_iou(s, median, n) for s in tmpl.sizes]
    return {
        "threshold": threshold,
        "templates": {
            t: {
                "sizes": s.sizes,
                "converged": s.converged,
                "union": int(s.union().sum()),
                "core": int(core(s.members).sum()),
                "mean_pairwise_iou": mean_pairwise_iou(s.members),
            }
            for t, s in templates.items()
        },
        "individual": {
            u: {
                "units": ind.n_units,
                "networks": len(ind.members),
                "median_size": _median_size(ind.members),
                "not_converged": ind.not_converged,
            }
            for u, ind in individuals.items()
        },
        "counts": counts,
        "chance_iou": chance,
    }


def cross_task(templates: dict[str, NetworkSet], threshold: float) -> dict[str, Any]:
    """Template-vs-template IoU over all tasks, and per task pair how many of one task's
    templates have a match (IoU above the threshold) among the other's."""
    order = [(t, j) for t, s in templates.items() for j in range(len(s.members))]
    stacked = np.concatenate([s.members for s in templates.values()])
    full = iou_matrix(stacked, stacked)
    bounds = np.cumsum([0, *(len(s.members) for s in templates.values())])
    span = {
        t: slice(int(a), int(b)) for t, a, b in zip(templates, bounds[:-1], bounds[1:], strict=True)
    }
    shared: dict[str, dict[str, Any]] = {}
    for t in templates:
        shared[t] = {}
        for u in templates:
            block = full[span[t], span[u]]
            if t == u:
                block = block - np.eye(len(block))  # a template trivially matches itself
            best = block.max(axis=1)
            shared[t][u] = {
                "matched": int((best > threshold).sum()),
                "mean_best_iou": float(best.mean()),
            }
    return {
        "order": [f"{t}:{j}" for t, j in order],
        "iou": full.round(4).tolist(),
        "shared": shared,
    }
