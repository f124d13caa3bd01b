"""What the verdict judges and how it says it: the flags of a model's answers to a task, and
the verdict as a Markdown table."""

from __future__ import annotations

from typing import Any

from fbnprune.evaluate.answers import CONSTANT_SHARE

AS_SHIPPED = "sum"  # the rule a user of the checkpoint gets: the likeliest answer word


def kept_share(accuracy: float, reference: float) -> float | None:
    """``accuracy`` as a share of the original's, or None where the original scores 0."""
    return None if reference == 0 else accuracy / reference


def task_flags(task: str, model: str, stats: dict[str, Any], scoring: str) -> list[str]:
    """Why ``model``'s answers to ``task`` are not usable: one answer for more than 90% of
    the documents as shipped, or an accuracy below the majority label's rate (under the
    recipe's scoring, or as shipped)."""
    flags = []
    shipped = stats[AS_SHIPPED]
    if shipped["top_share"] > CONSTANT_SHARE:
        label = max(shipped["predicted"], key=shipped["predicted"].get)
        flags.append(
            f"{task}: the {model} model answers {label!r} for {shipped['top_share']:.0%} of "
            f"{shipped['n']} documents as shipped (a constant answerer)"
        )
    for rule in dict.fromkeys((scoring, AS_SHIPPED)):
        s = stats[rule]
        if s["accuracy"] < s["majority_rate"]:
            what = "as shipped" if rule == AS_SHIPPED else f"under {rule} scoring"
            flags.append(
                f"{task}: the {model} model scores {s['accuracy']:.3f} {what}, below the "
                f"majority label's rate {s['majority_rate']:.3f} ({s['majority_label']!r})"
            )
    return flags


def _clip(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def kept_text(share: float | None) -> str:
    """A kept share as a percentage ("n/a" where the original scores 0)."""
    return "n/a" if share is None else f"{share:.0%}"


def _spread(predicted: dict[str, int]) -> str:
    return " ".join(f"{label}:{n}" for label, n in predicted.items())


def generation_table(tasks: dict[str, Any]) -> list[str]:
    """The generation tasks' part of the verdict: one table per task, a row per model."""
    lines: list[str] = []
    for name, task in tasks.items():
        metric = task["metric"]
        lines += [
            f"## {name}: {task['n']} documents, written answers scored by {metric}; "
            f"answering {task['constant_answer']!r} to every document scores "
            f"{task['constant_score']:.3f}",
            "",
            f"| model | {metric} | kept | most frequent answer | its share | distinct answers |",
            "|---|---|---|---|---|---|",
        ]
        for model, stats in task["models"].items():
            lines.append(
                f"| {model} | {stats['score']:.3f} | {kept_text(task['kept'][model])} | "
                f"{_clip(stats['top_answer'])!r} | {stats['top_share']:.0%} | "
                f"{stats['distinct']} |"
            )
        lines.append("")
    return lines


def verdict_table(result: dict[str, Any]) -> str:
    """The verdict as Markdown: one table per task, a row per model."""
    rule, plain = result["scoring"], result["as_shipped"]
    lines = [
        f"# Verdict: documents outside every split (scoring: {rule}; as shipped: {plain})",
        "",
    ]
    for name, task in result["tasks"].items():
        lines += [
            f"## {name}: {task['n']} documents, majority label {task['majority_label']!r} "
            f"at {task['majority_rate']:.3f}",
            "",
            f"| model | accuracy ({rule}) | kept | accuracy ({plain}) | top answer | "
            f"answers ({plain}) |",
            "|---|---|---|---|---|---|",
        ]
        for model, stats in task["models"].items():
            lines.append(
                f"| {model} | {stats[rule]['accuracy']:.3f} | "
                f"{kept_text(task['kept'][model])} | {stats[plain]['accuracy']:.3f} | "
                f"{stats[plain]['top_share']:.0%} | {_spread(stats[plain]['predicted'])} |"
            )
        lines.append("")
    lines += generation_table(result.get("generation", {}))
    target = result.get("target")
    if target is not None and target["kept"] is not None:
        verb = "meets" if target["met"] else "misses"
        lines += [
            f"Target: the shipped model keeps {target['kept']:.0%} of the original's accuracy "
            f"(smallest over tasks), which {verb} select.keep_accuracy "
            f"{target['keep_accuracy']:.0%}.",
            "",
        ]
        search = target.get("search")
        if search is not None:
            tried = ", ".join(f"{t['budget']:.0%} keeps {t['kept']:.0%}" for t in search["trials"])
            what = "would choose" if search["met"] else "found none; its largest is"
            lines += [
                f"The budget search (select.budget: auto, on the held-out split: {tried}) "
                f"{what} budget {search['chosen']:.0%}.",
                "",
            ]
    flags = result["flags"]
    lines += ["## Flags", ""] + ([f"- {f}" for f in flags] if flags else ["none"])
    return "\n".join(lines) + "\n"
