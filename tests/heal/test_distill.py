"""Healing's label loss: the gold answer appended to its prompt, its cross-entropy beside the
distillation loss, so a student learns the task where the teacher is wrong."""

from __future__ import annotations

import copy

import numpy as np
import torch
from conftest import task_recipe, tiny_model, tiny_tokenizer

from fbnprune.evaluate.answers import answer_logliks
from fbnprune.heal.distill import IGNORE, prepare_targets
from fbnprune.heal.train import heal_model
from fbnprune.recipe import HealConfig

PROMPTS = [f"item {w}: the kind is" for w in ("apple", "pear", "plum", "fig", "lime", "kiwi")]
GOLD = [" x" if i % 2 == 0 else " y" for i in range(len(PROMPTS))]


def test_answers_are_appended_and_labelled() -> None:
    tok = tiny_tokenizer()
    cfg = HealConfig(label_weight=1.0, batch_size=6, answer_weight=5.0)
    train, _ = prepare_targets(
        tiny_model("llama"), tok, PROMPTS[:2], cfg, questions=[True, True], answers=GOLD[:2]
    )
    (target,) = train
    for row, (prompt, gold) in enumerate(zip(PROMPTS[:2], GOLD[:2], strict=True)):
        n_prompt = len(tok(prompt)["input_ids"])
        answer = tok(gold, add_special_tokens=False)["input_ids"]
        ids = target.input_ids[row, : n_prompt + len(answer)].tolist()
        assert ids[n_prompt:] == answer  # appended after the prompt
        labels = target.labels[row]
        wanted = [IGNORE] * (n_prompt - 1) + answer
        assert labels[: len(wanted)].tolist() == wanted  # position p predicts token p + 1
        assert bool((labels[len(wanted) :] == IGNORE).all())
    # the answer weight sits on the prompt's last position, not on the appended answer
    assert target.weights is not None and int((target.weights == 5.0).sum()) == 2


def test_no_answers_no_labels() -> None:
    cfg = HealConfig(label_weight=0.0, batch_size=6)
    train, _ = prepare_targets(tiny_model("llama"), tiny_tokenizer(), PROMPTS, cfg, answers=GOLD)
    assert all(t.labels is None for t in train)
    lengths = [len(tiny_tokenizer()(p)["input_ids"]) for p in PROMPTS]
    assert sorted(int(t.attention_mask.sum()) for t in train) == [sum(lengths)]


def gold_loglik(model: torch.nn.Module) -> float:
    """The mean log-likelihood of each prompt's gold answer."""
    ll = answer_logliks(
        model, tiny_tokenizer(), PROMPTS, {"x": " x", "y": " y"}, content_free_prompt="n/a"
    )
    gold = [0 if g == " x" else 1 for g in GOLD]
    return float(np.mean(ll.loglik[np.arange(len(gold)), gold]))


def test_label_loss_teaches_what_the_teacher_gets_wrong() -> None:
    """A random teacher knows nothing of the labels: distilling alone leaves the gold
    answers where the teacher puts them; with the label loss their likelihood rises."""
    teacher, tok = tiny_model("llama", seed=1), tiny_tokenizer()
    start = tiny_model("llama", seed=2)
    results = {}
    for weight in (0.0, 2.0):
        cfg = HealConfig(
            label_weight=weight, steps=40, lr=3e-3, batch_size=3, eval_every=40, max_minutes=None
        )
        student, log = heal_model(
            copy.deepcopy(start),
            teacher,
            tok,
            PROMPTS,
            cfg,
            questions=[True] * len(PROMPTS),
            answers=GOLD,
            progress=False,
        )
        results[weight] = gold_loglik(student)
        assert log.steps == 40
    before = gold_loglik(start)
    assert results[2.0] > results[0.0] + 0.5
    assert results[2.0] > before + 0.5


def test_corpus_and_general_text_join_healing_but_never_a_heldout_document(tmp_path) -> None:
    """heal.corpus: unlabelled in-domain text distilled as plain text, without the task's
    held-out documents; heal.general_text: Wikipedia passages as a share of the task's."""
    import json

    from fbnprune.rundir import RunDir
    from fbnprune.rundir.context import RunContext

    base = RunContext(task_recipe(), RunDir(tmp_path / "a"), progress=False)
    heldout = base.tasks["bbc-news"].heldout[0].text
    corpus = tmp_path / "corpus.jsonl"
    texts = [heldout, "an unlabelled post about markets", "another one about football"]
    corpus.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    heal = {"enabled": False, "corpus": f"file:{corpus}", "general_text": 0.5}
    ctx = RunContext(task_recipe(heal=heal), RunDir(tmp_path / "b"), progress=False)
    healing, questions = ctx.heal_texts()
    n_task = len(base.heal_texts()[0])
    assert healing[:n_task] == base.heal_texts()[0]  # the task's texts first, unchanged
    extra = healing[n_task:]
    assert texts[1] in extra and texts[2] in extra and heldout not in extra
    assert len(extra) == 2 + round(0.5 * n_task)  # the general text's share
    assert questions[n_task:] == [False] * len(extra)  # plain text, no answer position
    assert len(ctx.heal_answers()) == len(healing)
