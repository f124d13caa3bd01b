"""What each stage of a run had to hold in memory, against the peak it reached.

A stage's peak is the process's resident memory (RSS), sampled every 50 ms while the stage
ran (``runner.measure``), as ``run.json`` records it. What the stage must hold comes from
the run's own files: the model (the original's bytes, ``prune.json``), each task's
activation matrix (tokens x units in float32, ``collect/<task>/meta.json``) and the
teacher's healing targets (``heal/teacher.safetensors``). The ratio of the two says how far
a stage is from holding only what it needs; the process's floor (Python, torch and the
libraries, about 0.5 GiB) is part of every peak.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fbnprune.rundir.layout import RunLayout

# per stage, what it must hold: (what, how many of it)
HOLDS: dict[str, tuple[tuple[str, int], ...]] = {
    "collect": (("model", 1), ("matrix", 1)),
    "discover": (("matrix", 1),),
    "select": (("matrix", 1),),  # the scores and the refit read the matrix
    "prune": (("model", 1),),  # plus the slices, a fraction of it
    "check": (("model", 1),),
    "save": (("model", 1),),
    # the teacher (its targets), then the student with its gradients and optimizer state
    "heal": (("model", 1), ("targets", 1)),
    "verdict": (("model", 1),),
}

MiB = 2**20


def memory_report(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Per stage of ``run.json``: its peak (MiB), what it must hold (MiB, by part and in
    all) and the ratio peak / holds (None where the run lacks the file that says)."""
    layout = RunLayout(run_dir)
    ledger = json.loads(layout.run_file.read_text()) if layout.run_file.is_file() else {}
    sizes = _sizes(layout)
    out: dict[str, dict[str, Any]] = {}
    for name, record in ledger.get("stages", {}).items():
        stage, _, task = name.partition(":")
        parts = {}
        for what, count in HOLDS.get(stage, ()):
            size = _size(sizes, what, task)
            parts[what] = None if size is None else count * size / MiB
        known = [v for v in parts.values() if v is not None]
        holds = sum(known) if known and len(known) == len(parts) else None
        peak = record["peak_rss_mib"]
        out[name] = {
            "peak_mib": peak,
            "holds_mib": holds,
            "parts_mib": parts,
            "ratio": None if not holds else peak / holds,
        }
    return out


def _size(sizes: dict[str, Any], what: str, task: str) -> int | None:
    """Bytes of ``what``; a matrix is the task's, or every task's for a stage of them all."""
    if what != "matrix":
        return sizes[what]
    matrices = sizes["matrix"]
    return matrices.get(task) if task else sum(matrices.values()) or None


def _sizes(layout: RunLayout) -> dict[str, Any]:
    """Bytes of the model, of each task's float32 matrix and of the healing targets."""
    sizes: dict[str, Any] = {"model": None, "targets": None, "matrix": {}}
    if layout.prune_file.is_file():
        original = json.loads(layout.prune_file.read_text()).get("sizes", {}).get("original")
        sizes["model"] = (original or {}).get("bytes")
    if layout.heal_targets_file.is_file():
        sizes["targets"] = layout.heal_targets_file.stat().st_size
    collect = layout.root / "collect"
    for meta in sorted(collect.glob("*/meta.json")) if collect.is_dir() else ():
        data = json.loads(meta.read_text())
        if "n_tokens" in data and "layer_widths" in data:
            sizes["matrix"][meta.parent.name] = data["n_tokens"] * sum(data["layer_widths"]) * 4
    return sizes


def memory_table(report: dict[str, dict[str, Any]]) -> str:
    """The report as Markdown: a row per stage."""

    def mib(value: float | None) -> str:
        return "n/a" if value is None else f"{value:,.0f}"

    lines = [
        "| stage | peak RSS (MiB) | must hold (MiB) | of which | peak / holds |",
        "|---|---|---|---|---|",
    ]
    for name, row in report.items():
        parts = ", ".join(f"{k} {mib(v)}" for k, v in row["parts_mib"].items()) or "-"
        ratio = "n/a" if row["ratio"] is None else f"{row['ratio']:.1f}x"
        lines.append(
            f"| {name} | {mib(row['peak_mib'])} | {mib(row['holds_mib'])} | {parts} | {ratio} |"
        )
    return "\n".join(lines) + "\n"
