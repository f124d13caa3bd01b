"""The run directory: one folder that holds a run's recipe, stage outputs and bookkeeping.

``run.json`` records, per stage, the fingerprint of its inputs, its wall time and peak
memory. A stage whose recorded fingerprint equals the current one, and whose outputs exist,
is reused; anything else is recomputed. Stage outputs are written atomically, so an
interrupted stage leaves no partial file and simply runs again next time.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from fbnprune.io import atomic_write_json

RUN_FILE = "run.json"


class RunDirError(ValueError):
    """An output directory that cannot be used for this run."""


@dataclass
class StageRecord:
    key: str
    seconds: float
    peak_rss_mib: float
    finished: str
    details: dict[str, Any] = field(default_factory=dict)


class RunDir:
    """A run directory and its ``run.json`` ledger."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def open(cls, path: Path, *, overwrite: bool = False) -> RunDir:
        """Use ``path`` for a run: new, an earlier fbnprune run (resumed), or refused.

        Args:
            path: the output directory.
            overwrite: discard whatever is there first.
        """
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise RunDirError(f"{path} exists and is not a directory")
        if path.exists() and overwrite:
            shutil.rmtree(path)
        elif path.exists() and any(path.iterdir()) and not (path / RUN_FILE).is_file():
            raise RunDirError(
                f"{path} exists and is not an fbnprune run directory; choose another --out "
                "or pass --overwrite to replace it"
            )
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

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

    def write_meta(self, **meta: Any) -> None:
        data = self.ledger()
        data.update(meta)
        atomic_write_json(self.path / RUN_FILE, data)


@contextmanager
def measure(interval: float = 0.05) -> Iterator[dict[str, float]]:
    """Wall time and peak resident memory (MiB) of the enclosed block, sampled in a thread."""
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


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
