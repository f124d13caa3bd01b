"""The benchmark's report: ``results.json``, ``results.md`` and one PNG per task.

Rows of the same selector, condition and budget (the random selector's seeds) are summarised
by their mean and standard deviation. The Markdown has one table per task (rows: selector x
condition, columns: kept fraction; the original as reference) and the cost table; each plot
has one panel per condition (zeroed, mean, healed, output site) with the task metric against
the kept fraction, one line per selector, the original as a dashed line and perplexities on
a log axis.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fbnprune.io import atomic_write_json, atomic_write_text, save_figure
from fbnprune.rundir.layout import BENCH_ROWS, RESULTS_FILE, RESULTS_TABLE

CONDITIONS = {
    "zeroed": "hidden units, dropped = 0",
    "mean": "hidden units, dropped = calibration mean",
    "reconstruct": "hidden units, down projection refit (least squares)",
    "healed": "hidden units, healed (KD; the recipe's fill)",
    "output": "output channels (paper's site), masked, 0",
}
SELECTOR_ORDER = ("ica", "magnitude", "wanda", "random")


def summarise(rows: list[dict[str, Any]], task: str, metric: str) -> dict[tuple, dict]:
    """(condition, selector, budget) -> {mean, std, n, kept_fraction} of a task's metric."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["key"] != "original":
            groups[(row["condition"], row["selector"], row["budget"])].append(row)
    out = {}
    for key, members in groups.items():
        values = [
            m["scores"][task][metric]
            for m in members
            if m["scores"].get(task, {}).get(metric) is not None
        ]
        if not values:
            continue
        out[key] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values),
            "kept_fraction": statistics.fmean(m["kept_fraction"] for m in members),
        }
    return out


def _fmt(value: float, metric: str) -> str:
    if "perplexity" in metric or abs(value) >= 1000:
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.2e}"
    return f"{value:.3f}"


def _cell(stats: Mapping[str, Any] | None, metric: str) -> str:
    if stats is None:
        return ""
    text = _fmt(stats["mean"], metric)
    if stats["std"] is not None:
        text += f" ± {_fmt(stats['std'], metric)}"
    return text


def _selectors(summary: Mapping[tuple, Any]) -> list[str]:
    present = {s for _, s, _ in summary}
    return [s for s in SELECTOR_ORDER if s in present] + sorted(present - set(SELECTOR_ORDER))


def _method(settings: Mapping[str, Any]) -> str:
    """The discovery and refit settings that change what a variant is, where they are not
    the defaults (results written before they were recorded have neither)."""
    discover, prune = settings.get("discover", {}), settings.get("prune", {})
    notes = []
    if discover.get("standardize"):
        notes.append("ICA on standardised activations (`discover.standardize`)")
    if discover.get("scope", "group") != "group":
        notes.append(f"one ICA per layer (`discover.scope: {discover['scope']}`)")
    if prune.get("sequential"):
        notes.append("refit on the pruned layers' inputs (`prune.sequential`)")
    return "".join(f" {note};" for note in notes)


def results_markdown(results: Mapping[str, Any], figures: Mapping[str, str]) -> str:
    rows = results["rows"]
    original = next(r for r in rows if r["key"] == "original")
    settings = results["settings"]
    present = [c for c in CONDITIONS if any(r.get("condition") == c for r in rows)]
    lines = [
        f"# Benchmark: {results['model']} ({results['recipe']})",
        "",
        f"Selectors {', '.join(settings['selectors'])}"
        + (
            f" (random: seeds {', '.join(map(str, settings['random_seeds']))}, mean ± std)"
            if "random" in settings["selectors"]
            else ""
        )
        + " x budgets "
        f"{', '.join(f'{b:.0%}' for b in settings['budgets'])} of MLP units x "
        f"conditions {', '.join(present)}."
        f" Allocation `{settings['allocation']}` (floor {settings['min_per_layer']:.0%} per "
        f"layer, at most half the budget);{_method(settings)} hidden-site variants sliced "
        f"({settings['layout']} layout), output-site variants masked. Healing: "
        f"{settings['heal']['method']} on "
        f"{settings['heal']['modules']}, {settings['heal']['steps']} steps of KD on the "
        "task's prompts of the calibration and healing documents"
        + (
            f", {settings['heal_seeds']} runs per selector (heal.seed + i; mean ± std)"
            if settings.get("heal_seeds", 1) > 1
            else ""
        )
        + ". Every model scored by "
        "lm-eval on the same documents (outside every split the run uses): "
        + ", ".join(f"{t} ({i['metric']}, {i['n_docs']} docs)" for t, i in results["tasks"].items())
        + ".",
        "",
    ]
    for task, info in results["tasks"].items():
        metric = info["metric"]
        summary = summarise(rows, task, metric)
        budgets = sorted({b for _, _, b in summary})
        ref = original["scores"][task][metric]
        arrow = "higher" if info["higher_is_better"] else "lower"
        lines += [f"## {task}: {metric} ({arrow} is better; original {_fmt(ref, metric)})", ""]
        if task in figures:
            lines += [f"![{task}]({figures[task]})", ""]
        lines.append("| selector | condition | " + " | ".join(f"{b:.0%}" for b in budgets) + " |")
        lines.append("|---|---|" + "---:|" * len(budgets))
        for condition in CONDITIONS:
            for selector in _selectors(summary):
                cells = [_cell(summary.get((condition, selector, b)), metric) for b in budgets]
                if any(cells):
                    lines.append(f"| {selector} | {condition} | " + " | ".join(cells) + " |")
        lines.append("")
    heal_rows = [r for r in rows if r.get("heal")]
    if heal_rows:
        lines += [
            "## Healing",
            "",
            "| variant | steps | seconds | KD loss first -> last |",
            "|---|---:|---:|---|",
        ]
        for row in heal_rows:
            h = row["heal"]
            lines.append(
                f"| {row['key']} | {h['steps']} | {h['seconds']:.0f} | "
                f"{h['train_loss'][0]:.4g} -> {h['train_loss'][-1]:.4g} |"
            )
        if "healing" in figures:
            lines += ["", f"![healing loss]({figures['healing']})"]
        lines.append("")
    cost = results.get("cost")
    if cost:
        lines += [
            f"## Cost (slices of the `{cost['selector']}` plans, CPU, measured "
            "interleaved in one process)",
            "",
            cost["markdown"].strip(),
            "",
        ]
    lines += [
        f"Grid time: {settings['grid_seconds'] / 60:.1f} min. Rows: `{BENCH_ROWS}`; "
        f"everything: `{RESULTS_FILE}`.",
        "",
    ]
    return "\n".join(lines)


def plot_task(results: Mapping[str, Any], task: str, file: Path) -> Path:
    """Task metric vs kept fraction: one panel per condition, one line per selector."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    info = results["tasks"][task]
    metric = info["metric"]
    summary = summarise(results["rows"], task, metric)
    original = next(r for r in results["rows"] if r["key"] == "original")
    reference = original["scores"][task][metric]
    conditions = [c for c in CONDITIONS if any(k[0] == c for k in summary)]
    fig, axes = plt.subplots(
        1,
        len(conditions),
        figsize=(4.2 * len(conditions), 3.8),
        sharex=True,
        sharey=True,
        squeeze=False,
    )
    log = "perplexity" in metric
    colors = dict(zip(SELECTOR_ORDER, ("C0", "C1", "C2", "C7"), strict=True))
    for ax, condition in zip(axes[0], conditions, strict=True):
        for selector in _selectors(summary):
            points = sorted(
                (s["kept_fraction"], s["mean"], s["std"] or 0.0)
                for (c, sel, _), s in summary.items()
                if c == condition and sel == selector
            )
            if not points:
                continue
            x, y, err = (list(v) for v in zip(*points, strict=True))
            x = [100 * v for v in x]
            # one colour per selector; another allocation than the recipe's ("ica
            # (sensitivity)") is the same colour, dashed
            base, _, other = selector.partition(" (")
            color = colors.get(base)
            ax.plot(x, y, "o--" if other else "o-", label=selector, color=color)
            if any(err):  # the spread over seeds: a bar at each point, a band between them
                ax.errorbar(x, y, yerr=err, fmt="none", color=color, capsize=3)
                ax.fill_between(
                    x,
                    [a - b for a, b in zip(y, err, strict=True)],
                    [a + b for a, b in zip(y, err, strict=True)],
                    color=color,
                    alpha=0.2,
                )
        ax.axhline(reference, color="black", ls="--", lw=1, label="original")
        ax.set_title(CONDITIONS[condition], fontsize=9)
        ax.set_xlabel("MLP units kept (%)")
        ax.grid(alpha=0.3)
        if log:
            ax.set_yscale("log")
        elif metric.startswith("acc"):
            ax.set_ylim(0, 1)
    axes[0][0].set_ylabel(f"{task}: {metric}")
    handles: dict[str, Any] = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    columns = min(len(handles), 2 * len(conditions))  # as many as the width holds
    rows = math.ceil(len(handles) / columns)
    fig.legend(
        handles.values(),
        handles.keys(),
        loc="lower center",
        fontsize=8,
        ncol=columns,
        frameon=False,
    )
    fig.suptitle(f"{results['model']}: {task}", fontsize=10, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0.06 * rows, 1, 0.93))
    return save_figure(fig, file)


def plot_healing(results: Mapping[str, Any], file: Path) -> Path | None:
    from fbnprune.heal.train import HealLog, plot_loss

    logs = {
        row["key"].split("/", 1)[1]: HealLog(
            "", 0, train_loss=row["heal"]["train_loss"], validation=row["heal"]["validation"]
        )
        for row in results["rows"]
        if row.get("heal")
    }
    if not logs:
        return None
    return plot_loss(logs, file, title=f"{results['model']}: healing (KD) in the benchmark")


def write_report(results: dict[str, Any], directory: Path) -> dict[str, Path]:
    """Write ``results.json``, one ``<task>.png`` per task, ``healing.png`` and
    ``results.md`` into ``directory``; return their paths."""
    directory = Path(directory)
    files: dict[str, Path] = {}
    for task in results["tasks"]:
        files[task] = plot_task(results, task, directory / f"{task}.png")
    healing = plot_healing(results, directory / "healing.png")
    if healing is not None:
        files["healing"] = healing
    figures = {name: path.name for name, path in files.items()}
    results["figures"] = figures
    files["json"], files["markdown"] = directory / RESULTS_FILE, directory / RESULTS_TABLE
    atomic_write_json(files["json"], _finite(results))
    atomic_write_text(files["markdown"], results_markdown(results, figures))
    return files


def _finite(value: Any) -> Any:
    """NaN and infinities become None (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
