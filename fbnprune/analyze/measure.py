"""What a measured task's networks do to it at one site: the component sweep, the lesions
(with their random and top-variance controls) and the preservation curve, each with the
seeds, samples and original scores it was measured with."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import numpy as np

from fbnprune.analyze.lesions import run_lesions
from fbnprune.analyze.metric import Metric
from fbnprune.analyze.networks import NetworkSet
from fbnprune.analyze.preservation import run_preservation, sweep_networks
from fbnprune.collect.activations import Activations
from fbnprune.recipe import AnalyzeConfig, Recipe
from fbnprune.select.selection import column_means, rms_scores

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

Clock = Callable[[str], AbstractContextManager[None]]
"""Times a named phase: ``with clock("lesions"): ...``."""


def measure_networks(
    model: PreTrainedModel,
    metric: Metric,
    acts: Activations,
    templates: NetworkSet,
    *,
    tag: str,
    site: str,
    recipe: Recipe,
    config: AnalyzeConfig,
    original: dict[str, float],
    template_ids: list[str],
    clock: Clock,
    progress: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Lesions and the preservation curve of one measured task (``tag``: ``task/site``).

    Args:
        acts: the task's template-token activations at ``site``.
        templates: the task's template networks, found in ``acts``.
        original: the unmasked model's scores on ``metric``.
        template_ids: the ids of the documents ``acts`` came from (recorded as provenance).
        clock: times the component sweep, the lesions and the preservation curve.
    """
    with clock("component sweep"):
        networks, skipped = sweep_networks(
            acts.matrix,
            config.preserve_components,
            templates,
            discover=recipe.discover,
            seed=recipe.seed,
            progress=progress,
        )
    means = column_means(acts.matrix)
    rms = rms_scores(acts.matrix).astype(np.float64)
    spread = np.sqrt(np.maximum(rms**2 - means.astype(np.float64) ** 2, 0.0))
    if skipped:
        logger.warning(
            "%s: n_components %s left out of the preservation curve: %d "
            "template tokens x %d neurons",
            tag,
            skipped,
            *acts.matrix.shape,
        )
    with clock("lesions"):
        lesions = run_lesions(
            model,
            metric,
            templates,
            acts.layer_widths,
            site=site,
            model_name=recipe.model,
            original=original,
            random_fraction=config.random_fraction,
            seeds=list(config.random_seeds),
            spread=spread,
            progress=progress,
            desc=f"lesions {tag}",
        )
    with clock("preservation"):
        rows = run_preservation(
            model,
            metric,
            networks,
            means,
            acts.layer_widths,
            site=site,
            model_name=recipe.model,
            progress=progress,
            desc=f"preservation {tag}",
        )
    provenance = {
        "seeds": {"ica": recipe.seed, "random_controls": list(config.random_seeds)},
        "samples": {"template": template_ids, "eval": metric.doc_ids},
        "metric": metric.primary,
        "original": original,
    }
    curve = {
        "rows": rows,
        "skipped_components": skipped,
        "n_template_tokens": int(acts.n_tokens),
        **provenance,
    }
    return {**lesions, **provenance}, curve
