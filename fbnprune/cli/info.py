"""``fbnprune info``: supported architectures, packaged models and built-in corpora."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "info",
        help="list supported architectures, packaged offline models and built-in corpora",
        description="List what fbnprune can work with offline.",
    )
    parser.set_defaults(execute=execute)


def execute(args: argparse.Namespace) -> int:
    from fbnprune.data.task_text import BUILTIN_SOURCES
    from fbnprune.models.adapters import ADAPTERS
    from fbnprune.models.loading import PACKAGED_MODELS

    print("architectures (config.model_type):")
    for adapter in ADAPTERS:
        print(f"  {adapter.family:<12} {', '.join(adapter.model_types)}")
    print("packaged models (model: NAME):")
    for name, packaged in PACKAGED_MODELS.items():
        print(f"  {name:<14} PyPI {packaged.package}")
    print("built-in corpora (source: builtin:NAME):")
    for name in BUILTIN_SOURCES:
        print(f"  {name}")
    return 0
