"""Distillation targets and loss: the teacher's top-k next-token log-probabilities at every
real position (``TeacherTargets``), and the KL of the student's distribution on the same
k+1 buckets (the top-k tokens and one bucket holding the remaining mass); and, for labelled
multiple-choice documents, the cross-entropy of the gold answer appended to its prompt; a
generation task's target is always appended, and every position that predicts one of its
tokens weighs ``answer_weight``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from fbnprune.collect.activations import iter_batches, pad_batch, tokenize
from fbnprune.errors import FbnpruneError
from fbnprune.hashing import fingerprint
from fbnprune.io import atomic_file
from fbnprune.recipe import HealConfig

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]
IGNORE = -100  # the label of a position with no gold next token


class HealError(FbnpruneError, ValueError):
    """Healing cannot run as configured."""


@dataclass
class TeacherTargets:
    """The teacher's top-k log-probabilities at every real (unpadded) position of a batch,
    the last one included: distillation needs no next token, and after a task's question
    the last position is the one that predicts the answer."""

    input_ids: torch.Tensor  # (batch, length)
    attention_mask: torch.Tensor  # (batch, length)
    top_ids: torch.Tensor  # (n_positions, k) token ids
    top_logprobs: torch.Tensor  # (n_positions, k) teacher log-probabilities
    weights: torch.Tensor | None = None  # (n_positions,) loss weight of every position
    labels: torch.Tensor | None = None  # (batch, length) gold next token, -100 where none

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


Targets = tuple[list[TeacherTargets], list[TeacherTargets]]  # (training, validation)


def _answer_position_weights(
    attention: torch.Tensor,
    last: torch.Tensor,
    positions: torch.Tensor | None = None,
    spans: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weight 1 for every real position, ``last[row]`` for each row's answer position: the
    one given in ``positions``, else the row's last real one (the end of its question), and
    the ``spans[row] - 1`` after it (a written answer's tokens; one position without
    ``spans``)."""
    weights = torch.ones_like(attention, dtype=torch.float32)
    ends = attention.sum(dim=1) - 1 if positions is None else positions
    weights[torch.arange(len(ends)), ends] = last.float()
    if spans is not None:
        for row, (start, n) in enumerate(zip(ends.tolist(), spans.tolist(), strict=True)):
            weights[row, start : start + n] = last[row].float()
    return weights[attention.bool()]


@torch.no_grad()  # not inference_mode: the targets enter the student's autograd graph
def teacher_targets(
    teacher: nn.Module,
    batches: Sequence[Batch],
    *,
    top_k: int,
    temperature: float = 1.0,
    last_weights: Sequence[torch.Tensor] | None = None,
    labels: Sequence[torch.Tensor | None] | None = None,
    answer_positions: Sequence[torch.Tensor] | None = None,
    answer_spans: Sequence[torch.Tensor] | None = None,
    progress: bool = False,
) -> list[TeacherTargets]:
    """Run the teacher once over the batches and keep its top-k next-token log-probs at
    every real position; ``last_weights`` (one (batch,) tensor per batch) weight each row's
    answer position (``answer_positions``, else its last one) and, with ``answer_spans``
    (positions per row), the positions after it that predict a written answer's tokens;
    ``labels`` (one (batch, length) tensor per batch) are kept beside the targets for the
    label loss."""
    teacher.eval()
    out = []
    for b, (input_ids, attention) in enumerate(
        tqdm(batches, desc="heal: teacher", disable=not progress)
    ):
        logits = teacher(input_ids=input_ids, attention_mask=attention).logits
        values, ids = _top_logprobs(logits[attention.bool()], top_k, temperature)
        del logits
        weights = None
        if last_weights is not None:
            where = None if answer_positions is None else answer_positions[b]
            span = None if answer_spans is None else answer_spans[b]
            weights = _answer_position_weights(attention, last_weights[b], where, span)
        gold = None if labels is None else labels[b]
        out.append(TeacherTargets(input_ids, attention, ids, values, weights, gold))
    return out


# positions whose full-vocabulary log-probabilities are computed at once by the teacher's pass
TARGET_CHUNK = 256


def _top_logprobs(
    rows: torch.Tensor, top_k: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``top_k`` largest log-probabilities of each row of logits (positions x vocabulary)
    at ``temperature``, and their token ids: ``TARGET_CHUNK`` rows at a time (each row's
    values are those of the whole tensor's, bit for bit)."""
    values, ids = [], []
    for chunk in rows.split(TARGET_CHUNK):
        chunk = chunk.float()
        logprobs = F.log_softmax(chunk / temperature if temperature != 1 else chunk, dim=-1)
        top = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)
        values.append(top.values)
        ids.append(top.indices)
    return torch.cat(values), torch.cat(ids)


def distillation_loss(
    student_logits: torch.Tensor, target: TeacherTargets, temperature: float = 1.0
) -> torch.Tensor:
    """KL(teacher || student) over the teacher's top-k tokens plus one "rest" bucket, mean
    over positions (weighted by ``target.weights`` when given), scaled by T^2 (Hinton et
    al.) so gradients keep their size across T."""
    logits = student_logits[target.attention_mask.bool()].float()
    if temperature != 1:  # x / 1 is x: no copy of the logits at the default
        logits = logits / temperature
    student = F.log_softmax(logits, dim=-1)
    s_top = student.gather(-1, target.top_ids)
    t_top = target.top_logprobs
    t_rest = torch.log1p(-t_top.exp().sum(-1).clamp(max=1 - 1e-6))
    s_rest = torch.log1p(-s_top.exp().sum(-1).clamp(max=1 - 1e-6))
    kl = (t_top.exp() * (t_top - s_top)).sum(-1) + t_rest.exp() * (t_rest - s_rest)
    if target.weights is None:
        return kl.mean() * temperature**2
    return (kl * target.weights).sum() / target.weights.sum() * temperature**2


def label_loss(student_logits: torch.Tensor, target: TeacherTargets) -> torch.Tensor:
    """Cross-entropy of the gold answers' tokens (``target.labels``), mean over them; zero
    when the batch has none."""
    if target.labels is None or not bool((target.labels != IGNORE).any()):
        return student_logits.new_zeros(())
    logits = student_logits.float().reshape(-1, student_logits.shape[-1])
    return F.cross_entropy(logits, target.labels.reshape(-1), ignore_index=IGNORE)


def heal_loss(
    student_logits: torch.Tensor, target: TeacherTargets, temperature: float, label_weight: float
) -> torch.Tensor:
    """What healing minimises: the distillation loss, plus ``label_weight`` times the gold
    answers' cross-entropy where the batch has labels."""
    loss = distillation_loss(student_logits, target, temperature)
    if label_weight and target.labels is not None:
        loss = loss + label_weight * label_loss(student_logits, target)
    return loss


@torch.no_grad()
def validation_loss(
    model: nn.Module, targets: list[TeacherTargets], temperature: float, label_weight: float = 0.0
) -> float:
    model.eval()
    losses = [
        float(
            heal_loss(
                model(input_ids=t.input_ids, attention_mask=t.attention_mask).logits,
                t,
                temperature,
                label_weight,
            )
        )
        for t in targets
    ]
    model.train()
    return sum(losses) / len(losses)


def _with_answers(
    tokenizer: Any, texts: Sequence[str], answers: Sequence[str | None], max_length: int
) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """Token ids of each text with its gold answer's tokens appended (the prompt cut at its
    end to fit ``max_length``), the labels of every position (the answer's next token, else
    ``IGNORE``) and each row's answer position (the prompt's last token)."""
    ids, labels, positions = [], [], []
    for text, answer in zip(texts, answers, strict=True):
        extra = [] if answer is None else tokenizer(answer, add_special_tokens=False)["input_ids"]
        prompt = tokenizer(text, truncation=True, max_length=max(1, max_length - len(extra)))
        row = list(prompt["input_ids"]) + list(extra)
        gold = [IGNORE] * len(row)
        for t, token in enumerate(extra):
            gold[len(row) - len(extra) - 1 + t] = token
        ids.append(row)
        labels.append(gold)
        positions.append(len(row) - len(extra) - 1)
    return ids, labels, positions


def prepare_targets(
    teacher: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    cfg: HealConfig,
    *,
    validation: Sequence[str] = (),
    questions: Sequence[bool] | None = None,
    validation_questions: Sequence[bool] | None = None,
    answers: Sequence[str | None] | None = None,
    validation_answers: Sequence[str | None] | None = None,
    targets: Sequence[str | None] | None = None,
    validation_targets: Sequence[str | None] | None = None,
    progress: bool = False,
) -> Targets:
    """The teacher's targets on the training texts and on the validation texts.

    ``questions`` (one flag per text) marks the prompts of tasks that ask (multiple choice
    or generation), whose answer position (the one that predicts the answer) weighs
    ``cfg.answer_weight``. ``answers`` (one gold answer text or None per text; used when
    ``cfg.label_weight`` is not 0) are appended to their prompts and kept as labels for the
    label loss. ``targets`` (a generation task's text the model must write, or None) are
    always appended, kept as labels, and each position predicting one of their tokens
    weighs ``cfg.answer_weight``.
    """
    if not texts:
        raise HealError("no text to heal on")

    def run(
        prompts: Sequence[str],
        flags: Sequence[bool] | None,
        golds: Sequence[str | None] | None,
        written: Sequence[str | None] | None,
        bar: bool,
    ) -> list[TeacherTargets]:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        appended = _appended(prompts, golds if cfg.label_weight != 0 else None, written)
        labelled = appended is not None
        spans = None
        if appended is not None:
            ids, gold_ids, where = _with_answers(tokenizer, prompts, appended, cfg.max_length)
            if written is not None and any(written):
                spans = [
                    sum(g != IGNORE for g in row) if w else 1
                    for row, w in zip(gold_ids, written, strict=True)
                ]
        else:
            ids = tokenize(tokenizer, list(prompts), cfg.max_length)
        groups = iter_batches([len(s) for s in ids], cfg.batch_size)
        batches = [pad_batch(ids, g, pad_id) for g in groups]
        last = None
        if flags is not None and cfg.answer_weight != 1.0:
            last = [
                torch.tensor([cfg.answer_weight if flags[i] else 1.0 for i in g]) for g in groups
            ]
        labels = positions = None
        if labelled:
            labels = [pad_batch(gold_ids, g, IGNORE)[0] for g in groups]
            positions = [torch.tensor([where[i] for i in g]) for g in groups]
        return teacher_targets(
            teacher,
            batches,
            top_k=cfg.top_k,
            temperature=cfg.temperature,
            last_weights=last,
            labels=labels,
            answer_positions=positions,
            answer_spans=None
            if spans is None
            else [torch.tensor([spans[i] for i in g]) for g in groups],
            progress=bar,
        )

    train = run(texts, questions, answers, targets, progress)
    checks = (
        run(validation, validation_questions, validation_answers, validation_targets, False)
        if validation
        else []
    )
    return train, checks


def _appended(
    prompts: Sequence[str],
    golds: Sequence[str | None] | None,
    written: Sequence[str | None] | None,
) -> list[str | None] | None:
    """What follows each prompt in healing's texts: its generation target, else its gold
    answer (``golds``, given where the label loss is on); None when nothing is appended."""
    if not (golds and any(golds)) and not (written and any(written)):
        return None
    golds = golds or [None] * len(prompts)
    written = written or [None] * len(prompts)
    return [w if w is not None else g for w, g in zip(written, golds, strict=True)]


# the settings that change the teacher's targets (not lr, steps, ...: those reuse them)
TARGET_SETTINGS = ("max_length", "batch_size", "top_k", "temperature", "answer_weight")
_FIELDS = ("input_ids", "attention_mask", "top_ids", "top_logprobs", "weights", "labels")


def targets_key(
    teacher_id: str,
    cfg: HealConfig,
    texts: Sequence[str],
    questions: Sequence[bool] | None,
    validation: Sequence[str],
    validation_questions: Sequence[bool] | None,
    answers: Sequence[str | None] = (),
    validation_answers: Sequence[str | None] = (),
    targets: Sequence[str | None] = (),
    validation_targets: Sequence[str | None] = (),
) -> str:
    """What a set of targets was computed from: the teacher, the texts and their flags, and
    the settings in ``TARGET_SETTINGS`` (and the gold answers and generation targets, when
    they are appended)."""
    settings = {name: getattr(cfg, name) for name in TARGET_SETTINGS}
    flags = [list(questions or []), list(validation_questions or [])]
    parts: list[Any] = [teacher_id, settings, list(texts), list(validation), flags]
    if cfg.label_weight and (any(answers) or any(validation_answers)):
        parts.append([list(answers), list(validation_answers)])
    if any(targets) or any(validation_targets):
        parts.append({"targets": [list(targets), list(validation_targets)]})
    return fingerprint(*parts)


def save_targets(path: Path, key: str, targets: Targets) -> None:
    """Write (training, validation) targets to one safetensors file, atomically, with
    ``key`` in its metadata, so that training can run without the teacher in memory."""
    tensors: dict[str, torch.Tensor] = {}
    for split, batch_targets in zip(("train", "validation"), targets, strict=True):
        for i, target in enumerate(batch_targets):
            for name in _FIELDS:
                value = getattr(target, name)
                if value is not None:
                    tensors[f"{split}.{i}.{name}"] = value.detach().clone()  # unshared
    counts = {"train": str(len(targets[0])), "validation": str(len(targets[1]))}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"key": key, **counts})


def load_targets(path: Path, key: str) -> Targets | None:
    """The targets saved at ``path`` for ``key``; None when absent or of other inputs."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("key") != key:
        return None
    tensors = load_file(str(path))

    def target(split: str, i: int) -> TeacherTargets:
        ids, attention, top_ids, logprobs = (tensors[f"{split}.{i}.{n}"] for n in _FIELDS[:4])
        weights = tensors.get(f"{split}.{i}.weights")
        labels = tensors.get(f"{split}.{i}.labels")
        return TeacherTargets(ids, attention, top_ids, logprobs, weights, labels)

    train, validation = (
        [target(split, i) for i in range(int(metadata[split]))] for split in ("train", "validation")
    )
    return train, validation
