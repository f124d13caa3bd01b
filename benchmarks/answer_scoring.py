"""Which answer-scoring rule serves a task: the original model's accuracy and answer spread
under every rule of ``fbnprune.evaluate.answers``, per task of the suite and per wording.

The documents are the runs' own (calibration, held-out and healing splits, capped by
--docs), never the verdict's, so the rule is not chosen on the documents it is judged on.

    OMP_NUM_THREADS=2 python benchmarks/answer_scoring.py recipes/tasks/*.yaml
    python benchmarks/answer_scoring.py recipes/tasks/*.yaml --set model=gemma3-270m
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from fbnprune.data.task_text import render
from fbnprune.evaluate.answers import (
    CONTENT_FREE_TEXT,
    SCORING_RULES,
    answer_logliks,
    answer_stats,
)
from fbnprune.evaluate.suite import eval_name
from fbnprune.recipe import load_recipe
from fbnprune.rundir import RunDir
from fbnprune.rundir.context import RunContext


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="+", type=Path)
    parser.add_argument("--docs", type=int, default=200, help="documents per task (at most)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="K=V",
        help="recipe override for every recipe, e.g. --set model=gemma3-270m",
    )
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.recipes:
            recipe = load_recipe(path, args.overrides)
            ctx = RunContext(recipe, RunDir(Path(tmp) / path.stem), progress=False)
            model, tokenizer = ctx.model, ctx.tokenizer
            for cfg in recipe.tasks:
                data = ctx.tasks[cfg.name]
                if data.choices is None:
                    continue
                docs = (data.calibration + data.heldout + data.heal)[: args.docs]
                labels = list(data.choices)
                gold = [labels.index(str(d.label)) for d in docs]
                wordings = [(None, cfg.template, data.choices)]
                wordings += [(w, w.template, w.choices) for w in cfg.wordings]
                for wording, template, answers in wordings:
                    start = time.perf_counter()
                    prompts = [render(template, d.text, cfg.max_words) for d in docs]
                    ll = answer_logliks(
                        model,
                        tokenizer,
                        prompts,
                        {k: answers[k] for k in labels},
                        content_free_prompt=render(template, CONTENT_FREE_TEXT),
                    )
                    stats = {rule: answer_stats(ll, gold, rule) for rule in SCORING_RULES}
                    rows.append((eval_name(cfg, wording), recipe.model, len(docs), ll, stats))
                    print(f"{rows[-1][0]}: {time.perf_counter() - start:.0f} s", flush=True)
    header = "| task | model | docs | answer tokens | majority | " + " | ".join(SCORING_RULES)
    print("\naccuracy (share of the most frequent answer)\n")
    print(header + " |")
    print("|---" * (5 + len(SCORING_RULES)) + "|")
    for name, model, n, ll, stats in rows:
        majority = stats["sum"].majority_rate
        cells = [f"{s.accuracy:.3f} ({s.top_share:.0%})" for s in stats.values()]
        tokens = "/".join(str(int(t)) for t in ll.n_tokens)
        print(f"| {name} | {model} | {n} | {tokens} | {majority:.3f} | " + " | ".join(cells) + " |")
    means = {r: float(np.mean([s[r].accuracy for *_, s in rows])) for r in SCORING_RULES}
    worst = {
        r: float(min(s[r].accuracy - s[r].majority_rate for *_, s in rows)) for r in SCORING_RULES
    }
    print("\n| rule | mean accuracy | worst margin over the majority rate |\n|---|---|---|")
    for rule in SCORING_RULES:
        print(f"| {rule} | {means[rule]:.3f} | {worst[rule]:+.3f} |")


if __name__ == "__main__":
    main()
