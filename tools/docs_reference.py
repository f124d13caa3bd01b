"""MkDocs hook: writes the recipe reference (from the pydantic models) and the CLI reference
(from ``--help``) into ``docs/reference/`` before every build, so neither can drift from the
code. Registered in ``mkdocs.yml`` (``hooks:``)."""

from __future__ import annotations

import argparse
import io
import os
import typing
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from fbnprune.cli import build_parser
from fbnprune.recipe import GenerationConfig, Recipe, TaskConfig, Wording

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "reference"


def _type(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "")
    if isinstance(annotation, type):
        text = annotation.__name__
    return text.replace("|", "\\|")


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    factory = field.default_factory
    value = factory() if factory is not None else field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{value!r}`" if value is not None else "`None`"


def _section(name: str, model: type[BaseModel]) -> list[str]:
    doc = " ".join((model.__doc__ or "").strip().split("\n\n")[0].split())
    lines = [f"## `{name}`", "", doc, "", "| key | type | default | meaning |", "|---|---|---|---|"]
    for key, field in model.model_fields.items():
        what = (field.description or "").replace("\n", " ").replace("|", "\\|")
        lines.append(f"| `{key}` | {_type(field.annotation)} | {_default(field)} | {what} |")
    return [*lines, ""]


def recipe_reference() -> str:
    """Every recipe section and key, its type, default and description."""
    lines = [
        "# Recipe reference",
        "",
        "Generated from the pydantic models in `fbnprune/recipe/` at every docs build. Unknown "
        "keys are errors; `--set KEY=VALUE` overrides any key on the command line.",
        "",
    ]
    top = [(k, f) for k, f in Recipe.model_fields.items() if not _is_model(f.annotation)]
    lines += ["## top level", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    for key, field in top:
        what = (field.description or "").replace("|", "\\|")
        lines.append(f"| `{key}` | {_type(field.annotation)} | {_default(field)} | {what} |")
    lines += [""]
    lines += _section("tasks[]", TaskConfig)
    lines += _section("tasks[].wordings[]", Wording)
    lines += _section("tasks[].generation", GenerationConfig)
    for key, field in Recipe.model_fields.items():
        if _is_model(field.annotation):
            lines += _section(key, typing.cast(type[BaseModel], field.annotation))
    return "\n".join(lines) + "\n"


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def cli_reference() -> str:
    """``fbnprune --help`` and every subcommand's ``--help``."""
    parser = build_parser()
    os.environ.setdefault("COLUMNS", "100")
    out = ["# CLI reference", "", "Generated from `--help` at every docs build.", ""]
    out += ["## `fbnprune`", "", "```text", parser.format_help().rstrip(), "```", ""]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        buffer = io.StringIO()
        with redirect_stdout(buffer):
            command.print_help()
        out += [f"## `fbnprune {name}`", "", "```text", buffer.getvalue().rstrip(), "```", ""]
    return "\n".join(out) + "\n"


def on_pre_build(config: Any) -> None:
    REFERENCE.mkdir(parents=True, exist_ok=True)
    for name, text in (("recipe.md", recipe_reference()), ("cli.md", cli_reference())):
        file = REFERENCE / name
        if not file.is_file() or file.read_text() != text:
            file.write_text(text)
