"""Command-line overrides of a recipe: ``--set KEY=VALUE`` with a dotted key.

``prune.sequential=true``, ``bench.allocations=[uniform,sensitivity]`` or
``tasks.0.calibration_samples=32``: the value is read as YAML, the key walks mappings by
name and lists by index. The result is validated like any recipe, so an unknown key is an
error, not a silently ignored setting; the run directory's ``recipe.yaml`` records the
recipe as overridden.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import yaml

from fbnprune.recipe.base import RecipeError


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` -> ``(["a", "b"], value read as YAML)``."""
    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise RecipeError(
            f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. prune.sequential=true"
        )
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as exc:
        raise RecipeError(f"--set {text!r}: the value is not valid YAML: {exc}") from None
    return [p.strip() for p in parts], parsed


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """A copy of the recipe mapping ``raw`` with every ``KEY=VALUE`` of ``overrides`` set,
    in order (a later one wins). A missing mapping on the way is created; a list is
    indexed by position and must already hold that index."""
    out = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = out
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise RecipeError(
                        f"--set {text!r}: {where} is not an index of a list of {len(node)}"
                    )
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                parent = ".".join(parts[:depth])
                raise RecipeError(
                    f"--set {text!r}: {parent} is a {type(node).__name__}, not a section"
                )
    return out
