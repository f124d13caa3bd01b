"""``Calibration``: what the select stage reads, and the unit scores derived from it.

Each task's calibration activations and (for the ``ica`` selector) its network scores;
from them, per selector and seed, every unit's score merged over tasks and the units' means
(the ``mean`` fill), each computed once per process. ``RunCalibration`` is a run's: its
model is the run's, and it measures the layers' sensitivity on the run's prompts.
``fbnprune.prune`` (in memory, no run) builds a plain ``Calibration``.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

import numpy as np

from fbnprune.collect.activations import Activations
from fbnprune.discover.fitting import NetworkScores
from fbnprune.recipe import SelectConfig
from fbnprune.rundir.context import RunContext
from fbnprune.select.selection import (
    ModelSource,
    SelectError,
    column_means,
    layer_bounds,
    unit_scores,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from fbnprune.models.onload import LayerwiseModel

logger = logging.getLogger(__name__)


class Calibration:
    """The calibration data of one model: activations per task, network scores per task.

    ``model`` returns the model they were recorded from; only the selectors that read
    weights (``wanda``) and the ``reconstruct`` fill call it.
    """

    def __init__(
        self,
        activations: dict[str, Activations],
        networks: dict[str, NetworkScores] | None = None,
        *,
        model: ModelSource,
    ) -> None:
        self.activations, self.networks, self.model = activations, networks or {}, model
        self._merged: dict[tuple[str, int], np.ndarray] = {}

    @property
    def layer_widths(self) -> list[int]:
        return list(next(iter(self.activations.values())).layer_widths)

    @property
    def layers(self) -> list[tuple[int, int]]:
        """Each layer's (start, stop) in the flat unit index."""
        return layer_bounds(self.layer_widths)

    def task_scores(self, task: str, selector: str, *, seed: int) -> np.ndarray:
        """One score per unit of the task's calibration activations (higher: keep first)."""
        if selector == "ica":
            if task not in self.networks:
                raise SelectError(f"no network scores of task {task!r}: run discover first")
            return self.networks[task].scores
        return unit_scores(selector, self.model, self.activations[task].matrix, seed=seed)

    def merged_scores(self, selector: str, seed: int) -> np.ndarray:
        """Every unit's score, the tasks' scores merged by max (a union of tasks)."""
        key = (selector, seed)
        if key not in self._merged:
            self._merged[key] = np.max(
                [self.task_scores(t, selector, seed=seed) for t in self.activations], axis=0
            )
        return self._merged[key]

    @functools.cached_property
    def unit_means(self) -> np.ndarray:
        """Every unit's mean over the calibration tokens of all tasks (the ``mean`` fill)."""
        acts = list(self.activations.values())
        tokens = sum(a.n_tokens for a in acts)
        total = sum(_means(a).astype(np.float64) * a.n_tokens for a in acts)
        return np.asarray(total / tokens)


class RunCalibration(Calibration):
    """A run's calibration data: the run's model, loaded on first use (a plan that needs
    no weights never loads it; with ``collect.onload: sequential`` its down projections are
    read one layer at a time from its checkpoint, and the whole model is never loaded), and
    the layers' sensitivity on the run's prompts."""

    def __init__(
        self,
        ctx: RunContext,
        activations: dict[str, Activations],
        networks: dict[str, NetworkScores] | None = None,
    ) -> None:
        super().__init__(activations, networks, model=lambda: self._weights)
        self.ctx = ctx
        self._sensitivity: dict[tuple[str, int, float, int], list[float]] = {}

    @functools.cached_property
    def _weights(self) -> PreTrainedModel | LayerwiseModel:
        if self.ctx.recipe.collect.onload == "sequential":
            return self.ctx.layerwise_model()
        return self.ctx.model

    def layer_sensitivity(self, select: SelectConfig, seed: int) -> list[float]:
        """Per layer, the KL from the original when that layer alone is cut to the budget
        (``fbnprune.select.sensitivity``)."""
        from fbnprune.select.sensitivity import layer_sensitivity

        key = (select.selector, seed, select.fraction, select.sensitivity_samples)
        if key not in self._sensitivity:
            ctx, layers = self.ctx, self.layers
            scores = self.merged_scores(select.selector, seed)
            prompts = ctx.calibration_prompts()[: select.sensitivity_samples]
            self._sensitivity[key] = layer_sensitivity(
                ctx.model,
                ctx.tokenizer,
                prompts,
                [scores[a:b] for a, b in layers],
                select.fraction,
                unit_means=[self.unit_means[a:b] for a, b in layers],
                model_name=ctx.recipe.model,
                max_length=ctx.max_length,
                batch_size=ctx.recipe.collect.batch_size,
                progress=ctx.progress,
            )
            logger.info(
                "select: layer sensitivity (KL) %s",
                " ".join(f"{v:.3g}" for v in self._sensitivity[key]),
            )
        return self._sensitivity[key]


def _means(acts: Activations) -> np.ndarray:
    """Every unit's mean (``column_means``); from a store one layer at a time, so the matrix
    is never in memory whole."""
    store = getattr(acts, "store", None)
    if store is None:
        return column_means(acts.matrix)
    return np.concatenate([column_means(store.layer(i)) for i in range(len(acts.layer_widths))])
