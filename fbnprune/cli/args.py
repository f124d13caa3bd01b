"""Argument types shared by the subcommands: comma-separated lists, positive counts."""

from __future__ import annotations

import argparse


def optional_names(text: str) -> list[str]:
    """``a,b,c`` -> ``["a", "b", "c"]``; ``''`` -> ``[]`` (to switch a list off)."""
    return [n.strip() for n in text.split(",") if n.strip()]


def names(text: str) -> list[str]:
    """A non-empty comma-separated list of names."""
    values = optional_names(text)
    if not values:
        raise argparse.ArgumentTypeError("expected a comma-separated list of names")
    return values


def ints(text: str) -> list[int]:
    """A non-empty comma-separated list of integers."""
    try:
        values = [int(v) for v in optional_names(text)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {exc}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected comma-separated integers")
    return values


def fractions(text: str) -> list[float]:
    """``0.1,0.3`` or ``10%,30%`` -> ``[0.1, 0.3]``; ``''`` -> ``[]``."""
    try:
        return [
            float(v.rstrip("%")) / (100 if v.endswith("%") else 1) for v in optional_names(text)
        ]
    except ValueError as exc:
        message = f"expected fractions like 0.1,0.3 or 10%,30%: {exc}"
        raise argparse.ArgumentTypeError(message) from None


def positive(text: str) -> int:
    """An integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


SET_HELP = (
    "override a recipe setting, e.g. --set prune.sequential=true or "
    "--set bench.allocations=[uniform,sensitivity] (dotted key, YAML value; repeatable; "
    "the run directory's recipe.yaml records the result)"
)


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE``, repeatable: recipe overrides (``fbnprune.recipe.overrides``)."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=SET_HELP,
    )
