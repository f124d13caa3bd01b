"""An independent check of a generation task's verdict: the run's verdict documents answered
again by plain ``transformers`` greedy decoding (one prompt at a time, no padding, no
lm-eval), cut at the first stop string, and scored by this script's own rules: exact match
of the lower-cased, stripped answer (``.`` removed at the end), or sacrebleu's corpus chrF.

    python benchmarks/generation_check.py runs/tasks/arithmetic-items
    python benchmarks/generation_check.py runs/tasks/bbc-headlines --limit 50

Prints, per model (the original and each checkpoint the verdict scored), the score beside
the verdict's own; the two differ only where batching or the normal form does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fbnprune.data.task_text import document_target, load_documents, render
from fbnprune.models.loading import resolve_model
from fbnprune.recipe import load_recipe


def answer(model, tokenizer, prompt: str, stop: list[str], max_new_tokens: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    for s in stop:
        text = text.split(s)[0]
    return text


def score(answers: list[str], targets: list[str], metric: str) -> float:
    if metric == "chrf":
        from sacrebleu.metrics import CHRF

        return CHRF().corpus_score(answers, [targets]).score
    same = [
        a.strip().lower().rstrip(".") == t.strip().lower()
        for a, t in zip(answers, targets, strict=True)
    ]
    return sum(same) / len(same)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--limit", type=int, default=None, help="the first N documents")
    args = parser.parse_args()
    recipe = load_recipe(args.run_dir / "recipe.yaml")
    verdict = json.loads((args.run_dir / "verdict" / "verdict.json").read_text())
    for name, entry in verdict.get("generation", {}).items():
        task = next(t for t in recipe.tasks if t.name == entry["task"])
        gen = task.generation
        assert gen is not None, "an lm-eval generation task: not checked by this script"
        by_id = {d.id: d for d in load_documents(task.source, target_field=gen.target_field)}
        docs = [by_id[i] for i in entry["doc_ids"][: args.limit]]
        prompts = [render(task.template, d.text, task.max_words) for d in docs]
        targets = [document_target(gen, d) for d in docs]
        for model_name, source in verdict["models"].items():
            folder = resolve_model(recipe.model) if model_name == "original" else None
            folder = folder or args.run_dir / source
            tokenizer = AutoTokenizer.from_pretrained(folder)
            compact = (Path(folder) / "modeling_fbnprune.py").is_file()
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=compact).eval()
            answers = [answer(model, tokenizer, p, gen.stop, gen.max_new_tokens) for p in prompts]
            ours = score(answers, targets, gen.metric)
            theirs = entry["models"][model_name]["score"]
            print(
                f"{name} {model_name:9s} {gen.metric} {ours:.3f} on {len(docs)} documents "
                f"(the verdict's, on {entry['n']}: {theirs:.3f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
