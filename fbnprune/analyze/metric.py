"""Task metrics for lesions and preservation: cheap, in process, on held-out documents.

- ``ChoiceMetric``: zero-shot multiple-choice accuracy, each choice scored by the summed
  log-likelihood of its tokens after the prompt (lm-eval's ``acc``; context and choice are
  encoded the way lm-eval encodes them). Used for BBC topics (the eval suite's prompt and
  labels) and arithmetic word problems (the answer against three near misses). Also reports
  ``gold_logprob``: the mean log-probability of the right choice, normalised over the
  choices, a smoother signal than accuracy on a few dozen documents.
- ``PerplexityMetric``: mean next-token cross-entropy (nats per predicted token) and its
  perplexity over held-out documents cut to ``max_length`` tokens.

Both run the decoder once per batch and the LM head only at the positions they score,
which matters for large vocabularies (Gemma: 262k). Token ids are prepared once, so scoring
one more masked variant costs only its forward passes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fbnprune.collect.activations import iter_batches, pad_batch
from fbnprune.data.task_text import Document
from fbnprune.evaluate.records import BBC_TOPICS, bbc_record, word_problem_record
from fbnprune.models.adapters import get_adapter

if TYPE_CHECKING:
    from transformers import PreTrainedModel

HEAD_CHUNK = 256  # positions per LM-head matmul (bounds memory for large vocabularies)


def secondary_key(metric: dict[str, Any]) -> str:
    """The less noisy companion of a recorded metric (``analysis.json``'s ``metrics[task]``):
    ``gold_logprob`` for a choice metric, ``ppl`` for perplexity."""
    return "gold_logprob" if metric["kind"] == "choice" else "ppl"


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question: the prompt, the choices and the right one."""

    id: str
    prompt: str
    choices: tuple[str, ...]
    gold: int


@torch.inference_mode()
def target_logprobs(
    model: PreTrainedModel,
    seqs: list[list[int]],
    positions: list[list[int]],
    targets: list[list[int]],
    *,
    pad_id: int = 0,
) -> list[np.ndarray]:
    """``log p(targets[i][j] | seqs[i][: positions[i][j] + 1])`` for every row and target.

    The decoder runs once over the right-padded batch; the LM head only at the positions
    asked for (repeats allowed), in chunks.
    """
    backbone = get_adapter(model).get_backbone(model)
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    device = next(model.parameters()).device
    ids, mask = pad_batch(seqs, list(range(len(seqs))), pad_id)
    hidden = backbone(
        input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False
    ).last_hidden_state
    rows = torch.tensor([r for r, pos in enumerate(positions) for _ in pos], device=device)
    cols = torch.tensor([p for pos in positions for p in pos], device=device)
    tgts = torch.tensor([t for tgt in targets for t in tgt], device=device)
    out = torch.empty(len(tgts), dtype=torch.float64)
    for start in range(0, len(tgts), HEAD_CHUNK):
        part = slice(start, start + HEAD_CHUNK)
        logits = head(hidden[rows[part], cols[part]]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        logp = logits.log_softmax(dim=-1).gather(1, tgts[part, None])[:, 0]
        out[part] = logp.cpu()
    sizes = np.cumsum([0, *(len(t) for t in targets)])
    flat = out.numpy()
    return [flat[a:b] for a, b in zip(sizes[:-1], sizes[1:], strict=True)]


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


class ChoiceMetric:
    """Multiple-choice accuracy (``acc``, primary) and ``gold_logprob``.

    Args:
        items: the questions.
        tokenizer: the model's tokenizer (its default special tokens are used, as in
            ``collect``).
        batch_size: sequences per forward pass.
        delimiter: put between prompt and choice (lm-eval's ``target_delimiter``).
    """

    kind = "choice"
    primary = "acc"
    higher_is_better = True

    def __init__(
        self, items: Sequence[ChoiceItem], tokenizer, *, batch_size: int = 8, delimiter: str = " "
    ) -> None:
        if not items:
            raise ValueError("no multiple-choice items to score")
        self.items, self.batch_size, self.pad_id = list(items), batch_size, _pad_id(tokenizer)
        self.doc_ids = [it.id for it in self.items]
        # one request = (item, input ids, positions, targets, choice of each target)
        self.requests: list[tuple[int, list[int], list[int], list[int], list[int]]] = []
        for index, item in enumerate(self.items):
            ctx = tokenizer(item.prompt)["input_ids"]
            conts = []
            for choice in item.choices:
                whole = tokenizer(item.prompt + delimiter + choice)["input_ids"]
                cont = whole[len(ctx) :]
                if not cont:
                    raise ValueError(f"{item.id}: choice {choice!r} encodes to no tokens")
                conts.append(cont)
            if all(len(c) == 1 for c in conts):  # one pass: every choice at the last position
                pos = [len(ctx) - 1] * len(conts)
                self.requests.append(
                    (index, ctx, pos, [c[0] for c in conts], list(range(len(conts))))
                )
                continue
            for c, cont in enumerate(conts):
                seq = ctx + cont[:-1]
                pos = list(range(len(ctx) - 1, len(seq)))
                self.requests.append((index, seq, pos, cont, [c] * len(cont)))

    def score(self, model: PreTrainedModel, *, progress: bool = False) -> dict[str, float]:
        totals = np.zeros((len(self.items), max(len(it.choices) for it in self.items)))
        batches = iter_batches([len(r[1]) for r in self.requests], self.batch_size)
        for batch in tqdm(batches, desc="score", leave=False, disable=not progress):
            reqs = [self.requests[i] for i in batch]
            logps = target_logprobs(
                model,
                [r[1] for r in reqs],
                [r[2] for r in reqs],
                [r[3] for r in reqs],
                pad_id=self.pad_id,
            )
            for (item, _, _, _, which), lp in zip(reqs, logps, strict=True):
                np.add.at(totals[item], which, lp)
        correct, gold_lp = [], []
        for i, item in enumerate(self.items):
            ll = totals[i, : len(item.choices)]
            correct.append(float(np.argmax(ll) == item.gold))
            gold_lp.append(float(ll[item.gold] - np.logaddexp.reduce(ll)))
        acc = float(np.mean(correct))
        return {
            "acc": acc,
            "acc_stderr": math.sqrt(acc * (1 - acc) / max(len(correct) - 1, 1)),
            "gold_logprob": float(np.mean(gold_lp)),
            "n_docs": len(correct),
        }


class PerplexityMetric:
    """Mean next-token cross-entropy (``nll``, primary, nats per token) and ``ppl``."""

    kind = "perplexity"
    primary = "nll"
    higher_is_better = False

    def __init__(
        self,
        docs: Sequence[tuple[str, str]],
        tokenizer,
        *,
        max_length: int = 128,
        batch_size: int = 8,
    ) -> None:
        self.doc_ids = [doc_id for doc_id, _ in docs]
        self.batch_size, self.pad_id = batch_size, _pad_id(tokenizer)
        self.seqs = [
            tokenizer(text, truncation=True, max_length=max_length)["input_ids"] for _, text in docs
        ]
        self.seqs = [s for s in self.seqs if len(s) >= 2]
        if not self.seqs:
            raise ValueError("no document has the two tokens a next-token loss needs")

    def score(self, model: PreTrainedModel, *, progress: bool = False) -> dict[str, float]:
        total, count = 0.0, 0
        batches = iter_batches([len(s) for s in self.seqs], self.batch_size)
        for batch in tqdm(batches, desc="score", leave=False, disable=not progress):
            seqs = [self.seqs[i] for i in batch]
            positions = [list(range(len(s) - 1)) for s in seqs]
            targets = [s[1:] for s in seqs]
            for lp in target_logprobs(model, seqs, positions, targets, pad_id=self.pad_id):
                total -= float(lp.sum())
                count += len(lp)
        nll = total / count
        return {
            "nll": nll,
            "ppl": math.exp(min(nll, 700.0)),
            "n_docs": len(self.seqs),
            "n_tokens": count,
        }


Metric = ChoiceMetric | PerplexityMetric


def metric_kind(source: str) -> str:
    """Which metric a task source gets: BBC topics and arithmetic are multiple choice
    (they carry labels); every other source is scored by perplexity."""
    return {"builtin:bbc_news": "bbc_topics", "builtin:arithmetic": "word_problems"}.get(
        source, "perplexity"
    )


def build_metric(
    source: str,
    docs: Sequence[Document],
    texts: Sequence[str],
    tokenizer,
    *,
    seed: int,
    max_length: int,
    batch_size: int,
) -> Metric:
    """The metric of a task over its evaluation documents (``texts``: the documents with the
    task's template applied, used for perplexity)."""
    kind = metric_kind(source)
    if kind == "bbc_topics":
        records = [bbc_record(d) for d in docs if d.label in BBC_TOPICS]
    elif kind == "word_problems":
        records = [word_problem_record(d, seed) for d in docs]
    else:
        return PerplexityMetric(
            list(zip([d.id for d in docs], texts, strict=True)),
            tokenizer,
            max_length=max_length,
            batch_size=batch_size,
        )
    items = [ChoiceItem(r["id"], r["prompt"], tuple(r["choices"]), r["gold"]) for r in records]
    return ChoiceMetric(items, tokenizer, batch_size=batch_size)
