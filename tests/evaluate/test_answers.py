"""Answer scoring: the rules on hand-built log-likelihoods, the statistics that expose a
constant answerer, and the model-side log-likelihoods against a brute-force forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from fbnprune.evaluate.answers import (
    SCORING_RULES,
    AnswerLogLiks,
    answer_logliks,
    answer_stats,
    distinguishing_lengths,
    predict,
)


def hand_built() -> AnswerLogLiks:
    """Three answers, one document, built so that every rule picks a different one where
    the rules differ: a short cheap answer, a long answer, a high-prior answer."""
    return AnswerLogLiks(
        labels=("short", "long", "prior"),
        loglik=np.array([[-4.0, -6.0, -3.0]]),
        first=np.array([[-4.0, -1.0, -3.0]]),
        n_tokens=np.array([1, 6, 1]),
        n_bytes=np.array([2, 12, 2]),
        content_free=np.array([-5.0, -9.0, -1.0]),
    )


def test_each_rule_reads_its_own_number() -> None:
    ll = hand_built()
    picked = {rule: ll.labels[int(predict(ll, rule)[0])] for rule in SCORING_RULES}
    assert picked["sum"] == "prior"  # -3 is the largest sum
    assert picked["mean"] == "long"  # -1 per token against -4 and -3
    assert picked["byte"] == "long"  # -0.5 per byte against -2 and -1.5
    assert picked["calibrated"] == "long"  # +3 over its prior against +1 and -2
    assert picked["first_token"] == "long"  # -1 up to its distinguishing token


def test_calibration_removes_a_prior_the_sum_follows() -> None:
    """A model whose every answer leans to label 1 by a constant: the summed rule answers 1
    throughout, the calibrated rule reads the documents' own evidence."""
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 2, size=40)
    evidence = np.where(np.arange(2)[None, :] == gold[:, None], 1.0, 0.0)
    prior = np.array([-6.0, -2.0])
    ll = AnswerLogLiks(
        labels=("a", "b"),
        loglik=evidence + prior,
        first=evidence + prior,
        n_tokens=np.array([1, 1]),
        n_bytes=np.array([2, 2]),
        content_free=prior,
    )
    raw = answer_stats(ll, gold, "sum")
    fair = answer_stats(ll, gold, "calibrated")
    assert raw.constant and raw.predicted == {"a": 0, "b": 40}
    assert raw.accuracy == pytest.approx(float(np.mean(gold == 1)))
    assert fair.accuracy == 1.0 and not fair.constant


def test_stats_report_majority_and_spread() -> None:
    ll = AnswerLogLiks(
        labels=("x", "y", "z"),
        loglik=np.array([[0.0, -1, -1]] * 9 + [[-1, 0.0, -1]]),
        first=np.zeros((10, 3)),
        n_tokens=np.ones(3),
        n_bytes=np.ones(3),
        content_free=np.zeros(3),
    )
    gold = [1] * 6 + [0] * 4  # majority y at 0.6
    stats = answer_stats(ll, gold, "sum")
    assert stats.majority_label == "y" and stats.majority_rate == pytest.approx(0.6)
    assert stats.predicted == {"x": 9, "y": 1, "z": 0}
    assert stats.top_share == pytest.approx(0.9) and not stats.constant  # not above 0.9
    assert stats.accuracy == pytest.approx(0.3) and stats.below_majority
    with pytest.raises(ValueError, match="one answer index per document"):
        answer_stats(ll, gold[:3], "sum")


def test_distinguishing_lengths() -> None:
    assert distinguishing_lengths([[5], [6], [7]]) == [1, 1, 1]
    assert distinguishing_lengths([[1, 2, 3], [1, 2, 4], [9]]) == [3, 3, 1]
    assert distinguishing_lengths([[1, 2], [1, 2, 3]]) == [2, 3]  # a prefix of another


def brute_force(model, tokenizer, prompt: str, answer: str) -> float:
    p = tokenizer(prompt)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + a])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return float(sum(logprobs[len(p) - 1 + t, tok] for t, tok in enumerate(a)))


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2", "gpt_neox"])
@pytest.mark.parametrize(
    "answers", [{"a": "a", "b": "b", "c": "z"}, {"a": " ab", "b": " b", "c": " abcd"}]
)
def test_logliks_match_a_forward_pass_per_answer(family: str, answers: dict[str, str]) -> None:
    """One batched pass per prompt (one-token answers), or the prompt once and its answers
    after its cached keys and values, gives each answer's log-likelihood as its own forward
    pass does."""
    model, tok = tiny_model(family), tiny_tokenizer()
    prompts = ["the cat sat", "a much longer prompt: on the mat", "x"]
    ll = answer_logliks(model, tok, prompts, answers, content_free_prompt="n/a", batch_size=2)
    assert ll.labels == tuple(answers)
    for i, prompt in enumerate([*prompts, "n/a"]):
        for j, text in enumerate(answers.values()):
            want = brute_force(model, tok, prompt, text)
            got = ll.loglik[i, j] if i < len(prompts) else ll.content_free[j]
            assert got == pytest.approx(want, abs=1e-4)
    assert list(ll.n_tokens) == [len(a) for a in answers.values()]  # characters here
    if ll.n_tokens.max() > 1:  # " ab" and " b" share the space: told apart by token 2
        assert not np.allclose(ll.first, ll.loglik)
