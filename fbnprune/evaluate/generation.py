"""Answers a model writes: greedy generation through lm-eval (``HFLM.generate_until``, which
stops at the task's stop strings), scored by exact match after ``normalise_answer`` or by
sacrebleu's chrF; and ``GenerationTask``, a generation task on a set of its documents (the
verdict's, outside every split), with the spread of its answers beside the score."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fbnprune.data.document import Document
from fbnprune.data.task_text import document_target, render
from fbnprune.evaluate.answers import CONSTANT_SHARE
from fbnprune.recipe import GenerationConfig

_NUMBER = re.compile(r"[+-]?(\d{1,3}(,\d{3})+|\d+)(\.\d+)?")


def _strip_punctuation(text: str) -> str:
    """``text`` without the punctuation (Unicode category P*) and spaces at either end; a
    number's sign stays (``"-12."`` is ``"-12"``)."""
    chars = list(text)

    def leading(i: int) -> bool:
        if chars[i] == "-" and i + 1 < len(chars) and chars[i + 1].isdigit():
            return False  # a negative number's sign
        return chars[i] == " " or unicodedata.category(chars[i]).startswith("P")

    while chars and leading(0):
        chars.pop(0)
    while chars and (chars[-1] == " " or unicodedata.category(chars[-1]).startswith("P")):
        chars.pop()
    return "".join(chars)


def normalise_answer(text: str) -> str:
    """Exact match's normal form: Unicode NFKC, case folded, whitespace collapsed to single
    spaces, punctuation at either end dropped (``"Paris."`` is ``"paris"``), and a whole
    answer that is a number written one way: no thousands commas, no ``+``, no leading
    zeros, no trailing decimal zeros (``"1,000.50"``, ``"+1000.5"`` and ``"01000.5"`` are
    ``"1000.5"``; ``"7.0"`` is ``"7"``)."""
    text = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    text = _strip_punctuation(text)
    if _NUMBER.fullmatch(text):
        sign = "-" if text.startswith("-") else ""
        whole, _, fraction = text.lstrip("+-").replace(",", "").partition(".")
        whole, fraction = whole.lstrip("0") or "0", fraction.rstrip("0")
        text = sign + whole + (f".{fraction}" if fraction else "")
        if text == "-0":
            text = "0"
    return text


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when both answers have the same ``normalise_answer`` form, else 0.0."""
    return float(normalise_answer(prediction) == normalise_answer(gold))


def score_answers(
    predictions: Sequence[str], golds: Sequence[str], metric: str
) -> tuple[float, list[float]]:
    """The task's score and each document's: ``exact_match`` (mean of 0/1), or ``chrf``
    (sacrebleu's corpus chrF, 0-100, and each answer's sentence chrF)."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} targets")
    if not golds:
        raise ValueError("no answers to score")
    if metric == "exact_match":
        each = [exact_match(p, g) for p, g in zip(predictions, golds, strict=True)]
        return sum(each) / len(each), each
    if metric == "chrf":
        from sacrebleu.metrics import CHRF

        chrf = CHRF()
        whole = chrf.corpus_score(list(predictions), [list(golds)]).score
        each = [chrf.sentence_score(p, [g]).score for p, g in zip(predictions, golds, strict=True)]
        return whole, each
    raise ValueError(f"unknown metric {metric!r}: use exact_match or chrf")


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    generation: GenerationConfig,
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> list[str]:
    """Each prompt's greedy continuation, through lm-eval's ``HFLM.generate_until``: at
    most ``max_new_tokens`` tokens, cut before the first stop string (or end of text)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from fbnprune.evaluate.harness import _quiet_lm_eval

    kwargs = {
        "until": list(generation.stop),
        "max_gen_toks": generation.max_new_tokens,
        "do_sample": False,
    }
    with _quiet_lm_eval():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        requests = [
            Instance("generate_until", doc={}, arguments=(prompt, dict(kwargs)), idx=0)
            for prompt in prompts
        ]
        return list(lm.generate_until(requests, disable_tqdm=not progress))


def answer_spread(predictions: Sequence[str]) -> dict[str, Any]:
    """How varied the answers are (in exact match's normal form): the most frequent one,
    its share, and the number of distinct answers."""
    counts = Counter(normalise_answer(p) for p in predictions)
    top, n = counts.most_common(1)[0]
    return {"top_answer": top, "top_share": n / len(predictions), "distinct": len(counts)}


@dataclass(frozen=True)
class GenerationTask:
    """One generation task on a set of its documents: the prompts, the targets and how
    answers are written and scored."""

    name: str
    task: str
    template: str
    max_words: int | None
    generation: GenerationConfig
    documents: list[Document]

    def prompts(self) -> list[str]:
        return [render(self.template, d.text, self.max_words) for d in self.documents]

    def targets(self) -> list[str]:
        return [document_target(self.generation, d) for d in self.documents]

    def answers(
        self, model: Any, tokenizer: Any, batch_size: int, progress: bool = False
    ) -> list[str]:
        """``model``'s greedy answer to every prompt."""
        return generate_answers(
            model,
            tokenizer,
            self.prompts(),
            self.generation,
            batch_size=batch_size,
            progress=progress,
        )

    def constant_answer(self) -> tuple[str, float]:
        """The most frequent target and the score of answering it to every document: the
        baseline a model that ignores the text reaches."""
        targets = self.targets()
        common = Counter(targets).most_common(1)[0][0]
        score, _ = score_answers([common] * len(targets), targets, self.generation.metric)
        return common, score

    def score(self, predictions: Sequence[str]) -> dict[str, Any]:
        """The score of ``predictions``, each document's, and their spread."""
        score, each = score_answers(predictions, self.targets(), self.generation.metric)
        return {"score": score, "each": each, **answer_spread(predictions)}


def generation_flags(task: str, model: str, stats: dict[str, Any], constant: float) -> list[str]:
    """Why ``model``'s written answers to ``task`` are not usable: one answer for more than
    90% of the documents, or a score no better than answering the most frequent target to
    every document."""
    flags = []
    if stats["top_share"] > CONSTANT_SHARE:
        flags.append(
            f"{task}: the {model} model writes {stats['top_answer']!r} for "
            f"{stats['top_share']:.0%} of the documents (a constant answerer)"
        )
    if stats["score"] <= constant:
        flags.append(
            f"{task}: the {model} model scores {stats['score']:.3f}, no better than the "
            f"most frequent target answered to every document ({constant:.3f})"
        )
    return flags
