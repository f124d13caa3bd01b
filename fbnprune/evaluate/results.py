"""Evaluation results: one JSON document and one Markdown table per run.

``RUN_DIR/eval/results.json``::

    {
      "tasks": {
        "bbc_topics": {
          "metric": "acc", "higher_is_better": true, "n_docs": 100,
          "models": {"original": 0.61, "masked": 0.42, "sliced-padded": 0.42, ...,
                     "pruned": 0.42},
          "stderr": {"original": 0.049, ...},
          "other_metrics": {"acc_norm": {"original": 0.2, ...}}
        },
        ...
      },
      "pruned": "sliced-padded",          # the variant that "pruned" stands for
      "models": {"original": {...}, ...},  # how each variant was obtained, parameters
      "settings": {...}, "versions": {...}
    }

``models.pruned`` repeats the preferred pruned variant (``PRUNED_PREFERENCE``), so a model
card can read ``tasks[*].metric``, ``models.original`` and ``models.pruned`` alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fbnprune.evaluate.harness import Scores, TaskInfo
from fbnprune.io import atomic_write_json, atomic_write_text
from fbnprune.rundir.layout import (
    HEALED_SUFFIX,
    LAYOUTS,
    RESULTS_FILE,
    RESULTS_TABLE,
    checkpoint_name,
)

RESULTS_VERSION = 1
PRUNED_PREFERENCE = (
    *(f"sliced-{layout}" for layout in LAYOUTS),
    *(checkpoint_name(layout) for layout in LAYOUTS),
    "masked",
)


def preferred_pruned(names: list[str] | Mapping[str, Any]) -> str | None:
    """The variant a model card reports as "pruned": sliced-padded, else sliced-compact,
    else a saved checkpoint, else masked; None when only the original was scored."""
    return next((n for n in PRUNED_PREFERENCE if n in names), None)


def build_results(
    scores: Mapping[str, Scores],
    tasks: Mapping[str, TaskInfo],
    *,
    models: Mapping[str, dict[str, Any]] | None = None,
    settings: Mapping[str, Any] | None = None,
    versions: Mapping[str, str] | None = None,
    spreads: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Arrange ``{model: {task: {metric: value}}}`` by task, primary metric first;
    ``spreads`` (model -> task -> majority rate and predicted answers per rule) go under
    ``answers`` by task."""
    names = list(scores)
    pruned = preferred_pruned(names)
    out_tasks: dict[str, Any] = {}
    for task, info in tasks.items():
        values = {m: _clean(scores[m][task].get(info.metric)) for m in names}
        stderr = {m: _clean(scores[m][task].get(f"{info.metric}_stderr")) for m in names}
        if pruned is not None:
            values["pruned"], stderr["pruned"] = values[pruned], stderr[pruned]
        others = {
            metric: {m: _clean(scores[m][task].get(metric)) for m in names}
            for metric in info.metrics
            if metric != info.metric
        }
        out_tasks[task] = {
            "metric": info.metric,
            "higher_is_better": info.higher_is_better,
            "n_docs": info.n_docs,
            "models": values,
            "stderr": stderr,
            "other_metrics": others,
        }
    answers: dict[str, dict[str, Any]] = {}
    for model, per_task in (spreads or {}).items():
        for task, spread in per_task.items():
            answers.setdefault(task, {})[model] = spread
    return {
        "format_version": RESULTS_VERSION,
        "tasks": out_tasks,
        "answers": answers,
        "pruned": pruned,
        "models": dict(models or {}),
        "settings": dict(settings or {}),
        "versions": dict(versions or {}),
    }


def results_markdown(results: Mapping[str, Any]) -> str:
    """A table: one row per task, one column per model (primary metric +- stderr)."""
    tasks = results["tasks"]
    if not tasks:
        return "_no tasks_\n"
    models = [m for m in next(iter(tasks.values()))["models"] if m != "pruned"]
    header = ["task", "metric", *models]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, task in tasks.items():
        arrow = "↑" if task["higher_is_better"] else "↓"
        cells = [name, f"{task['metric']} {arrow}"]
        for m in models:
            cell = format_value(task["models"][m])
            err = task["stderr"].get(m)
            if err is not None and task["models"][m] is not None:
                cell += f" ± {format_value(err)}"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    counts = ", ".join(f"{n} {t['n_docs']}" for n, t in tasks.items())
    limit = results.get("settings", {}).get("limit")
    notes = ["", f"Documents per task: {counts}" + (f" (limit {limit})." if limit else ".")]
    if results.get("pruned"):
        healed = [m for m in models if m.endswith(HEALED_SUFFIX)]
        notes.append(
            f'The model card\'s "pruned" numbers are those of `{results["pruned"]}`'
            + (f" (`{healed[0]}` in the card of an `export --healed`)." if healed else ".")
        )
    notes.append(
        "The suite's own multiple-choice tasks report lm-eval's `acc` (argmax of the summed "
        "log-likelihood); `acc_norm` divides by the label's length in characters, which "
        f"favours the longest label for one-word labels and is kept in {RESULTS_FILE} only."
    )
    scoring = results.get("settings", {}).get("scoring")
    answers = results.get("answers") or {}
    if answers:
        notes.append(
            f"The recipe's own tasks report `acc_{scoring}`: fbnprune's `{scoring}` answer "
            "scoring, the same for every model (`fbnprune.evaluate.answers`); lm-eval's `acc` "
            f"and the other rules are in {RESULTS_FILE}. Their answers:"
        )
        notes += ["", _answers_markdown(answers, scoring)]
    return "\n".join(lines + notes) + "\n"


def _answers_markdown(answers: Mapping[str, Any], scoring: str | None) -> str:
    """Per task and model: the majority rate and the spread of the answers, under the
    recipe's scoring and as shipped (``sum``)."""
    rules = list(dict.fromkeys([r for r in (scoring, "sum") if r]))
    lines = ["| task | model | majority | " + " | ".join(f"answers ({r})" for r in rules) + " |"]
    lines.append("|" + "---|" * (3 + len(rules)))
    for task, per_model in answers.items():
        for model, spread in per_model.items():
            cells = [" ".join(f"{k}:{v}" for k, v in spread["predicted"][r].items()) for r in rules]
            lines.append(
                f"| {task} | {model} | {spread['majority_rate']:.3f} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


def write_results(results: Mapping[str, Any], directory: str | Path) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` into ``directory`` (atomically)."""
    directory = Path(directory)
    json_file = directory / RESULTS_FILE
    md_file = directory / RESULTS_TABLE
    atomic_write_json(json_file, results)
    atomic_write_text(md_file, results_markdown(results))
    return json_file, md_file


def format_value(value: float | None) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 1e4:
        return f"{value:.3g}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.3f}"


def _clean(value: float | None) -> float | None:
    """JSON has no NaN or infinity: those become None."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)
