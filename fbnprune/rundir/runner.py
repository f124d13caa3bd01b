"""The run directory: one folder that holds a run's recipe, stage outputs and bookkeeping.

``run.json`` records, per stage, the fingerprint of its inputs, its wall time and peak
memory. A stage whose recorded fingerprint equals the current one, and whose outputs exist,
is reused; anything else is recomputed. Stage outputs are written atomically, so an
interrupted stage leaves no partial file and simply runs again next time.

Two guards protect what is not a run. ``check_replaceable`` is the one place that decides
whether an existing output folder may be deleted and replaced (``--overwrite``, and the
outputs of export and analyze): only an earlier output of the same kind, or an empty folder,
and never the working directory, one of its parents, the home directory, the filesystem root,
or a folder holding the recipe or the model. ``RunDir.lock`` holds a lock file (``.lock``)
inside the folder for the length of a command, so that a second process writing into the same
folder is refused at once, naming the holder (``.lock.json``).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import os
import shlex
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from fbnprune.errors import FbnpruneError
from fbnprune.hashing import digest as digest  # re-exported: its old home
from fbnprune.hashing import fingerprint as fingerprint
from fbnprune.io import atomic_write_json
from fbnprune.rundir.layout import RUN_FILE, RunLayout

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
LOCK_HOLDER = ".lock.json"
BOOKKEEPING = (LOCK_FILE, LOCK_HOLDER)  # do not make a folder non-empty


class RunDirError(FbnpruneError, ValueError):
    """An output directory that cannot be used for this run."""


class RunDirLockedError(RunDirError):
    """An output directory that another process is writing into."""


def is_empty_dir(path: Path) -> bool:
    """Whether ``path`` holds nothing but lock bookkeeping."""
    return all(child.name in BOOKKEEPING for child in Path(path).iterdir())


def check_replaceable(
    path: str | Path,
    *,
    protected: Iterable[str | os.PathLike[str] | None] = (),
    markers: Iterable[str] = (RUN_FILE,),
    kind: str = "an fbnprune run directory",
) -> None:
    """Raise ``RunDirError`` unless the existing folder ``path`` may be deleted and replaced.

    Replaceable: a missing path, an empty folder, or one that holds one of ``markers`` (an
    earlier output of the same ``kind``); never the working directory or one of its parents,
    the home directory or one of its parents, the filesystem root, nor a folder that is or
    contains one of the ``protected`` paths (the recipe file, a local model) that exist.
    Nothing is changed on disk.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir():
        raise RunDirError(f"{path} exists and is not a directory; choose another --out")
    target = path.resolve()
    shown = f"{path}" if str(path) == str(target) else f"{path} ({target})"
    fix = "choose another --out (a new folder, or an earlier output of fbnprune)"
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    for what, hit in (
        ("the filesystem root", target == Path(target.anchor)),
        ("the working directory", target == cwd),
        ("a parent of the working directory", target in cwd.parents),
        ("the home directory", target == home),
        ("a parent of the home directory", target in home.parents),
    ):
        if hit:
            raise RunDirError(f"refusing to replace {shown}: it is {what}; {fix}")
    for item in protected:
        if item is None or str(item) == "":
            continue
        guarded = Path(os.path.expanduser(os.fspath(item)))
        if not guarded.exists():
            continue  # a Hub id or packaged name, not a path
        guarded = guarded.resolve()
        if guarded == target or target in guarded.parents:
            raise RunDirError(
                f"refusing to replace {shown}: it holds {guarded}, an input of this "
                f"command (the recipe or the model); {fix}"
            )
    markers = tuple(markers)
    if is_empty_dir(path) or any((path / name).is_file() for name in markers):
        return
    names = " or ".join(markers)
    raise RunDirError(
        f"refusing to replace {shown}: it is not empty and not {kind} (no {names}); "
        f"--overwrite only replaces an earlier output of fbnprune. {fix[0].upper()}{fix[1:]}, "
        "or empty or delete the folder yourself"
    )


NAME_MAX = 255  # bytes in one file name on Linux, macOS and Windows file systems


def check_run_dir(
    path: str | Path,
    *,
    overwrite: bool = False,
    protected: Iterable[str | os.PathLike[str] | None] = (),
) -> None:
    """Raise ``RunDirError`` unless ``RunDir.open(path, overwrite=...)`` would accept ``path``;
    changes nothing on disk (run it before taking the lock, which creates the folder)."""
    path = Path(path)
    long = [part for part in path.parts if len(part.encode()) > NAME_MAX]
    if long:
        raise RunDirError(
            f"--out: the name {long[0][:40]}... is {len(long[0].encode())} bytes long, more than "
            f"a file system allows ({NAME_MAX}); choose a shorter --out"
        )
    target = path.resolve()
    for folder in (Path(os.path.expanduser(os.fspath(p))) for p in protected if p):
        if folder.is_dir() and folder.resolve() in (target, *target.parents):
            raise RunDirError(
                f"--out {path} is inside {folder}, an input of this command (the model's "
                "folder): the run would change that folder, and with it the model's "
                "fingerprint, so every stage would run again; choose an --out outside it"
            )
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{path} exists and is not a directory; choose another --out")
    if not path.is_dir():
        return
    if overwrite:
        check_replaceable(path, protected=protected)
    elif not is_empty_dir(path) and not (path / RUN_FILE).is_file():
        raise RunDirError(
            f"{path} exists and is not an fbnprune run directory (no {RUN_FILE}); choose "
            "another --out (--overwrite only replaces an earlier run or an empty folder)"
        )


def _clear(path: Path) -> None:
    """Delete everything in ``path`` but the lock bookkeeping (the lock may be held)."""
    for child in path.iterdir():
        if child.name in BOOKKEEPING:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


@dataclass
class StageRecord:
    key: str
    seconds: float
    peak_rss_mib: float
    finished: str
    details: dict[str, Any] = field(default_factory=dict)
    threads: dict[str, int] = field(default_factory=dict)  # see ``thread_counts``


class RunDir:
    """A run directory and its ``run.json`` ledger."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.executed: list[str] = []  # the stages this process computed, in order

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        overwrite: bool = False,
        protected: Iterable[str | os.PathLike[str] | None] = (),
    ) -> RunDir:
        """Use ``path`` for a run: new, an earlier fbnprune run (resumed), or refused.

        Args:
            path: the output directory.
            overwrite: discard an earlier run (or nothing, in an empty folder) first; any
                other folder is refused (see ``check_replaceable``).
            protected: paths the run reads (the recipe file, a local model); a folder that
                holds one of them is never replaced.
        """
        path = Path(path)
        check_run_dir(path, overwrite=overwrite, protected=protected)
        if path.is_dir() and overwrite:
            _clear(path)
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    # -- one process at a time ---------------------------------------------------------------
    @contextmanager
    def lock(self, command: str | None = None) -> Iterator[RunDir]:
        """Hold this folder's lock (``.lock``) for the block; the folder is created if needed.

        A second process asking for the same folder is refused at once with
        ``RunDirLockedError``, naming the holder (its pid and command, from ``.lock.json``).
        The lock is the operating system's (``filelock``), so it is released when the holder
        exits, however it exits.
        """
        from filelock import FileLock, Timeout

        try:
            self.path.mkdir(parents=True, exist_ok=True)
            lock = FileLock(self.path / LOCK_FILE, timeout=0)
            lock.acquire()
        except Timeout:
            raise RunDirLockedError(
                f"{self.path} is in use by another fbnprune process ({self.holder()}); wait for "
                "it to finish, or choose another --out"
            ) from None
        except OSError as exc:
            raise RunDirError(
                f"cannot lock {self.path}: {exc.strerror or exc}; check that the "
                "folder is writable, or choose another --out"
            ) from exc
        holder = self.path / LOCK_HOLDER
        try:
            atomic_write_json(
                holder,
                {
                    "pid": os.getpid(),
                    "command": command if command is not None else _command_line(),
                    "since": now(),
                },
            )
            yield self
        finally:
            try:
                if json.loads(holder.read_text()).get("pid") == os.getpid():
                    holder.unlink()
            except (OSError, ValueError, AttributeError):
                pass  # gone with the folder (replaced by an atomic output) or unreadable
            lock.release()

    def holder(self) -> str:
        """Who holds the lock, as written in ``.lock.json``: ``pid N: COMMAND, since T``."""
        try:
            data = json.loads((self.path / LOCK_HOLDER).read_text())
            return f"pid {data['pid']}: {data['command']}, since {data['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    # -- ledger ----------------------------------------------------------------------------
    def ledger(self) -> dict[str, Any]:
        file = self.path / RUN_FILE
        return json.loads(file.read_text()) if file.is_file() else {"stages": {}}

    def record(self, stage: str) -> StageRecord | None:
        data = self.ledger()["stages"].get(stage)
        return StageRecord(**data) if data else None

    def is_fresh(self, stage: str, key: str, outputs: list[Path]) -> bool:
        rec = self.record(stage)
        return rec is not None and rec.key == key and all(p.exists() for p in outputs)

    def mark_done(self, stage: str, rec: StageRecord) -> None:
        data = self.ledger()
        data["stages"][stage] = rec.__dict__
        atomic_write_json(self.path / RUN_FILE, data)

    def forget(self, stage: str) -> None:
        data = self.ledger()
        data["stages"].pop(stage, None)
        atomic_write_json(self.path / RUN_FILE, data)

    def stage(
        self,
        name: str,
        key: str,
        outputs: list[Path],
        compute: Callable[[], dict[str, Any] | None],
    ) -> StageRecord | None:
        """Reuse a fresh stage's outputs, or ``compute`` them (it returns the ledger's
        details) and record time and memory."""
        if self.is_fresh(name, key, outputs):
            logger.info("%s: up to date, reusing %s", name, outputs[0].relative_to(self.path))
            return None
        logger.info("%s: running", name)
        try:
            with measure() as m:
                details = compute() or {}
        except BaseException:
            # staged checkpoints only live between check and save in one process: a failed
            # or interrupted stage (a full disk, Ctrl-C) leaves none of its tens of MB behind
            shutil.rmtree(RunLayout(self.path).staging_root, ignore_errors=True)
            raise
        seconds, peak = round(m["seconds"], 2), round(m["peak_rss_mib"], 1)
        rec = StageRecord(key, seconds, peak, now(), details, thread_counts())
        self.mark_done(name, rec)
        self.executed.append(name)
        logger.info("%s: done in %.1f s (peak RSS %.0f MiB)", name, rec.seconds, rec.peak_rss_mib)
        return rec

    def write_meta(self, **meta: Any) -> None:
        data = self.ledger()
        data.update(meta)
        atomic_write_json(self.path / RUN_FILE, data)


@contextmanager
def measure(interval: float = 0.05) -> Iterator[dict[str, float]]:
    """Wall time and peak resident memory (MiB) of the enclosed block, sampled in a thread.
    What earlier work freed is given back to the system first, so the peak is the block's."""
    gc.collect()
    return_freed_memory()
    proc = psutil.Process()
    result = {"seconds": 0.0, "peak_rss_mib": proc.memory_info().rss / 2**20}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval):
            result["peak_rss_mib"] = max(result["peak_rss_mib"], proc.memory_info().rss / 2**20)

    thread = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["seconds"] = time.perf_counter() - start
        result["peak_rss_mib"] = max(result["peak_rss_mib"], proc.memory_info().rss / 2**20)


def return_freed_memory() -> None:
    """Give the C allocator's free pages back to the system (glibc's ``malloc_trim``; a no-op
    elsewhere): freed tensors otherwise stay in the process's resident memory."""
    with contextlib.suppress(AttributeError, OSError):  # not glibc
        ctypes.CDLL(None).malloc_trim(0)


def versions() -> dict[str, str]:
    """The versions of fbnprune and the libraries its results depend on."""
    import numpy as np
    import sklearn
    import torch
    import transformers

    from fbnprune.version import __version__

    return {
        "fbnprune": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "scikit-learn": sklearn.__version__,
        "numpy": np.__version__,
    }


def thread_counts() -> dict[str, int]:
    """torch's and each BLAS library's thread count. FastICA and the least-squares refit
    follow the BLAS summation order, so their last digits (and ICA's iteration path) move
    with it: a run reproduces bit for bit at the thread counts its stages recorded."""
    import numpy  # noqa: F401  (loads the BLAS that threadpoolctl reports)
    import torch
    from threadpoolctl import threadpool_info

    counts = {"torch": torch.get_num_threads()}
    for pool in threadpool_info():
        counts[f"{pool['internal_api']}:{Path(pool['filepath']).name}"] = pool["num_threads"]
    return counts


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _command_line() -> str:
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("__main__.py", "fbnprune"):
        argv[0] = "fbnprune"
    return shlex.join(argv)
