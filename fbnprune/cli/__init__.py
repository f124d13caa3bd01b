"""Command line: ``fbnprune SUBCOMMAND ...`` (also ``python -m fbnprune``).

Each subcommand lives in its own module with ``register(subparsers)`` and ``execute(args)``.
Expected failures (bad recipe, data, model, directory, parity, a run directory in use by
another process) print one clear message and exit with status 2 (``--debug`` adds the
traceback); Ctrl-C exits 130 and leaves only complete files behind.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
import warnings

from fbnprune import __version__

SUBCOMMANDS = ("run", "stages", "validate", "info", "export", "evaluate", "bench", "analyze")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fbnprune",
        description="Find the functional networks of MLP neurons a task needs (group ICA), "
        "keep them, slice the rest away exactly, and save a checkpoint that stock "
        "transformers loads.",
    )
    parser.add_argument("--version", action="version", version=f"fbnprune {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"fbnprune.cli.{name}").register(sub)
    for command in sub.choices.values():  # also accepted after the subcommand
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help=DEBUG_HELP)  # fmt: skip
    return parser


DEBUG_HELP = "show the full traceback of an error, not only its message"


def expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix: shown as one message, no traceback."""
    from fbnprune.adapters import UnsupportedArchitectureError
    from fbnprune.analyze import AnalyzeError
    from fbnprune.check import ParityError
    from fbnprune.collect import CollectError
    from fbnprune.data import DataError
    from fbnprune.discover import DiscoverError
    from fbnprune.evaluate import EvalError
    from fbnprune.export import ExportError
    from fbnprune.heal import HealError
    from fbnprune.loading import ModelLoadError
    from fbnprune.plan import PlanError
    from fbnprune.recipe import RecipeError
    from fbnprune.rundir import RunDirError
    from fbnprune.select import SelectError
    from fbnprune.slicing import SliceError

    return (
        RecipeError, DataError, ModelLoadError, RunDirError, PlanError, SliceError,
        ParityError, CollectError, DiscoverError, SelectError, UnsupportedArchitectureError,
        ExportError, EvalError, HealError, AnalyzeError,
    )  # fmt: skip


def configure_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.quiet)
    try:
        return int(args.execute(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print("\ninterrupted; finished stages are kept, re-run the same command to resume",
              file=sys.stderr)  # fmt: skip
        return 130
    except expected_errors() as exc:
        if args.debug:
            traceback.print_exc()
        print(f"fbnprune {args.command}: error: {exc}", file=sys.stderr)
        return 2
