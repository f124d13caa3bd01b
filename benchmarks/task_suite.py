"""The task suite: every recipe under recipes/tasks/ run end to end with the default recipe
(only the task block differs), and one table of what each run's verdict found.

    OMP_NUM_THREADS=2 python benchmarks/task_suite.py --out runs/tasks
    python benchmarks/task_suite.py --out runs/tasks --report-only   # table from the runs

Each task is run with ``fbnprune run RECIPE --out OUT/NAME`` (finished stages are reused),
then ``OUT/NAME/verdict/verdict.json`` is read: per task and wording, the documents outside
every split, the majority label's rate, the accuracy of the original, unhealed and healed
models under the recipe's scoring and as shipped (``sum``), the share of the original's
accuracy the healed model keeps, the most frequent answer's share, the budget and the time.
A generation task's rows (issue 28) have their own table: its metric (exact match or chrF),
the score of answering the most frequent target to every document, each model's score, the
share kept, and the healed model's most frequent answer's share and number of distinct
answers. The tables are printed and written to OUT/suite.md (and OUT/suite.json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "tasks"


def run_task(recipe: Path, out: Path, overrides: list[str]) -> float:
    """Run one recipe into ``out``; its wall time in seconds (0 when it was up to date)."""
    command = [sys.executable, "-m", "fbnprune", "run", str(recipe), "--out", str(out)]
    command += ["--no-progress", *(x for o in overrides for x in ("--set", o))]
    start = time.perf_counter()
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as stream:
        done = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{recipe.name} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def rows_of(run_dir: Path) -> list[dict[str, Any]]:
    """One row per task and wording of a run's verdict."""
    verdict = json.loads((run_dir / "verdict" / "verdict.json").read_text())
    ledger = json.loads((run_dir / "run.json").read_text())
    plan = json.loads((run_dir / "plan.json").read_text())
    seconds = sum(s["seconds"] for s in ledger["stages"].values())
    heal = ledger["stages"].get("heal", {}).get("details", {})
    rule, plain = verdict["scoring"], verdict["as_shipped"]
    rows = []
    for name, task in verdict["tasks"].items():
        models = task["models"]
        row: dict[str, Any] = {
            "run": run_dir.name,
            "task": name,
            "docs": task["n"],
            "labels": len(task["answers"]),
            "majority": task["majority_rate"],
            "budget": plan["provenance"].get("budget"),
            "kept_units": plan["provenance"].get("kept_per_layer")
            and sum(plan["provenance"]["kept_per_layer"]),
            "seconds": round(seconds),
            "heal_steps": heal.get("steps"),
            "scoring": rule,
            "flags": [f for f in verdict["flags"] if f.startswith(f"{name}:")],
        }
        for model in ("original", "unhealed", "healed"):
            if model in models:
                row[f"{model}_{rule}"] = models[model][rule]["accuracy"]
                row[f"{model}_{plain}"] = models[model][plain]["accuracy"]
                row[f"{model}_top"] = models[model][plain]["top_share"]
        row["kept"] = task["kept"].get("healed", task["kept"].get("unhealed"))
        best = max(models["original"], key=lambda r: models["original"][r]["accuracy"])
        shipped = verdict["shipped"]
        reference = models["original"][best]["accuracy"]
        row["best_rule"] = best
        row["kept_best"] = models[shipped][best]["accuracy"] / reference if reference else None
        rows.append(row)
    return rows


def generation_rows_of(run_dir: Path) -> list[dict[str, Any]]:
    """One row per generation task of a run's verdict."""
    verdict = json.loads((run_dir / "verdict" / "verdict.json").read_text())
    ledger = json.loads((run_dir / "run.json").read_text())
    plan = json.loads((run_dir / "plan.json").read_text())
    rows = []
    for name, task in verdict.get("generation", {}).items():
        models = task["models"]
        shipped = verdict["shipped"]
        rows.append(
            {
                "run": run_dir.name,
                "task": name,
                "docs": task["n"],
                "metric": task["metric"],
                "constant": task["constant_score"],
                **{f"{m}_score": models[m]["score"] for m in models},
                "kept": task["kept"].get(shipped),
                "top": models[shipped]["top_share"],
                "distinct": models[shipped]["distinct"],
                "budget": plan["provenance"].get("budget"),
                "seconds": round(sum(s["seconds"] for s in ledger["stages"].values())),
                "flags": [f for f in verdict["flags"] if f.startswith(f"{name}:")],
            }
        )
    return rows


def generation_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| task | docs | metric | constant answer | original | unhealed | healed | kept | "
        "healed's top answer | distinct answers | budget | time | flags |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        scores = " | ".join(
            "—" if r.get(f"{m}_score") is None else f"{r[f'{m}_score']:.3f}"
            for m in ("original", "unhealed", "healed")
        )
        lines.append(
            f"| {r['task']} | {r['docs']} | {r['metric']} | {r['constant']:.3f} | {scores} | "
            f"{_share(r['kept'])} | {r['top']:.0%} | {r['distinct']} | {r['budget']:.0%} | "
            f"{r['seconds'] / 60:.1f} min | {len(r['flags']) or 'none'} |"
        )
    return "\n".join(lines)


def table(rows: list[dict[str, Any]]) -> str:
    rule = rows[0]["scoring"] if rows else "calibrated"

    def cell(row: dict[str, Any], key: str) -> str:
        value = row.get(key)
        return "—" if value is None else f"{value:.2f}"

    head = (
        f"| task | docs | labels | majority | original ({rule} / sum) | unhealed ({rule}) | "
        f"healed ({rule} / sum) | kept | kept (original's best rule) | healed's top answer | "
        "budget | time | flags |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        kept = _share(r["kept"])
        top = "—" if r.get("healed_top") is None else f"{r['healed_top']:.0%}"
        lines.append(
            f"| {r['task']} | {r['docs']} | {r['labels']} | {r['majority']:.2f} | "
            f"{cell(r, f'original_{rule}')} / {cell(r, 'original_sum')} | "
            f"{cell(r, f'unhealed_{rule}')} | "
            f"{cell(r, f'healed_{rule}')} / {cell(r, 'healed_sum')} | {kept} | "
            f"{_share(r['kept_best'])} ({r['best_rule']}) | {top} | "
            f"{r['budget']:.0%} | {r['seconds'] / 60:.1f} min | {len(r['flags']) or 'none'} |"
        )
    return "\n".join(lines)


def _share(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/tasks"))
    parser.add_argument("--recipes", nargs="*", type=Path, help="default: recipes/tasks/*.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    parser.add_argument("--report-only", action="store_true", help="read the runs, run nothing")
    args = parser.parse_args()
    recipes = args.recipes or sorted(RECIPES.glob("*.yaml"))
    rows, written = [], []
    for recipe in recipes:
        run_dir = args.out / recipe.stem
        if not args.report_only:
            seconds = run_task(recipe, run_dir, args.overrides)
            print(f"{recipe.stem}: {seconds / 60:.1f} min", flush=True)
        rows += rows_of(run_dir)
        written += generation_rows_of(run_dir)
    text = table(rows) if rows else ""
    if written:
        text += ("\n\n" if text else "") + generation_table(written)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "suite.md").write_text(text + "\n")
    both = {"choice": rows, "generation": written}
    (args.out / "suite.json").write_text(json.dumps(both, indent=2) + "\n")


if __name__ == "__main__":
    main()
