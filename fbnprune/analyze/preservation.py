"""The preservation curve (the seed paper's Tables 8-10, Figure 3): keep only the union of
the networks found with ``n_components`` = k, for several k, and measure the task metric,
with dropped neurons zeroed (the paper) and filled with their mean on the template tokens
(mean compensation)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from fbnprune.analyze.metric import Metric
from fbnprune.analyze.networks import ComponentSweep, NetworkSet
from fbnprune.analyze.plans import keep_plan, score_under, split_layers
from fbnprune.discover.group_ica import ica_feasible
from fbnprune.recipe import DiscoverConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def sweep_networks(
    matrix: np.ndarray,
    ks: list[int],
    templates: NetworkSet,
    *,
    discover: DiscoverConfig,
    seed: int,
    progress: bool = False,
) -> tuple[dict[int, NetworkSet], list[int]]:
    """Networks for every feasible k (the templates for k = their own count) and the ks that
    were left out because the matrix has too few tokens or neurons for them."""
    n_tokens, n_neurons = matrix.shape
    usable = [k for k in ks if ica_feasible(k, n_tokens, n_neurons)]
    skipped = [k for k in ks if k not in usable]
    found: dict[int, NetworkSet] = {}
    rest = [k for k in usable if k != len(templates.members)]
    if len(templates.members) in usable:
        found[len(templates.members)] = templates
    if rest:
        sweep = ComponentSweep(matrix, max(rest), seed)
        for k in tqdm(rest, desc="component sweep", leave=False, disable=not progress):
            found[k] = sweep.networks(k, discover)
    return dict(sorted(found.items())), skipped


def run_preservation(
    model: PreTrainedModel,
    metric: Metric,
    networks: dict[int, NetworkSet],
    means: np.ndarray,
    layer_widths: list[int],
    *,
    site: str,
    model_name: str,
    progress: bool = False,
    desc: str = "preservation",
) -> list[dict[str, Any]]:
    """One row per k: neurons kept (in all and per layer) and the metric, zero and mean fill."""
    model_type = model.config.model_type
    rows = []
    jobs = [(k, fill) for k in networks for fill in ("zero", "mean")]
    bar = tqdm(total=len(jobs), desc=desc, leave=False, disable=not progress)
    for k, nets in networks.items():
        keep = nets.union()
        row: dict[str, Any] = {
            "k": k,
            "kept": int(keep.sum()),
            "kept_fraction": float(keep.mean()),
            "kept_per_layer": [float(p.mean()) for p in split_layers(keep, layer_widths)],
            "converged": nets.converged,
        }
        for fill in ("zero", "mean"):
            fills = means if fill == "mean" else None
            plan = keep_plan(
                keep,
                layer_widths,
                fill_values=fills,
                model=model_name,
                model_type=model_type,
                site=site,
            )
            row[fill] = score_under(model, metric, plan)
            bar.update()
        rows.append(row)
    bar.close()
    return rows
