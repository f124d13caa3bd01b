"""Multiple-choice answers: each answer's log-likelihood after a prompt, and the rules that
turn those into a model's answer.

``answer_logliks`` runs a model over a task's prompts once per answer (once per prompt when
every answer is one token) and keeps, per document and answer, the summed log-probability of
the answer's tokens and of its tokens up to the first one that tells it apart from the other
answers; and, per answer, the same after a content-free prompt (the task's template with
``"N/A"`` as the text, Zhao et al. 2021, "Calibrate before use").

``SCORING_RULES`` (``predict``) read an answer off those numbers:

- ``sum``: the largest summed log-likelihood. What a user gets who compares the answer words'
  probabilities of the shipped model; lm-eval's ``acc``.
- ``mean``: per token of the answer (favours neither short nor long answers by count).
- ``byte``: per UTF-8 byte of the answer text (lm-eval's ``acc_norm`` divides by characters).
- ``calibrated``: the summed log-likelihood minus the content-free prompt's: the model's prior
  for each answer, which a small model's answers lean on, is divided out.
- ``first_token``: the log-likelihood up to the answer's first distinguishing token, the
  next-token reading of a model (the same as ``sum`` when every answer is one token).

``AnswerStats`` is what is reported beside every accuracy: the majority label's rate and the
spread of the predicted answers, so that a constant answerer shows.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
from torch import nn

from fbnprune.recipe.base import Scoring

__all__ = [
    "SCORING_RULES",
    "AnswerLogLiks",
    "AnswerStats",
    "AnswerTask",
    "Scoring",
    "answer_logliks",
]

SCORING_RULES: tuple[Scoring, ...] = get_args(Scoring)
CONTENT_FREE_TEXT = "N/A"
CONSTANT_SHARE = 0.9  # one answer for more than this share of the documents is flagged


@dataclass(frozen=True)
class AnswerLogLiks:
    """Log-likelihoods of a task's answers (columns, in ``labels`` order) per document."""

    labels: tuple[str, ...]
    loglik: np.ndarray  # (documents, answers) summed log-probability of each answer
    first: np.ndarray  # (documents, answers) up to each answer's first distinguishing token
    n_tokens: np.ndarray  # (answers,) tokens of each answer
    n_bytes: np.ndarray  # (answers,) UTF-8 bytes of each answer text
    content_free: np.ndarray  # (answers,) summed log-probability after the content-free prompt

    def __post_init__(self) -> None:
        n = len(self.labels)
        if (
            self.loglik.ndim != 2
            or self.loglik.shape[1] != n
            or self.first.shape != self.loglik.shape
        ):
            raise ValueError(f"log-likelihoods must be (documents, {n}) arrays")
        for name in ("n_tokens", "n_bytes", "content_free"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"{name} must hold one value per answer ({n})")


def rule_scores(logliks: AnswerLogLiks, rule: Scoring) -> np.ndarray:
    """(documents, answers): the number ``rule`` maximises."""
    if rule == "sum":
        return logliks.loglik
    if rule == "mean":
        return logliks.loglik / np.maximum(logliks.n_tokens, 1)
    if rule == "byte":
        return logliks.loglik / np.maximum(logliks.n_bytes, 1)
    if rule == "calibrated":
        return logliks.loglik - logliks.content_free
    if rule == "first_token":
        return logliks.first
    raise ValueError(f"unknown scoring rule {rule!r}; choose from {', '.join(SCORING_RULES)}")


def predict(logliks: AnswerLogLiks, rule: Scoring) -> np.ndarray:
    """The answer (column index) ``rule`` picks for each document; ties go to the first."""
    return np.argmax(rule_scores(logliks, rule), axis=1)


@dataclass(frozen=True)
class AnswerStats:
    """One model's answers to one task under one rule, beside the task's own label counts."""

    rule: str
    n: int
    accuracy: float
    majority_label: str
    majority_rate: float
    predicted: dict[str, int]  # label -> how often the model answered it
    top_share: float  # the most frequent answer's share of the documents

    @property
    def constant(self) -> bool:
        """One answer for more than ``CONSTANT_SHARE`` of the documents."""
        return self.top_share > CONSTANT_SHARE

    @property
    def below_majority(self) -> bool:
        """Worse than always answering the most frequent label."""
        return self.accuracy < self.majority_rate

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "constant": self.constant, "below_majority": self.below_majority}


def answer_stats(logliks: AnswerLogLiks, gold: Sequence[int], rule: Scoring) -> AnswerStats:
    """Accuracy, majority rate and predicted-answer counts of ``rule`` against ``gold``."""
    gold_arr = np.asarray(gold, dtype=np.int64)
    if gold_arr.shape != (logliks.loglik.shape[0],) or len(gold_arr) == 0:
        raise ValueError("gold must hold one answer index per document (and at least one)")
    picked = predict(logliks, rule)
    labels = logliks.labels
    truth = Counter(int(g) for g in gold_arr)
    majority, majority_n = max(truth.items(), key=lambda kv: (kv[1], -kv[0]))
    answered = Counter(int(p) for p in picked)
    n = len(gold_arr)
    return AnswerStats(
        rule=rule,
        n=n,
        accuracy=float(np.mean(picked == gold_arr)),
        majority_label=labels[majority],
        majority_rate=majority_n / n,
        predicted={label: answered.get(i, 0) for i, label in enumerate(labels)},
        top_share=max(answered.values()) / n,
    )


@dataclass(frozen=True)
class AnswerTask:
    """A multiple-choice task of the suite that is also scored by fbnprune's answer rules
    of this module on the same records: its primary metric becomes
    ``acc_<scoring>``; ``acc_<rule>`` for every rule, ``majority_rate`` and
    ``top_share_<rule>`` (the most frequent answer's share) are added beside lm-eval's."""

    data_file: Path  # the suite's JSONL records (prompt, choices, gold)
    content_free_prompt: str
    scoring: str
    labels: tuple[str, ...] = ()  # names of the choices, in order (the answer texts if empty)

    def metrics(self) -> dict[str, bool]:
        """The metrics it adds (name -> higher is better), the primary one first."""
        added = {f"acc_{rule}": True for rule in SCORING_RULES}
        added.update({f"top_share_{rule}": False for rule in SCORING_RULES})
        return {f"acc_{self.scoring}": True, **added, "majority_rate": True}


# --- the model's side ---------------------------------------------------------------------------


def distinguishing_lengths(answers: Sequence[Sequence[int]]) -> list[int]:
    """Per answer, how many of its tokens it takes to tell it from every other answer: one
    more than its longest shared prefix with another (capped at its own length)."""
    out = []
    for j, own in enumerate(answers):
        shared = 0
        for k, other in enumerate(answers):
            if k == j:
                continue
            common = 0
            for a, b in zip(own, other, strict=False):
                if a != b:
                    break
                common += 1
            shared = max(shared, common)
        out.append(min(shared + 1, len(own)))
    return out


def _accepts(model: nn.Module, argument: str) -> bool:
    try:
        return argument in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _last_logprobs(
    model: nn.Module, prompts: list[list[int]], tokens: list[int], pad_id: int, batch_size: int
) -> np.ndarray:
    """(prompts, tokens): the log-probability of each of ``tokens`` right after each prompt
    (right-padded batches of similar length; only the prompts' last positions go through the
    LM head where the model takes ``logits_to_keep``)."""
    from fbnprune.collect.activations import iter_batches, pad_batch

    out = np.empty((len(prompts), len(tokens)))
    keep = _accepts(model, "logits_to_keep")
    device = next(model.parameters()).device
    for rows in iter_batches([len(p) for p in prompts], batch_size):
        ids, mask = pad_batch(prompts, rows, pad_id)
        last = [len(prompts[i]) - 1 for i in rows]
        needed = sorted(set(last))
        kwargs: dict[str, Any] = {}
        if keep:
            kwargs["logits_to_keep"] = torch.tensor(needed, device=device)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs).logits
        column = {pos: c for c, pos in enumerate(needed)} if keep else {p: p for p in needed}
        for r, i in enumerate(rows):
            row = torch.log_softmax(logits[r, column[last[r]]].float(), dim=-1)
            out[i] = row[tokens].double().cpu().numpy()
    return out


def _continuations(
    model: nn.Module, prompt: list[int], answers: list[list[int]], pad_id: int
) -> list[np.ndarray]:
    """Per answer, the log-probability of each of its tokens after ``prompt``: one pass over
    the prompt, its cache repeated for the answers, one pass over the right-padded answers."""
    device = next(model.parameters()).device
    kwargs: dict[str, Any] = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True, **kwargs)
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
    cache = getattr(out, "cache", None) or out.past_key_values
    result = [np.array([float(first[a[0]])]) for a in answers]
    longest = max(len(a) for a in answers)
    if longest == 1:
        return result
    cache.batch_repeat_interleave(len(answers))
    ids = torch.full((len(answers), longest - 1), pad_id, dtype=torch.long)
    mask = torch.zeros((len(answers), len(prompt) + longest - 1), dtype=torch.long)
    mask[:, : len(prompt)] = 1
    for j, a in enumerate(answers):  # token t of the answer is read after tokens < t
        ids[j, : len(a) - 1] = torch.tensor(a[:-1])
        mask[j, len(prompt) : len(prompt) + len(a) - 1] = 1
    # transformers 5 names the argument ``cache`` (``past_key_values`` is deprecated)
    name = "cache" if _accepts(model, "cache") else "past_key_values"
    logits = model(
        input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **{name: cache}
    ).logits
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    for j, a in enumerate(answers):
        rest = [float(logprobs[j, t - 1, a[t]]) for t in range(1, len(a))]
        result[j] = np.concatenate([result[j], np.array(rest)])
    return result


@torch.no_grad()
def answer_logliks(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    answers: dict[str, str],
    *,
    content_free_prompt: str,
    batch_size: int = 8,
    max_length: int = 2048,
) -> AnswerLogLiks:
    """Each answer's log-likelihoods after each prompt (``answers``: label -> answer text,
    in column order) and after ``content_free_prompt``.

    The prompt is tokenized as the model reads text (special tokens included), each answer on
    its own (none) and appended, so every answer is scored on the same prompt tokens; a prompt
    too long for ``max_length`` loses its beginning, never its question. When every answer is
    one token, one pass per prompt (batched) scores them all; otherwise each prompt is read
    once and its answers continue from its cached keys and values."""
    if not prompts:
        raise ValueError("no prompts to score")
    labels = tuple(answers)
    answer_ids = [tokenizer(answers[k], add_special_tokens=False)["input_ids"] for k in labels]
    empty = [k for k, ids in zip(labels, answer_ids, strict=True) if not ids]
    if empty:
        raise ValueError(f"answers of {empty} tokenize to nothing")
    distinct = distinguishing_lengths(answer_ids)
    longest = max(len(a) for a in answer_ids)
    texts = [*prompts, content_free_prompt]
    prompt_ids = [tokenizer(t)["input_ids"][-(max_length - longest) :] for t in texts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n, c = len(texts), len(labels)
    loglik, first = np.empty((n, c)), np.empty((n, c))
    was_training = model.training
    model.eval()
    try:
        if longest == 1:  # the prompt's last position gives every answer's probability
            firsts = [a[0] for a in answer_ids]
            loglik = _last_logprobs(model, prompt_ids, firsts, pad_id, batch_size)
            first = loglik.copy()
        else:  # the prompt once, then every answer after its cached keys and values
            for i, p in enumerate(prompt_ids):
                per_answer = _continuations(model, p, answer_ids, pad_id)
                for j, per_token in enumerate(per_answer):
                    loglik[i, j] = per_token.sum()
                    first[i, j] = per_token[: distinct[j]].sum()
    finally:
        model.train(was_training)
    return AnswerLogLiks(
        labels=labels,
        loglik=loglik[:-1],
        first=first[:-1],
        n_tokens=np.array([len(a) for a in answer_ids]),
        n_bytes=np.array([len(answers[k].encode()) for k in labels]),
        content_free=loglik[-1],
    )
