"""What a model card says, read from the run directory and the export: ``CardFacts``, the
evaluation scores (``read_eval_results``) and the base model (``base_model_info``)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard

from fbnprune.models.packaged import PACKAGED_MODELS
from fbnprune.plan import PrunePlan
from fbnprune.rundir.layout import checkpoint_name

logger = logging.getLogger(__name__)

TAGS = ["pruned", "fbnprune", "functional-networks"]
UNKNOWN_LICENSE = "other"

METRIC_IDS = {"acc": "accuracy", "acc_norm": "accuracy", "exact_match": "exact_match"}


@dataclass(frozen=True)
class BaseModel:
    """The model a plan was made for, as the Hub knows it (``hub_id`` None when unknown)."""

    name: str
    hub_id: str | None
    license: str
    license_note: str | None = None


@dataclass(frozen=True)
class TaskScore:
    """One task's metric for the original and the pruned model (either may be missing).

    ``variant`` names the evaluated model that "pruned" stands for (e.g. ``checkpoint-padded``);
    ``extra`` holds other variants' values of the same metric.
    """

    task: str
    metric: str
    original: float | None
    pruned: float | None
    original_stderr: float | None = None
    pruned_stderr: float | None = None
    n_docs: int | None = None
    higher_is_better: bool = True
    variant: str | None = None
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class CardFacts:
    """Everything the card says, read from the run directory and the export."""

    plan: PrunePlan
    layout: str
    recipe: dict[str, Any]
    parity: dict[str, Any] | None = None
    prune: dict[str, Any] | None = None
    scores: list[TaskScore] = field(default_factory=list)
    export_bytes: int = 0
    formats: dict[str, dict[str, Any]] = field(default_factory=dict)
    repo_id: str | None = None
    heal: dict[str, Any] | None = None  # the heal log when the export is a healed checkpoint
    verdict: dict[str, Any] | None = None  # the run's verdict/verdict.json
    verdict_model: str = "unhealed"  # which of the verdict's models this export is


# -- inputs -----------------------------------------------------------------------------------
def read_eval_results(
    path: Path, layout: str | None = None, *, healed: bool = False
) -> list[TaskScore]:
    """Scores from the ``results.json`` that ``fbnprune evaluate`` writes; ``[]`` when absent
    or unreadable.

    Per task, ``{"metric": M, "models": {"original": x, VARIANT: y, ...}, "stderr": {...},
    "n_docs": n}`` (``fbnprune.evaluate.results``), where "pruned" is the variant of this
    ``layout`` when scored (``checkpoint-<layout>``, then ``sliced-<layout>``), else the one
    the results call ``pruned``; with ``healed``, only ``checkpoint-<layout>-healed``
    counts as the pruned model (an unhealed score must not stand for it).
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        if Path(path).exists():
            logger.warning("ignoring unreadable evaluation results %s: %s", path, exc)
        return []
    tasks = data.get("tasks") if isinstance(data, dict) else None
    if not isinstance(tasks, dict):
        return []
    if healed:
        preferred = [checkpoint_name(layout, healed=True)] if layout else []
    else:
        preferred = [checkpoint_name(layout), f"sliced-{layout}"] if layout else []
        preferred += ["pruned", str(data.get("pruned"))]
    scores: list[TaskScore] = []
    for task, entry in tasks.items():
        values = entry.get("models") if isinstance(entry, dict) else None
        if not isinstance(values, dict):
            continue
        metric = str(entry.get("metric") or "acc")
        stderr = entry.get("stderr") if isinstance(entry.get("stderr"), dict) else {}
        variant = next((v for v in preferred if _number(values.get(v)) is not None), None)
        original = _number(values.get("original"))
        pruned = _number(values.get(variant)) if variant else None
        if original is None and pruned is None:
            continue
        extra = {
            str(k): _number(v)
            for k, v in values.items()
            if k not in ("original", "pruned", variant)
        }
        n_docs = entry.get("n_docs")
        scores.append(
            TaskScore(
                task=str(task),
                metric=metric,
                original=original,
                pruned=pruned,
                original_stderr=_number(stderr.get("original")),
                pruned_stderr=_number(stderr.get(variant)) if variant else None,
                n_docs=n_docs if isinstance(n_docs, int) else None,
                higher_is_better=entry.get("higher_is_better") is not False,
                variant=variant if variant != "pruned" else data.get("pruned") or None,
                extra={k: v for k, v in extra.items() if v is not None},
            )
        )
    return scores


def _number(value: Any) -> float | None:
    """A finite number; None for anything else."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        return None
    return float(value)


def base_model_info(name: str) -> BaseModel:
    """Hub id and license of the base model ``name`` (a packaged name, Hub id or local dir)."""
    packaged = PACKAGED_MODELS.get(name)
    if packaged is not None:  # the loader's table
        return BaseModel(name, packaged.base_model, packaged.license)
    readme = _local_readme(name)
    if readme is not None:
        try:
            card = ModelCard.load(readme, ignore_metadata_errors=True)
            if card.data.license:
                hub_id = name if _looks_like_hub_id(name) and not Path(name).exists() else None
                return BaseModel(name, hub_id, str(card.data.license))
        except Exception as exc:  # noqa: BLE001 - any unreadable README means "unknown"
            logger.debug("cannot read %s: %s", readme, exc)
    hub_id = name if _looks_like_hub_id(name) and not Path(name).exists() else None
    note = (
        f"The license of the base model {name!r} could not be determined offline; check "
        "it before using or redistributing this model."
    )
    return BaseModel(name, hub_id, UNKNOWN_LICENSE, license_note=note)


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def _local_readme(name: str) -> Path | None:
    """The base model's README: in a local directory, or in the local Hugging Face cache."""
    if (Path(name) / "README.md").is_file():
        return Path(name) / "README.md"
    if _looks_like_hub_id(name):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "README.md")
        except Exception:  # noqa: BLE001 - an invalid id simply has no cache entry
            return None
        if isinstance(cached, str):
            return Path(cached)
    return None


def task_datasets(recipe: dict[str, Any]) -> dict[str, tuple[str, str | None]]:
    """Task name -> (dataset identifier, Hub dataset id or None) from the recipe's sources."""
    out: dict[str, tuple[str, str | None]] = {}
    for task in recipe.get("tasks") or []:
        scheme, _, rest = str(task.get("source", "")).partition(":")
        name = str(task.get("name", rest))
        if scheme == "hf":
            out[name] = (rest, rest)
        elif scheme == "builtin":
            out[name] = (rest, None)
        else:
            out[name] = (name, None)
    return out


def model_name(facts: CardFacts) -> str:
    if facts.repo_id:
        return facts.repo_id.split("/")[-1]
    base = facts.plan.model.rstrip("/").split("/")[-1]
    name = f"{base}-fbnprune-{facts.plan.site}-{facts.plan.kept_fraction:.0%}".replace("%", "pct")
    return f"{name}-healed" if facts.heal else name
