"""Which documents each part of the analysis uses, and how samples become ICA units.

Per task, one seeded draw gives ``2 * samples`` documents: the first half for the group-ICA
templates, the second for individual ICA; evaluation documents are drawn from the rest of
the source (no shared id or text with either half; BBC topics balanced).

Individual ICA on one sample is ill-posed when the sample has few tokens for its number of
components: a k-component decomposition of t tokens needs t > k, and is noise well before
that. A sample needs ``min_tokens_per_component * k`` tokens; shorter ones are merged with
the next short samples (``merge``), decomposed with fewer components (``reduce``), or left
out (``skip``); the report counts each case.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from fbnprune.data.task_text import Document, load_documents, load_task
from fbnprune.errors import FbnpruneError
from fbnprune.evaluate.documents import draw_documents
from fbnprune.hashing import digest
from fbnprune.recipe import TaskConfig


class AnalyzeError(FbnpruneError, ValueError):
    """An analysis that cannot be run as asked (sizes, task names, output directory)."""


@dataclass(frozen=True)
class TaskSamples:
    """The documents one task contributes to the analysis."""

    task: str
    source: str
    template_text: str
    max_length: int
    template: list[Document]
    individual: list[Document]
    eval: list[Document]

    def prompts(self, docs: list[Document]) -> list[str]:
        return [self.template_text.replace("{text}", d.text) for d in docs]

    def ids(self) -> dict[str, list[str]]:
        return {
            part: [d.id for d in getattr(self, part)] for part in ("template", "individual", "eval")
        }


def id_fingerprint(ids: list[str]) -> str:
    """Short hash of an id list, to name a sample set in a table caption."""
    return digest(json.dumps(ids).encode(), 12)


def draw_samples(task: TaskConfig, *, samples: int, eval_docs: int, seed: int) -> TaskSamples:
    """Template, individual and evaluation documents of one task (``eval_docs`` may be 0)."""
    cfg = task.model_copy(update={"calibration_samples": 2 * samples, "heldout_samples": 1})
    data = load_task(cfg, seed=seed)  # raises DataError when the source is too small
    picked = data.calibration
    evals: list[Document] = []
    if eval_docs:
        pool = load_documents(
            task.source, text_field=task.text_field, split=task.split, hf_config=task.hf_config
        )
        evals = draw_documents(
            pool,
            eval_docs,
            exclude=picked,
            seed=seed,
            balance_labels=task.source == "builtin:bbc_news",
        )
        if not evals:
            raise AnalyzeError(f"task {task.name!r}: no documents left for evaluation")
    return TaskSamples(
        task.name,
        task.source,
        task.template,
        task.max_length,
        picked[:samples],
        picked[samples:],
        evals,
    )


@dataclass(frozen=True)
class Unit:
    """What one individual ICA runs on: one sample, or several merged short ones."""

    samples: tuple[int, ...]
    n_tokens: int
    n_components: int


@dataclass(frozen=True)
class UnitPlan:
    units: list[Unit]
    skipped: list[int]  # sample indices left out
    policy: str
    min_tokens: int
    n_components: int

    def summary(self) -> dict[str, int | str]:
        return {
            "policy": self.policy,
            "min_tokens": self.min_tokens,
            "samples": sum(len(u.samples) for u in self.units) + len(self.skipped),
            "units": len(self.units),
            "merged_units": sum(len(u.samples) > 1 for u in self.units),
            "samples_in_merged_units": sum(
                len(u.samples) for u in self.units if len(u.samples) > 1
            ),
            "reduced_units": sum(u.n_components < self.n_components for u in self.units),
            "skipped_samples": len(self.skipped),
        }


def plan_units(
    lengths: list[int], n_components: int, *, per_component: float, policy: str
) -> UnitPlan:
    """Group samples (by token count) into individual-ICA units under a short-sample policy.

    A unit needs ``ceil(per_component * n_components)`` tokens. ``merge`` joins consecutive
    short samples until a group is long enough (a short remainder at the end is skipped);
    ``reduce`` gives a short sample ``floor(tokens / per_component)`` components (skipped
    below 2); ``skip`` leaves short samples out.
    """
    if policy not in ("merge", "reduce", "skip"):
        raise AnalyzeError(f"unknown short-sample policy {policy!r} (merge, reduce, skip)")
    need = math.ceil(per_component * n_components)
    units: list[Unit] = []
    skipped: list[int] = []
    pending: list[int] = []
    for i, n in enumerate(lengths):
        if n >= need:
            units.append(Unit((i,), n, n_components))
        elif policy == "skip":
            skipped.append(i)
        elif policy == "reduce":
            k = int(n // per_component)
            if k >= 2:
                units.append(Unit((i,), n, k))
            else:
                skipped.append(i)
        else:
            pending.append(i)
            total = sum(lengths[j] for j in pending)
            if total >= need:
                units.append(Unit(tuple(pending), total, n_components))
                pending = []
    skipped.extend(pending)
    return UnitPlan(units, sorted(skipped), policy, need, n_components)
