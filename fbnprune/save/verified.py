"""A run's checkpoint, loaded only as the run checked it.

Before ``evaluate`` or the verdict loads a ``checkpoint-*/`` folder, its files must be the bytes
whose digests the check (or heal) stage recorded, nothing added, and the only code it may
bring is fbnprune's own modeling file, byte for byte as fbnprune writes it, named by the
compact layout's own ``auto_map``. So a folder dropped into a run directory, or a checkpoint
edited after its check, is refused before any of its code can run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import transformers

from fbnprune.errors import FbnpruneError
from fbnprune.integrity import digest_mismatches
from fbnprune.parity import ParityResult
from fbnprune.rundir.layout import RunLayout
from fbnprune.save.checkpoint import (
    COMPACT_AUTO_MAP,
    COMPACT_CLASS,
    MODELING_FILE,
    modeling_source,
)


class UnverifiedCheckpointError(FbnpruneError, ValueError):
    """A checkpoint folder that is not, byte for byte, what the run checked."""


def verify_checkpoint(run_dir: Path, folder: Path) -> bool:
    """Refuse ``folder`` unless it holds exactly the files the run's check (``-healed``:
    heal) recorded, and its code is fbnprune's own; return whether loading it needs
    ``trust_remote_code`` (the compact layout's verified modeling file)."""
    layout = RunLayout(run_dir)
    healed = folder.name.endswith("-healed")
    parity_file = layout.heal_parity_file if healed else layout.parity_file
    where = layout.relative(parity_file)
    fix = f"re-run `fbnprune run RECIPE --out {run_dir}` to check and save it again"
    try:
        result = ParityResult.parse(json.loads(parity_file.read_text()))
    except FileNotFoundError:
        raise UnverifiedCheckpointError(
            f"{folder}: {where} is missing, so nothing shows the checkpoint was checked; {fix}"
        ) from None
    except ValueError as exc:
        raise UnverifiedCheckpointError(f"{parity_file} is unreadable ({exc}); {fix}") from None
    recorded = result.files.get(folder.name)
    if not recorded:
        raise UnverifiedCheckpointError(
            f"{folder} is not a checkpoint this run checked ({where} records no digests of "
            f"{folder.name}/); fbnprune loads only the checkpoints it wrote and checked"
        )
    changed = digest_mismatches(folder, recorded)
    if changed:
        raise UnverifiedCheckpointError(
            f"{folder} is not the checkpoint that was checked: {'; '.join(changed)}; {fix}"
        )
    return own_code(folder)


def own_code(folder: Path) -> bool:
    """Whether ``folder`` ships fbnprune's modeling file (verified byte for byte against the
    template for its stock base class); ``UnverifiedCheckpointError`` for any other code."""
    config = json.loads((folder / "config.json").read_text())
    auto_map = config.get("auto_map")
    code = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.py"))
    if auto_map is None and not code:
        return False
    if auto_map != COMPACT_AUTO_MAP or code != [MODELING_FILE]:
        raise UnverifiedCheckpointError(
            f"{folder} brings code fbnprune did not write (auto_map {auto_map}, Python files "
            f"{code or 'none'}); refusing to load it with trust_remote_code"
        )
    text = (folder / MODELING_FILE).read_text()
    base = re.search(rf"^class {COMPACT_CLASS}\((\w+)\):", text, flags=re.MULTILINE)
    stock = getattr(transformers, base.group(1), None) if base else None
    if not isinstance(stock, type) or text != modeling_source(stock):
        raise UnverifiedCheckpointError(
            f"{folder / MODELING_FILE} is not the modeling file fbnprune writes; refusing to run it"
        )
    return True
