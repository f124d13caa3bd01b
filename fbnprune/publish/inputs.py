"""What an export reads from a run: the checkpoint, its verified parity, the recipe; the
guard on the output folder and the fingerprint that decides reuse."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from fbnprune.integrity import digest_mismatches
from fbnprune.parity import ParityResult
from fbnprune.publish.errors import ExportError
from fbnprune.rundir.layout import (
    CHECKPOINT_PREFIX,
    COLLECT_DIR,
    DISCOVER_DIR,
    EVAL_DIR,
    LAYOUTS,
    STAGING,
    RunLayout,
    checkpoint_name,
)
from fbnprune.version import __version__

logger = logging.getLogger(__name__)

RUN_ENTRIES = (COLLECT_DIR, DISCOVER_DIR, EVAL_DIR, STAGING)  # never exported into


def source_checkpoint(run_dir: Path, layout: str | None, healed: bool = False) -> tuple[str, Path]:
    if layout is not None and layout not in LAYOUTS:
        raise ExportError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    run = RunLayout(run_dir)
    if healed:
        done = [name for name in LAYOUTS if run.checkpoint_dir(name, healed=True).is_dir()]
        if layout is None and done:
            layout = done[0]
            logger.info(
                "export: the healed model is %s/ (healing trains one layout: compact when "
                "the recipe lists it; --layout chooses among the healed ones)",
                checkpoint_name(layout, healed=True),
            )
        if layout not in done:
            missing = checkpoint_name(layout or "<layout>", healed=True)
            raise ExportError(
                f"{run_dir} has no {missing}/; run "
                "the heal stage (`fbnprune heal RECIPE --out RUN_DIR`, with "
                "heal.enabled: true if the budget is above heal.below_budget)"
            )
        return layout, run.checkpoint_dir(layout, healed=True)
    available = [name for name in LAYOUTS if run.checkpoint_dir(name).is_dir()]
    if not available:
        names = " or ".join(f"{checkpoint_name(name)}/" for name in LAYOUTS)
        raise ExportError(
            f"{run_dir} has no {names}; run the "
            "save stage first (`fbnprune run RECIPE --out RUN_DIR`)"
        )
    if layout is None:
        layout = available[0]
    elif layout not in available:
        raise ExportError(
            f"{run_dir} has no {checkpoint_name(layout)}/ (it has: "
            f"{', '.join(available)}); add {layout!r} to the recipe's "
            "save.layouts and re-run"
        )
    return layout, run.checkpoint_dir(layout)


def check_out_dir(out: Path, run_dir: Path) -> None:
    """Refuse output folders whose replacement would destroy the run or its stages."""
    out_r, run_r = out.resolve(), run_dir.resolve()
    if out_r == run_r or out_r in run_r.parents:
        raise ExportError(
            f"--out {out} would replace the run directory itself; choose a folder "
            "outside it or inside it under a new name"
        )
    if run_r in out_r.parents:
        top = out_r.relative_to(run_r).parts[0]
        if top.startswith(CHECKPOINT_PREFIX) or top in RUN_ENTRIES or (run_r / top).is_file():
            raise ExportError(
                f"--out {out} lies inside the run's own {top!r}; choose another folder"
            )


def verified_parity(run_dir: Path, source: Path, *, healed: bool) -> dict:
    """The run's parity report, once its figures prove parity at the recipe's tolerance and
    ``source`` holds exactly the bytes that were checked; else ``ExportError`` saying why."""
    atol = _recipe_atol(run_dir)
    fix = f"re-run `fbnprune run RECIPE --out {run_dir}`: it checks and saves the checkpoints again"
    run = RunLayout(run_dir)
    reports = [(run.relative(run.parity_file), run.parity_file)]
    if healed:
        reports.append((run.relative(run.heal_parity_file), run.heal_parity_file))
    results = {}
    for name, path in reports:
        if not path.is_file():
            raise ExportError(f"{run_dir} has no {name}: the checkpoint was never checked; {fix}")
        try:
            results[name] = ParityResult.parse(json.loads(path.read_text()))
        except ValueError as exc:  # JSONDecodeError is a ValueError
            raise ExportError(
                f"{path} is unreadable ({exc}); refusing to export what cannot be "
                f"shown to be checked; {fix}"
            ) from None
        problems = results[name].problems(atol)
        if problems:
            raise ExportError(
                f"{path}: the figures do not show parity at atol {atol:g} "
                f"({'; '.join(problems)}); refusing to export:\n"
                f"{results[name].table()}"
            )
    checked = results[reports[-1][0]].files.get(source.name)
    if not checked:
        raise ExportError(
            f"{reports[-1][1]} records no file digests of {source.name}/, so "
            f"nothing shows that its files are the checked ones; {fix}"
        )
    changed = digest_mismatches(source, checked)
    if changed:
        raise ExportError(
            f"{source} is not the checkpoint that was checked: {'; '.join(changed)}; {fix}"
        )
    return results[reports[0][0]].to_dict()


def _recipe_atol(run_dir: Path) -> float:
    """The run recipe's ``check.atol`` (the default when the recipe is unreadable)."""
    from fbnprune.recipe import CheckConfig

    recipe_file = RunLayout(run_dir).recipe_file
    check = read_yaml(recipe_file.read_text() if recipe_file.is_file() else "").get("check")
    try:
        return CheckConfig(**check).atol if isinstance(check, dict) else CheckConfig().atol
    except ValueError:
        return CheckConfig().atol


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_yaml(text: str) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(text) if text else {}
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def export_fingerprint(run_dir: Path, source: Path, options: dict[str, Any]) -> str:
    """Hash of the options and the inputs an export reads (weights by size and mtime)."""
    digest = hashlib.sha256(json.dumps([__version__, options], sort_keys=True).encode())
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(source)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    run = RunLayout(run_dir)
    for path in (
        run.plan_file,
        run.parity_file,
        run.heal_parity_file,
        run.prune_file,
        run.recipe_file,
        run.eval_results_file,
        run.verdict_file,
    ):
        name = run.relative(path)
        digest.update(name.encode() + (path.read_bytes() if path.is_file() else b"<absent>"))
    return digest.hexdigest()[:16]


def checked_verdict(run_dir: Path, *, healed: bool, force: bool) -> dict[str, Any] | None:
    """The run's verdict (None when it has none); a model the verdict flagged (a constant
    answerer, or below the majority label's rate) is refused unless ``force``."""
    verdict = RunLayout(run_dir).read_verdict()
    if verdict is None:
        return None
    model = "healed" if healed else "unhealed"
    flags = verdict.get("flags_by_model", {}).get(model, [])
    if flags and not force:
        listed = "\n  ".join(flags)
        raise ExportError(
            f"the verdict flagged the {model} model of {run_dir}:\n  {listed}\nIts answers "
            "are not the task's; see verdict/verdict.md. Pass --force to export it anyway."
        )
    return verdict
