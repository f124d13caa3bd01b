"""The prose of a model card, one function per section, from its ``CardFacts``."""

from __future__ import annotations

from typing import Any

from fbnprune.parity import ParityResult
from fbnprune.publish.card_facts import (
    UNKNOWN_LICENSE,
    BaseModel,
    CardFacts,
    model_name,
    task_datasets,
)
from fbnprune.rundir.layout import (
    CHECKPOINT_HEAL,
    CHECKPOINT_PARITY,
    CHECKPOINT_PLAN,
    CHECKPOINT_RECIPE,
    DOCUMENTS_FILE,
    EVAL_DIR,
    RESULTS_FILE,
)
from fbnprune.verdict.judgement import kept_text


def sections(facts: CardFacts, base: BaseModel) -> list[str]:
    return [
        _intro(facts, base),
        _how_to_load(facts),
        _what_was_kept(facts),
        _healing(facts),
        _task(facts),
        _evaluation(facts, base),
        _parity(facts),
        _sizes(facts),
        _formats(facts),
        _provenance(facts),
        _limitations(facts, base),
    ]


def human_bytes(n: float | None) -> str:
    """``n`` bytes in B, KiB, MiB or GiB."""
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{int(n)} B"


def _intro(facts: CardFacts, base: BaseModel) -> str:
    plan, prov = facts.plan, facts.plan.provenance
    link = (
        f"[{base.hub_id}](https://huggingface.co/{base.hub_id})"
        if base.hub_id
        else f"`{plan.model}`"
    )
    tasks = ", ".join(f"`{t}`" for t in task_datasets(facts.recipe)) or "its calibration text"
    what = "MLP intermediate units" if plan.site == "hidden" else "MLP output channels"
    selector = prov.get("selector", "?")
    how = (
        "to the functional networks (group ICA of MLP activations) used by the tasks"
        if selector == "ica"
        else f"with the `{selector}` selector (a baseline) for the tasks"
    )
    return (
        f"# {model_name(facts)}\n\n"
        f"{link}, pruned with fbnprune {how} {tasks}: it keeps **{plan.n_kept:,} of "
        f"{plan.n_units:,} {what} ({plan.kept_fraction:.1%})**, "
        + (
            "then healed by distillation from the original (see Healing). "
            if facts.heal
            else "with no retraining. "
        )
        + "Attention, embeddings and norms keep their shapes."
    )


def _healing(facts: CardFacts) -> str:
    heal = facts.heal
    if not heal:
        return ""
    cfg = heal.get("settings", {})
    losses = heal.get("train_loss") or [float("nan")]
    validation = heal.get("validation") or []
    held = (
        f" Held-out KD loss: {validation[0][1]:.3f} at step {validation[0][0]} -> "
        f"{validation[-1][1]:.3f} at step {validation[-1][0]}."
        if validation
        else ""
    )
    what = "the MLPs" if cfg.get("modules") == "mlp" else "every decoder linear layer"
    how = (
        "their weights"
        if heal.get("method") == "full"
        else f"LoRA adapters of rank {cfg.get('lora_rank')}, merged into the weights"
    )
    label = cfg.get("label_weight", 0)
    labels = (
        f" Where documents are labelled, the gold answer was appended to its prompt and its "
        f"cross-entropy added to the loss (weight {label}), so the model learnt the task's "
        "labels, not only the original's answers."
        if label
        else ""
    )
    accuracy = heal.get("validation_accuracy") or []
    if accuracy:
        labels += (
            f" Held-out accuracy: {accuracy[0][1]:.2f} at step {accuracy[0][0]} -> "
            f"{accuracy[-1][1]:.2f} at step {accuracy[-1][0]}."
        )
    return (
        "## Healing\n\n"
        f"After slicing, the model was distilled from the original: KL divergence between the "
        f"original's next-token distribution (top-{cfg.get('top_k')} tokens plus the rest) and "
        f"this model's, on the task's prompts of the calibration and healing documents only "
        f"(never on evaluation text; the document ids are in the run's {DOCUMENTS_FILE}), "
        f"training {what} ({how}; {heal.get('trainable_parameters', 0):,} parameters). "
        f"{heal.get('steps')} steps of {cfg.get('batch_size')} x {cfg.get('max_length')} tokens, "
        f"lr {cfg.get('lr')}, {heal.get('seconds', 0):.0f} s; training KD loss "
        f"{losses[0]:.3f} -> {losses[-1]:.3f}.{held}{labels} The log is `{CHECKPOINT_HEAL}`. The "
        "parity table below proves the slice before healing; healing changes the weights, so "
        "this model differs from the masked original by design."
    )


def _how_to_load(facts: CardFacts) -> str:
    where = facts.repo_id or "path/to/this/folder"
    if facts.layout == "compact":
        load = f'model = AutoModelForCausalLM.from_pretrained("{where}", trust_remote_code=True)\n'
        note = (
            "Layout **compact**: every layer has exactly its kept width. Stock configs hold one "
            "MLP width, so the checkpoint ships `modeling_fbnprune.py` (a stock transformers "
            "class whose MLPs are resized before loading) and `config.auto_map`; loading needs "
            "`trust_remote_code=True`. Read that file before trusting it."
        )
    else:
        load = f'model = AutoModelForCausalLM.from_pretrained("{where}")\n'
        note = (
            "Layout **padded**: every layer is padded with zero units to the widest kept layer, "
            "so one stock `intermediate_size` describes the model and stock "
            "`from_pretrained` (and other stock loaders) read it; the zero units contribute "
            "exactly nothing."
        )
    return (
        "## How to load\n\n" + note + "\n\n```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'tokenizer = AutoTokenizer.from_pretrained("{where}")\n' + load + "```"
    )


FILL_NOTES = {
    "mean": " (calibration mean, folded into the down-projection bias)",
    "reconstruct": " (kept down-projection columns and a bias refit by least squares to "
    "reproduce the original MLP output on the calibration tokens)",
}


def _what_was_kept(facts: CardFacts) -> str:
    plan, prov = facts.plan, facts.plan.provenance
    rows = [
        (
            "site",
            f"`{plan.site}` ("
            + (
                "MLP intermediate units, the down projection's inputs"
                if plan.site == "hidden"
                else "MLP output channels; shapes are kept"
            )
            + ")",
        ),
        ("selector", f"`{prov.get('selector', '?')}`"),
        ("budget", f"{prov['budget']:.1%} of units" if "budget" in prov else "n/a"),
        (
            "allocation",
            f"`{prov.get('allocation', '?')}` (at least "
            f"{prov.get('min_per_layer', 0):.0%} of every layer)",
        ),
        ("fill of dropped units", f"`{plan.fill}`" + FILL_NOTES.get(plan.fill, "")),
        ("kept", f"{plan.n_kept:,} / {plan.n_units:,} ({plan.kept_fraction:.2%})"),
    ]
    if "n_components" in prov:
        rows.append(
            (
                "ICA",
                f"{prov['n_components']} components, z >= {prov.get('threshold')}"
                f"; the plain threshold union alone would keep "
                f"{prov.get('threshold_union_units', '?'):,} units",
            )
        )
    table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    kept = plan.kept_per_layer()
    widths = sorted(set(plan.layer_widths))
    of = f"of {widths[0]:,}" if len(widths) == 1 else "of each layer's width"
    lines = ["| layers | kept units per layer (" + of + ") |", "|---|---|"]
    for start in range(0, len(kept), 10):
        chunk = kept[start : start + 10]
        lines.append(f"| {start}-{start + len(chunk) - 1} | {' '.join(map(str, chunk))} |")
    return (
        "## What was kept\n\n"
        + table
        + "\n\n"
        + "\n".join(lines)
        + (f"\n\nThe kept indices of every layer are in `{CHECKPOINT_PLAN}`.")
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _score(value: float | None, stderr: float | None) -> str:
    return _fmt(value) + (f" ± {stderr:.3f}" if value is not None and stderr is not None else "")


def _answer_words(answers: dict[str, str], generation: dict[str, Any] | None) -> str:
    """How the task is answered, in a sentence: its labels' answer words, or how the model
    writes and is scored."""
    if generation:
        return (
            f"The model writes its answer (the target `{generation['target_template']!r}`, "
            f"ended by {generation['stop']!r} or {generation['max_new_tokens']} tokens), "
            f"scored by {generation['metric']}; 'constant answer' is the score of writing "
            "the most frequent target every time."
        )
    if answers:
        return (
            "Labels and their answer words: "
            + ", ".join(f"{k} → `{v!r}`" for k, v in answers.items())
            + "."
        )
    return "No answer words (plain text)."


def _task(facts: CardFacts) -> str:
    """The task in plain words (labels and answer words, prompt, data, splits, scoring) and
    the verdict: this model against the original on documents outside every split."""
    verdict = facts.verdict
    if not verdict:
        return ""
    rule, plain, model = verdict["scoring"], verdict["as_shipped"], facts.verdict_model
    parts = ["## Task and verdict"]
    for name, info in verdict.get("task_info", {}).items():
        source = f"`{info['source']}`"
        if info.get("sha256"):
            source += f" (sha256 `{info['sha256'][:16]}…`)"
        docs = info["documents"]
        answers = info.get("answers") or {}
        parts.append(
            f"**{name}**: data {source}; documents used: {docs['calibration']} calibration, "
            f"{docs['heldout']} held-out, {docs['heal']} healing, and {docs['verdict']} others "
            "for the verdict below (never seen by pruning or healing). Prompt template: "
            f"`{info['template']!r}`"
            + (f" (the text cut to {info['max_words']} words)" if info.get("max_words") else "")
            + ". "
            + _answer_words(answers, info.get("generation"))
        )
    parts.append(
        f"Scoring: `{rule}` (each answer's log-likelihood after the prompt"
        + (
            ", minus its log-likelihood after the template with 'N/A' as the text"
            if rule == "calibrated"
            else ""
        )
        + f"; the same rule for every model). As shipped (`{plain}`) is what a user gets who "
        "takes the likeliest answer word. Kept = this model's accuracy over the original's."
    )
    table = [
        f"| task | docs | majority | original ({rule}) | this model ({rule}) | kept | "
        f"this model as shipped | its most frequent answer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, task in verdict["tasks"].items():
        ours = task["models"].get(model)
        if ours is None:
            continue
        original = task["models"]["original"][rule]["accuracy"]
        kept = task["kept"].get(model)
        table.append(
            f"| {name} | {task['n']} | {task['majority_rate']:.3f} | {original:.3f} | "
            f"{ours[rule]['accuracy']:.3f} | {kept_text(kept)} | "
            f"{ours[plain]['accuracy']:.3f} | {ours[plain]['top_share']:.0%} |"
        )
    if verdict["tasks"]:
        parts.append("\n".join(table))
    written = verdict.get("generation", {})
    if written:
        rows = [
            "| task | docs | metric | constant answer | original | this model | kept | "
            "share of its most frequent answer |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, task in written.items():
            ours = task["models"].get(model)
            if ours is None:
                continue
            kept = task["kept"].get(model)
            rows.append(
                f"| {name} | {task['n']} | {task['metric']} | {task['constant_score']:.3f} | "
                f"{task['models']['original']['score']:.3f} | {ours['score']:.3f} | "
                f"{kept_text(kept)} | {ours['top_share']:.0%} |"
            )
        parts.append("\n".join(rows))
    flags = verdict.get("flags_by_model", {}).get(model, [])
    if flags:
        parts.append(
            "**Warning: this model was flagged and exported with `--force`.**\n\n"
            + "\n".join(f"- {f}" for f in flags)
        )
    return "\n\n".join(parts)


def _evaluation(facts: CardFacts, base: BaseModel) -> str:
    if not facts.scores:
        return (
            "## Evaluation\n\nNo evaluation results were recorded for this run "
            f"(`fbnprune evaluate` writes them to `{EVAL_DIR}/{RESULTS_FILE}`). "
            "Evaluate it on your "
            "task before relying on it."
        )
    lines = ["| task | metric | docs | original | pruned | change |", "|---|---|---|---|---|---|"]
    for s in facts.scores:
        change = "n/a"
        if s.pruned is not None and s.original is not None:
            change = f"{s.pruned - s.original:+.4f}"
        arrow = "" if s.higher_is_better else " (lower is better)"
        lines.append(
            f"| {s.task} | {s.metric}{arrow} | {s.n_docs or 'n/a'} | "
            f"{_score(s.original, s.original_stderr)} | "
            f"{_score(s.pruned, s.pruned_stderr)} | {change} |"
        )
    variants = sorted({s.variant for s in facts.scores if s.variant})
    notes = [
        f"Original = `{base.name}` before pruning, scored in the same run with the same "
        "settings (± standard error)."
    ]
    if variants:
        notes.append(f"Pruned = the evaluated variant {', '.join(f'`{v}`' for v in variants)}.")
    others = sorted({k for s in facts.scores for k in s.extra})
    if others:
        notes.append(f"Other variants scored (see `fbnprune_eval.json`): {', '.join(others)}.")
    return "## Evaluation\n\n" + " ".join(notes) + "\n\n" + "\n".join(lines)


def _parity(facts: CardFacts) -> str:
    if not facts.parity:
        return ""
    result = ParityResult.from_dict(facts.parity)
    lines = [
        "| reference | candidate | dtype | max abs diff | mean abs diff | tolerance | passed |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result.reports:
        for c in r.comparisons:
            passed = ("yes" if c.passed else "NO") if r.gating else "for information"
            lines.append(
                f"| {r.reference} | {c.name} | {r.dtype} | {c.max_abs:.2e} | "
                f"{c.mean_abs:.2e} | {r.atol:g} | {passed} |"
            )
    return (
        "## Parity\n\nThe plan applied by hooks to the original (`masked`) and the sliced model "
        "compute the same thing: in float64, where rounding cannot hide a wrong unit (each "
        "MLP's output on the masked model's inputs, or the logits when heads, layers or the "
        "vocabulary are cut too), and the saved checkpoint's logits equal the in-memory "
        "slice's. In float32 the changed summation order alone moves logits slightly; that row "
        "is for information. Held-out tokens: "
        f"{result.reports[0].n_tokens}.\n\n" + "\n".join(lines)
    )


def _sizes(facts: CardFacts) -> str:
    sizes = (facts.prune or {}).get("sizes", {})
    lines = ["| model | parameters | bytes (in memory) |", "|---|---|---|"]
    for name in ("original", "padded", "compact"):
        s = sizes.get(name)
        if not s:
            continue
        if "parameters" in s:
            mark = " (this export)" if name == facts.layout else ""
            params, size = f"{s['parameters'] / 1e6:,.2f} M", human_bytes(s["bytes"])
            lines.append(f"| {name}{mark} | {params} | {size} |")
        else:
            lines.append(f"| {name} | unavailable: {s.get('unavailable', '?')} | |")
    text = "## Size\n\n"
    if len(lines) > 2:
        text += "\n".join(lines) + "\n\n"
    text += _component_table(sizes)
    vocab = (facts.prune or {}).get("vocabulary")
    if vocab:
        text += (
            f"The vocabulary is cut to the task: {vocab['kept']:,} of {vocab['original']:,} "
            "tokens (the shipped tokenizer has only those; other text is written in smaller "
            "kept pieces, down to bytes).\n\n"
        )
    heads = (facts.prune or {}).get("heads")
    if heads:
        text += (
            f"Attention: {heads['query']} query heads and {heads['groups']} key-value groups "
            "per layer (the heads that wrote most to the residual stream on the task).\n\n"
        )
    layers = (facts.prune or {}).get("layers")
    if layers:
        text += (
            f"Decoder blocks: {layers['kept']} of {layers['original']} (blocks "
            f"{', '.join(str(i) for i in layers['dropped'])} dropped: the ones whose skipping "
            "moved the original's output least).\n\n"
        )
    return text + f"Safetensors files of this export: {human_bytes(facts.export_bytes)}."


def _component_table(sizes: dict[str, Any]) -> str:
    """Millions of parameters per component (prune.json's ``components``), per model."""
    models = [m for m in ("original", "padded", "compact") if "components" in sizes.get(m, {})]
    if not models:
        return ""
    parts = list(dict.fromkeys(p for m in models for p in sizes[m]["components"]))
    lines = [
        "| component | " + " | ".join(models) + " |",
        "|---" * (len(models) + 1) + "|",
    ]
    for part in parts:
        cells = [sizes[m]["components"].get(part, {}).get("parameters", 0) / 1e6 for m in models]
        lines.append(f"| {part} | " + " | ".join(f"{c:,.2f} M" for c in cells) + " |")
    return "\n".join(lines) + "\n\n"


def _formats(facts: CardFacts) -> str:
    parts = []
    q = facts.formats.get("int8")
    if q:
        ppl = q.get("perplexity", {})
        parts.append(
            f"### int8 (`{q['path']}/`, optimum-quanto weight-only qint8)\n\n"
            f"{human_bytes(q['bytes'])} of safetensors (unquantized: "
            f"{human_bytes(q.get('reference_bytes'))}). Against "
            f"the unquantized slice over {q.get('n_tokens', '?')} tokens: max abs logit diff "
            f"{q['max_abs']:.3g}, mean {q['mean_abs']:.3g}, top-1 agreement "
            f"{q['top1_agreement']:.1%}, perplexity {ppl.get('reference', float('nan')):.3f} -> "
            f"{ppl.get('quantized', float('nan')):.3f}. Task metrics were not re-measured for "
            "int8. Only linear layers are quantized: embeddings keep their precision"
            + (", and so does the tied `lm_head`" if q.get("excluded") else "")
            + ". Load it "
            "(transformers cannot read quanto weights itself):\n\n```python\n"
            + q["load_snippet"]
            + "```"
        )
    o = facts.formats.get("onnx")
    if o:
        parts.append(
            f"### ONNX (`{o['path']}`)\n\nExported with `torch.onnx.export(dynamo=True)`; inputs "
            "`input_ids`, `attention_mask` (dynamic batch and sequence), output `logits` (no KV "
            f"cache). onnxruntime vs PyTorch: max abs logit diff {o['max_abs']:.2e} over "
            f"{o.get('n_tokens', '?')} tokens. ({human_bytes(o['bytes'])})"
        )
    return "## Other formats\n\n" + "\n\n".join(parts) if parts else ""


def _provenance(facts: CardFacts) -> str:
    prov = facts.plan.provenance
    rows = [
        ("base model", f"`{facts.plan.model}` ({facts.plan.model_type})"),
        (
            "recipe",
            f"`{prov.get('recipe', facts.recipe.get('name', '?'))}`, fingerprint "
            f"`{prov.get('recipe_fingerprint', '?')}` (`{CHECKPOINT_RECIPE}`)",
        ),
        ("seed", str(prov.get("seed", facts.recipe.get("seed", "?")))),
        (
            "task data",
            ", ".join(f"{t} `{h}`" for t, h in (prov.get("tasks") or {}).items()) or "n/a",
        ),
        (
            "calibration tokens",
            ", ".join(f"{t}: {n:,}" for t, n in (prov.get("calibration_tokens") or {}).items())
            or "n/a",
        ),
        (
            "versions",
            ", ".join(f"{k} {v}" for k, v in (prov.get("versions") or {}).items()) or "n/a",
        ),
        ("planned", str(prov.get("created", "n/a"))),
    ]
    return (
        "## Provenance\n\n| | |\n|---|---|\n"
        + "\n".join(f"| {k} | {v} |" for k, v in rows)
        + f"\n\nFiles: `{CHECKPOINT_PLAN}` (kept indices, fill values, provenance), "
        f"`{CHECKPOINT_RECIPE}`, `{CHECKPOINT_PARITY}`, `fbnprune_export.json`"
        + (", `fbnprune_eval.json`" if facts.scores else "")
        + "."
    )


def _limitations(facts: CardFacts, base: BaseModel) -> str:
    plan = facts.plan
    items = [
        "Units were chosen for the recipe's tasks only; abilities those tasks do not exercise "
        "are likely lost. "
        + (
            "Healing used only the calibration and healing documents of those tasks."
            if facts.heal
            else "It was not retrained after pruning."
        ),
        "Only MLP units are removed; attention and embeddings keep their size, so the "
        "parameter reduction is well below the fraction of units removed.",
    ]
    if plan.site == "output":
        items.append(
            "Output-site pruning zeroes channels but keeps every shape: this export "
            "is no smaller or faster than the original."
        )
    elif facts.layout == "padded":
        items.append(
            f"Padded layout: every layer carries {max(plan.kept_per_layer())} units "
            "(the widest kept layer); narrower layers compute on zero padding."
        )
    if not facts.scores:
        items.append("No evaluation results are attached.")
    if base.license_note:
        items.append(base.license_note)
    if base.license != UNKNOWN_LICENSE:
        items.append(f"Use is governed by the base model's license (`{base.license}`).")
    return "## Limitations\n\n" + "\n".join(f"- {i}" for i in items)
