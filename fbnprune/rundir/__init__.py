"""The run directory: its file layout (``layout``) and its ledger, locks and guards (``runner``)."""

from fbnprune.hashing import digest, fingerprint
from fbnprune.rundir.layout import RUN_FILE, RunLayout
from fbnprune.rundir.runner import (
    BOOKKEEPING,
    LOCK_FILE,
    LOCK_HOLDER,
    RunDir,
    RunDirError,
    RunDirLockedError,
    StageRecord,
    check_replaceable,
    check_run_dir,
    is_empty_dir,
    measure,
    now,
)

__all__ = [
    "BOOKKEEPING",
    "LOCK_FILE",
    "LOCK_HOLDER",
    "RUN_FILE",
    "RunDir",
    "RunDirError",
    "RunDirLockedError",
    "RunLayout",
    "StageRecord",
    "check_replaceable",
    "check_run_dir",
    "digest",
    "fingerprint",
    "is_empty_dir",
    "measure",
    "now",
]
