"""``check_parity``: logits compared at real tokens only, against a stated tolerance, under the
reference's context; the report and the result it feeds pass or fail on those numbers."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from fbnprune.check.compare import check_parity, real_token_logits
from fbnprune.collect.activations import iter_batches, token_batches, tokenize
from fbnprune.parity import ParityError, ParityResult

PROMPTS = ["the cat sat on the mat", "a b", "numbers 1 2 3 and more words here"]


def nudged(model: torch.nn.Module, by: float) -> torch.nn.Module:
    """A copy whose final norm weight is scaled by ``1 + by`` (every logit moves)."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.norm.weight.mul_(1 + by)
    return other


def test_a_copy_passes_exactly_and_a_nudged_copy_fails_by_its_delta():
    model = tiny_model("llama").eval()
    report = check_parity(
        ("original", model, None),
        {"copy": copy.deepcopy(model), "nudged": nudged(model, 1e-2)},
        tiny_tokenizer(),
        PROMPTS,
        atol=1e-6,
        max_length=16,
    )
    copy_, moved = report.comparisons
    assert copy_.max_abs == 0.0 and copy_.passed
    assert moved.max_abs > 1e-6 and not moved.passed and not report.passed
    # every real token counted once, padding never: the shortest prompt pads in its batch
    assert report.n_tokens == sum(min(len(tiny_tokenizer()(p).input_ids), 16) for p in PROMPTS)
    result = ParityResult([report])
    with pytest.raises(ParityError, match="nudged"):
        result.raise_if_failed()


def test_padding_does_not_change_the_logits_compared():
    model = tiny_model("llama").eval()
    tok = tiny_tokenizer()
    together = real_token_logits(model, token_batches(tok, PROMPTS, 16, 3))  # padded batch
    lengths = [len(ids) for ids in tokenize(tok, PROMPTS, 16)]
    order = [i for batch in iter_batches(lengths, 3) for i in batch]  # the batch's order
    alone = [real_token_logits(model, token_batches(tok, [PROMPTS[i]], 16, 1)) for i in order]
    assert min(lengths) < max(lengths)  # the short row carries padding
    torch.testing.assert_close(together, torch.cat(alone), rtol=0, atol=1e-5)


def test_the_reference_runs_inside_its_context_and_gating_decides():
    model = tiny_model("llama").eval()
    entered = []

    @contextlib.contextmanager
    def as_nudged():
        entered.append(True)
        with torch.no_grad():
            model.model.norm.weight.mul_(1.01)
        try:
            yield
        finally:
            with torch.no_grad():
                model.model.norm.weight.div_(1.01)

    target = nudged(model, 1e-2)
    report = check_parity(
        ("nudged", model, as_nudged), {"target": target}, tiny_tokenizer(), PROMPTS, atol=1e-5
    )
    # the reference was the nudged model: its context entered for each prompt's batch only
    assert entered == [True] * len(PROMPTS) and report.passed
    info = check_parity(
        ("plain", model, None), {"target": target}, tiny_tokenizer(), PROMPTS, gating=False
    )
    assert not info.passed and ParityResult([report, info]).passed  # for information only


def test_batch_by_batch_figures_are_the_whole_tensors_and_nan_fails():
    model = tiny_model("llama").eval()
    other = nudged(model, 1e-3)
    tok = tiny_tokenizer()
    report = check_parity(
        ("original", model, None),
        {"nudged": other},
        tok,
        PROMPTS,
        atol=1.0,
        max_length=16,
        batch_size=1,  # three batches, reduced one at a time
    )
    batches = token_batches(tok, PROMPTS, 16, 1)
    delta = (real_token_logits(other, batches) - real_token_logits(model, batches)).abs()
    (moved,) = report.comparisons
    assert moved.max_abs == float(delta.max())  # the largest is the largest, bit for bit
    assert moved.mean_abs == pytest.approx(float(delta.double().mean()), rel=1e-12)
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.model.norm.weight[0] = float("nan")
    nan = check_parity(
        ("original", model, None), {"broken": broken}, tok, PROMPTS, atol=1.0, max_length=16
    )
    assert not nan.passed and nan.comparisons[0].max_abs != nan.comparisons[0].max_abs
