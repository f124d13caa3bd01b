"""Command line: ``fbnprune SUBCOMMAND ...`` (also ``python -m fbnprune``).

Each subcommand lives in its own module with ``register(subparsers)`` and ``execute(args)``.
Expected failures (bad recipe, data, model, directory, parity, a run directory in use by
another process, a full disk or a read-only folder) print one clear message and exit with
status 2 (``--debug`` adds the traceback); Ctrl-C, also during start-up, exits 130 and leaves
only complete files behind.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
import traceback
import warnings

from fbnprune import __version__
from fbnprune.errors import FbnpruneError

SUBCOMMANDS = (
    "run",
    "stage_commands",
    "validate",
    "info",
    "export",
    "evaluate",
    "bench",
    "analyze",
)


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
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP
        )
    return parser


DEBUG_HELP = "show the full traceback of an error, not only its message"


def configure_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)


def quiet_libraries() -> None:
    """``--no-progress`` silences the libraries' own bars too (transformers' weight loading,
    the Hub's downloads, datasets' maps), not only fbnprune's."""
    import datasets
    import huggingface_hub
    import transformers

    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    datasets.disable_progress_bars()


# operating-system faults that are the machine's, not a bug: named, with what to do
DISK_FAULTS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def disk_fault(exc: BaseException) -> str | None:
    """One line for a full disk, a read-only or unwritable folder (raised as ``OSError``, or
    by safetensors' Rust code as its own error that carries the OS message), else None."""
    if isinstance(exc, OSError) and exc.errno in DISK_FAULTS:
        where = f" at {exc.filename}" if exc.filename else ""
        return f"{DISK_FAULTS[exc.errno]}{where}"
    text = str(exc)
    for code, what in DISK_FAULTS.items():
        if f"os error {code})" in text or os.strerror(code) in text:
            return f"{what} ({text.strip().splitlines()[0][:200]})"
    return None


def _prog(args: argparse.Namespace) -> str:
    return f"fbnprune {args.command}".strip()


def main(argv: list[str] | None = None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    args = argparse.Namespace(command="")
    try:
        parser = build_parser()  # imports every subcommand: Ctrl-C may land here too
        args = parser.parse_args(argv)
        configure_logging(args.quiet)
        if getattr(args, "no_progress", False):
            quiet_libraries()
        return int(args.execute(args) or 0)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(
            "\ninterrupted; finished stages are kept, re-run the same command to resume",
            file=sys.stderr,
        )
        return 130
    except FbnpruneError as exc:  # every error that is the user's to fix
        if debug:
            traceback.print_exc()
        print(f"{_prog(args)}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        fault = disk_fault(exc)
        if fault is None:
            raise
        if debug:
            traceback.print_exc()
        print(
            f"{_prog(args)}: error: {fault}. Free space or choose a writable --out; "
            "finished stages are kept (nothing half-written), so the same command resumes",
            file=sys.stderr,
        )
        return 2
