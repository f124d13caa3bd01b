"""Recipes: the validated YAML that drives a run.

A recipe names the model, the tasks and every stage's settings. Unknown keys are errors
(``extra="forbid"``), so a typo never passes silently. ``Recipe.fingerprint`` hashes the
normalised recipe; run directories use per-stage fingerprints to decide what to reuse.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

RECIPE_VERSION = 1

Site = Literal["hidden", "output"]
Fill = Literal["zero", "mean"]
Layout = Literal["padded", "compact"]
Allocation = Literal["global", "uniform"]
Selector = Literal["ica", "magnitude", "random", "wanda"]


class RecipeError(ValueError):
    """A recipe that cannot be read or does not validate."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskConfig(_Strict):
    """One task: where its text comes from and how much of it is used.

    ``source`` is ``builtin:NAME`` (bbc_news, wikipedia, python_code, arithmetic),
    ``file:PATH`` (.txt: one document per blank-line-separated block; .jsonl: one object
    per line) or ``hf:DATASET`` (Hugging Face ``datasets``; needs the network).
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    source: str
    template: str = "{text}"
    text_field: str = "text"
    split: str = "train"
    hf_config: str | None = None
    calibration_samples: int = Field(default=64, ge=1)
    heldout_samples: int = Field(default=16, ge=1)
    max_length: int = Field(default=128, ge=8)

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme, sep, rest = value.partition(":")
        if not sep or scheme not in {"builtin", "file", "hf"} or not rest:
            raise ValueError(
                f"source {value!r} must look like 'builtin:NAME', 'file:PATH' or 'hf:DATASET'"
            )
        return value

    @field_validator("template")
    @classmethod
    def _has_text_slot(cls, value: str) -> str:
        if "{text}" not in value:
            raise ValueError("template must contain the placeholder '{text}'")
        return value


class CollectConfig(_Strict):
    batch_size: int = Field(default=8, ge=1)
    storage: Literal["memory", "memmap"] = "memmap"


class DiscoverConfig(_Strict):
    n_components: int = Field(default=128, ge=2)
    threshold: float = Field(default=3.6, gt=0)
    max_iter: int = Field(default=400, ge=10)
    tol: float = Field(default=1e-4, gt=0)


class SelectConfig(_Strict):
    selector: Selector = "ica"
    budget: float = Field(default=0.10, description="fraction of MLP units kept, in (0, 1]")
    allocation: Allocation = "global"
    min_per_layer: float = Field(
        default=0.02, ge=0, lt=1, description="floor on the fraction kept in every layer"
    )

    @field_validator("budget")
    @classmethod
    def _budget_range(cls, value: float) -> float:
        if not 0 < value <= 1:
            raise ValueError(f"budget must be in (0, 1], got {value}")
        return value


class PruneConfig(_Strict):
    fill: Fill = "mean"


class CheckConfig(_Strict):
    samples: int = Field(default=4, ge=1, description="held-out prompts compared")
    atol: float = Field(
        default=1e-4,
        gt=0,
        description="max |delta logits| allowed: masked vs sliced in float64, and sliced vs "
        "saved-and-reloaded in the model's dtype",
    )


class SaveConfig(_Strict):
    layouts: list[Layout] = Field(default_factory=lambda: ["padded"], min_length=1)


EVAL_SUITE_TASKS = ("bbc_topics", "word_problems", "ppl_news", "ppl_wiki", "ppl_code")


class EvaluateConfig(_Strict):
    """``fbnprune evaluate``: lm-eval tasks and settings (see ``fbnprune.evaluate``).

    ``tasks`` names tasks of the generated offline suite (``EVAL_SUITE_TASKS``), of YAML
    files under ``include_paths``, or built-in lm-eval tasks (those need the network).
    """

    tasks: list[str] = Field(default_factory=lambda: list(EVAL_SUITE_TASKS), min_length=1)
    include_paths: list[str] = Field(default_factory=list)
    limit: int | None = Field(default=None, ge=1, description="documents per task (all if None)")
    batch_size: int = Field(default=8, ge=1)
    max_length: int | None = Field(
        default=None, ge=16, description="context window; the model's own if None"
    )
    choice_samples: int = Field(
        default=100, ge=1, description="documents per multiple-choice suite task"
    )
    perplexity_samples: int = Field(
        default=20, ge=1, description="documents per perplexity suite task"
    )
    perplexity_max_words: int = Field(
        default=256, ge=8, description="perplexity documents are cut to this"
    )
    seed: int = Field(default=0, description="which documents outside calibration are drawn")


class Recipe(_Strict):
    """A whole run: model, tasks and stage settings."""

    version: Literal[1] = RECIPE_VERSION
    name: str = "fbnprune-run"
    model: str
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    site: Site = "hidden"
    seed: int = 0
    tasks: list[TaskConfig] = Field(min_length=1)
    collect: CollectConfig = CollectConfig()
    discover: DiscoverConfig = DiscoverConfig()
    select: SelectConfig = SelectConfig()
    prune: PruneConfig = PruneConfig()
    check: CheckConfig = CheckConfig()
    save: SaveConfig = SaveConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    @field_validator("tasks")
    @classmethod
    def _unique_names(cls, tasks: list[TaskConfig]) -> list[TaskConfig]:
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        return tasks

    def fingerprint(self, *parts: str) -> str:
        """Hash of the given top-level sections (all of them when none are named)."""
        data = self.model_dump(mode="json")
        if parts:
            data = {k: data[k] for k in parts}
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; raise ``RecipeError`` with every problem listed."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping, got {type(raw).__name__}")
    return parse_recipe(raw, origin=str(path))


def parse_recipe(raw: dict, *, origin: str = "<recipe>") -> Recipe:
    """Validate a recipe given as a mapping."""
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{origin}: invalid recipe ({exc.error_count()} problem(s)):"]
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = "unknown key (typo?)" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"  - {where}: {msg}")
        raise RecipeError("\n".join(lines)) from None
