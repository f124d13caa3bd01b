"""Recipes: the validated YAML that drives a run.

A recipe names the model, the tasks and every stage's settings. Unknown keys are errors
(``extra="forbid"``), so a typo never passes silently. ``Recipe.fingerprint`` hashes the
normalised recipe; run directories use per-stage fingerprints to decide what to reuse.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from fbnprune.hashing import digest
from fbnprune.recipe.base import MAX_SEED, RECIPE_VERSION, RecipeError, Site, _Additions
from fbnprune.recipe.commands import EVAL_SUITE_TASKS, AnalyzeConfig, BenchConfig, EvaluateConfig
from fbnprune.recipe.overrides import apply_overrides
from fbnprune.recipe.stages import (
    CheckConfig,
    CollectConfig,
    DiscoverConfig,
    HealConfig,
    PruneConfig,
    SaveConfig,
    SelectConfig,
    VerdictConfig,
)
from fbnprune.recipe.tasks import GenerationConfig, TaskConfig, Wording

__all__ = [
    "EVAL_SUITE_TASKS",
    "RECIPE_VERSION",
    "AnalyzeConfig",
    "BenchConfig",
    "CheckConfig",
    "CollectConfig",
    "DiscoverConfig",
    "EvaluateConfig",
    "HealConfig",
    "PruneConfig",
    "Recipe",
    "RecipeError",
    "SaveConfig",
    "SelectConfig",
    "GenerationConfig",
    "TaskConfig",
    "VerdictConfig",
    "Wording",
    "load_recipe",
    "parse_recipe",
]


class Recipe(_Additions):
    """A whole run: model, tasks and stage settings."""

    added = ("verdict", "allow_pickle")  # left out of fingerprints while at their defaults

    version: Literal[1] = RECIPE_VERSION
    name: str = "fbnprune-run"
    model: str
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    allow_pickle: bool = Field(
        default=False,
        description="load a model whose weights are pickle files (pytorch_model.bin): "
        "loading a pickle can run code, so only for a file you trust; by default fbnprune "
        "loads safetensors only",
    )
    site: Site = "hidden"
    seed: int = Field(
        default=0, ge=0, le=MAX_SEED, description="seeds the splits, ICA and the selectors"
    )
    tasks: list[TaskConfig] = Field(min_length=1)
    collect: CollectConfig = CollectConfig()
    discover: DiscoverConfig = DiscoverConfig()
    select: SelectConfig = SelectConfig()
    prune: PruneConfig = PruneConfig()
    check: CheckConfig = CheckConfig()
    save: SaveConfig = SaveConfig()
    heal: HealConfig = HealConfig()
    verdict: VerdictConfig = VerdictConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    bench: BenchConfig = BenchConfig()
    analyze: AnalyzeConfig = AnalyzeConfig()

    @field_validator("tasks")
    @classmethod
    def _unique_names(cls, tasks: list[TaskConfig]) -> list[TaskConfig]:
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        return tasks

    @model_validator(mode="after")
    def _auto_budget_needs_answers(self) -> Recipe:
        asks = any(
            t.generation is None and (t.choices is not None or t.source.startswith("lmeval:"))
            for t in self.tasks
        )
        if self.select.auto and not asks:
            raise ValueError(
                "select.budget: auto keeps the smallest budget that keeps the task's accuracy: "
                "it needs a multiple-choice task (choices, and labelled documents); generation "
                "tasks are not searched yet"
            )
        return self

    @model_validator(mode="after")
    def _whole_model_cuts_in_memory(self) -> Recipe:
        if self.save.onload == "sequential":
            if self.prune.vocabulary == "task":
                raise ValueError(
                    "prune.vocabulary: task cuts the embedding and LM head in memory; "
                    "save.onload: sequential copies them as they are: use save.onload: full"
                )
            if self.select.drop_layers or self.select.attention_heads:
                raise ValueError(
                    "select.drop_layers and select.attention_heads cut decoder blocks in "
                    "memory; save.onload: sequential slices only the MLPs: use save.onload: full"
                )
        return self

    def fingerprint(self, *parts: str) -> str:
        """Hash of the given top-level sections (all of them when none are named)."""
        data = self.model_dump(mode="json")
        if parts:
            data = {k: data[k] for k in parts}
        return digest(json.dumps(data, sort_keys=True).encode())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read and validate a recipe file; raise ``RecipeError`` with every problem listed.

    The file must be UTF-8 YAML; a key given twice in one mapping is an error (plain YAML
    would silently keep the last one). ``overrides`` are ``KEY=VALUE`` settings applied
    before validation (``fbnprune.recipe.overrides``: the command line's ``--set``)."""
    path = Path(path)
    if path.is_dir():
        yamls = sorted(p.name for p in path.glob("*.y*ml"))
        hint = f"; pass one of the recipes in it: {', '.join(yamls)}" if yamls else ""
        raise RecipeError(f"{path} is a directory, not a recipe file{hint}")
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}")
    text = _read_recipe_text(path)
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except _DuplicateKeyError as exc:
        raise RecipeError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping, got {type(raw).__name__}")
    raw = apply_overrides(_paths_beside(raw, path.parent), overrides)
    origin = (
        f"{path} (with {' '.join('--set ' + o for o in overrides)})" if overrides else str(path)
    )
    return parse_recipe(raw, origin=origin)


def _paths_beside(raw: dict, folder: Path) -> dict:
    """Relative ``file:``/``lmeval:`` task sources (and ``heal.corpus``), resolved against
    the recipe's folder (not the working directory), so a recipe runs the same from
    anywhere."""
    tasks = raw.get("tasks")
    if isinstance(tasks, list):
        resolved = []
        for task in tasks:
            if isinstance(task, dict) and isinstance(task.get("source"), str):
                task = {**task, "source": _source_beside(task["source"], folder)}
            resolved.append(task)
        raw = {**raw, "tasks": resolved}
    heal = raw.get("heal")
    if isinstance(heal, dict) and isinstance(heal.get("corpus"), str):
        raw = {**raw, "heal": {**heal, "corpus": _source_beside(heal["corpus"], folder)}}
    return raw


def _source_beside(source: str, folder: Path) -> str:
    scheme, sep, rest = source.partition(":")
    is_path = scheme == "file" or Path(rest).suffix.lower() in (".yaml", ".yml")
    relative = bool(rest) and not Path(rest).expanduser().is_absolute()
    if sep and scheme in ("file", "lmeval") and is_path and relative:
        return f"{scheme}:{(folder / rest).resolve()}"
    return source


def _read_recipe_text(path: Path) -> str:
    """The recipe's text, decoded as UTF-8 (a leading byte-order mark is allowed)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise RecipeError(
            f"{path}: not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start} "
            f"(line {line}) cannot be decoded; save the recipe as UTF-8"
        ) from None


class _DuplicateKeyError(yaml.YAMLError):
    """A mapping key given twice."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping."""


def _construct_unique_mapping(
    loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False
) -> dict:
    seen: dict[object, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # ``<<: *anchor`` merges; explicit keys may override merged ones
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        try:
            first = seen.get(key)
        except TypeError:
            continue  # unhashable key: construct_mapping reports it
        if first is not None:
            raise _DuplicateKeyError(
                f"duplicate key {key!r} at line {line} (first given at line {first}); YAML "
                "would silently keep the last value: remove one of them"
            )
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


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
