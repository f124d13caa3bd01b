"""fill: reconstruct: the least-squares refit, its storage beside the plan, and allocation
by layer sensitivity."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import random_batch, tiny_model, tiny_tokenizer

from fbnprune.collect.activations import collect_activations
from fbnprune.models.adapters import get_adapter
from fbnprune.models.hooks import site_widths
from fbnprune.models.onload import down_weights
from fbnprune.plan import PlanError, PrunePlan, refit_file
from fbnprune.pruning.mask import masked
from fbnprune.pruning.slicing import slice_model
from fbnprune.select.refit import refit_plan, solve_layer
from fbnprune.select.selection import SelectError, allocate, bounded_counts
from fbnprune.select.sensitivity import layer_sensitivity

TEXTS = [f"sample {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(12)]


def activations(model):
    return collect_activations(
        model, tiny_tokenizer(), TEXTS, site="hidden", max_length=48, batch_size=4, progress=False
    )


def mlp_outputs(matrix: np.ndarray, downs: list[np.ndarray], widths: list[int]) -> list:
    bounds = np.cumsum([0, *widths])
    return [
        matrix[:, a:b].astype(np.float64) @ d.T
        for a, b, d in zip(bounds[:-1], bounds[1:], downs, strict=True)
    ]


def test_refit_with_every_unit_kept_and_no_ridge_is_the_original_projection():
    model = tiny_model("llama")
    acts = activations(model)
    downs = down_weights(model)
    bounds = np.cumsum([0, *acts.layer_widths])
    for i, down in enumerate(downs):
        hidden = acts.matrix[:, bounds[i] : bounds[i + 1]]
        v, c = solve_layer([hidden], down, list(range(down.shape[1])), ridge=0.0)
        # the solve is in float64 over float32 activations: agreement to ~1e-8
        np.testing.assert_allclose(v, down, atol=1e-6)
        np.testing.assert_allclose(c, 0.0, atol=1e-6)
        reproduced = hidden.astype(np.float64) @ v.T + c
        np.testing.assert_allclose(reproduced, hidden.astype(np.float64) @ down.T, atol=1e-6)


def test_refit_reconstructs_the_mlp_output_better_than_mean_fill():
    model = tiny_model("llama")
    acts = activations(model)
    widths = acts.layer_widths
    kept = [list(range(0, w, 3)) for w in widths]  # a third of every layer
    refit = refit_plan(model, [acts.matrix], widths, kept, ridge=1e-6)
    downs = down_weights(model)
    targets = mlp_outputs(acts.matrix, downs, widths)
    bounds = np.cumsum([0, *widths])
    means = acts.matrix.mean(axis=0, dtype=np.float64)
    for i, target in enumerate(targets):
        h = acts.matrix[:, bounds[i] : bounds[i + 1]].astype(np.float64)
        k = kept[i]
        ours = h[:, k] @ refit.weights[i].double().numpy().T + refit.biases[i].double().numpy()
        dropped = np.setdiff1d(np.arange(widths[i]), k)
        mean_fill = h[:, k] @ downs[i][:, k].T + downs[i][:, dropped] @ means[bounds[i] + dropped]
        assert np.square(ours - target).mean() < 0.9 * np.square(mean_fill - target).mean()


def test_ridge_shrinks_the_refit():
    model = tiny_model("llama")
    acts = activations(model)
    hidden = acts.matrix[:, : acts.layer_widths[0]]
    down = down_weights(model)[0]
    kept = list(range(0, down.shape[1], 2))
    small = solve_layer([hidden], down, kept, ridge=0.0)[0]
    large = solve_layer([hidden], down, kept, ridge=10.0)[0]
    assert np.linalg.norm(large) < 0.5 * np.linalg.norm(small)


def test_reconstruct_plan_round_trips_and_slices_exactly(tmp_path):
    model = tiny_model("llama")
    acts = activations(model)
    widths = acts.layer_widths
    kept = [[0, 5, 9], list(range(0, widths[1], 2)), [3]]
    refit = refit_plan(model, [acts.matrix], widths, kept, ridge=1e-3)
    plan = PrunePlan(
        model="tiny",
        model_type="llama",
        site="hidden",
        fill="reconstruct",
        layer_widths=widths,
        kept=kept,
        refit=refit,
    )
    plan.save(tmp_path / "plan.json")
    assert refit_file(tmp_path / "plan.json").is_file()
    loaded = PrunePlan.load(tmp_path / "plan.json")
    for a, b in zip(loaded.refit.weights, refit.weights, strict=True):
        assert torch.equal(a, b)
    batch = random_batch()
    with torch.no_grad():
        with masked(model, loaded):
            reference = model(**batch).logits
        sliced = slice_model(copy.deepcopy(model), loaded, layout="compact")
        torch.testing.assert_close(sliced(**batch).logits, reference, atol=1e-5, rtol=0)


def test_a_changed_refit_file_is_refused(tmp_path):
    model = tiny_model("llama")
    acts = activations(model)
    widths = acts.layer_widths
    kept = [[0, 1], [2, 3], [4, 5]]
    plan = PrunePlan(
        model="tiny",
        model_type="llama",
        site="hidden",
        fill="reconstruct",
        layer_widths=widths,
        kept=kept,
        refit=refit_plan(model, [acts.matrix], widths, kept, ridge=1e-3),
    )
    plan.save(tmp_path / "plan.json")
    file = refit_file(tmp_path / "plan.json")
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(PlanError, match="differs from the digest"):
        PrunePlan.load(tmp_path / "plan.json")
    with pytest.raises(PlanError, match="needs its refit"):
        PrunePlan(
            model="tiny",
            model_type="llama",
            site="hidden",
            fill="reconstruct",
            layer_widths=widths,
            kept=kept,
        )


# --- allocation by sensitivity ------------------------------------------------------------


def test_sensitivity_allocation_sums_to_the_budget_within_floor_and_cap():
    rng = np.random.default_rng(0)
    scores = [rng.random(100) for _ in range(6)]
    sensitivity = [0.0, 0.01, 0.1, 1.0, 10.0, 1000.0]
    kept = allocate(
        scores,
        0.2,
        policy="sensitivity",
        min_per_layer=0.05,
        max_per_layer=0.5,
        sensitivity=sensitivity,
        power=1.0,
    )
    counts = [len(k) for k in kept]
    assert sum(counts) == 120
    assert all(5 <= c <= 50 for c in counts)
    assert counts[0] == 5 and counts[-1] == 50  # floor and cap bind at the extremes
    assert counts == sorted(counts)  # more sensitive layers keep more
    for k, s, c in zip(kept, scores, counts, strict=True):  # the top-scoring units of each
        assert sorted(k) == sorted(np.argsort(-s)[:c].tolist())


def test_sensitivity_allocation_with_equal_sensitivities_is_uniform():
    scores = [np.arange(50.0) for _ in range(4)]
    kept = allocate(scores, 0.1, policy="sensitivity", sensitivity=[2.0] * 4)
    assert [len(k) for k in kept] == [5, 5, 5, 5]


def test_an_impossible_cap_is_refused():
    with pytest.raises(SelectError, match="max_per_layer"):
        allocate(
            [np.zeros(10)] * 3, 0.5, policy="sensitivity", max_per_layer=0.3, sensitivity=[1, 1, 1]
        )


def test_bounded_counts_respects_every_bound():
    counts = bounded_counts([1, 1, 100, 1], 40, floors=[2, 2, 2, 2], caps=[20, 20, 12, 20])
    assert sum(counts) == 40 and counts[2] == 12 and all(2 <= c <= 20 for c in counts)


def test_layer_sensitivity_measures_each_layers_cut():
    model = tiny_model("llama")
    widths = site_widths(model, get_adapter(model), "hidden")
    scores = [np.arange(w, dtype=np.float32) for w in widths]
    kl = layer_sensitivity(
        model, tiny_tokenizer(), TEXTS[:4], scores, 0.1, unit_means=None, max_length=48
    )
    assert len(kl) == len(widths) and all(v > 0 for v in kl)
    full = layer_sensitivity(
        model, tiny_tokenizer(), TEXTS[:4], scores, 1.0, unit_means=None, max_length=48
    )
    assert max(full) < 1e-6  # keeping every unit moves nothing


# --- sequential refit ------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gpt2"])
def test_sequential_refit_starts_like_the_plain_one_and_slices_exactly(model_type):
    from fbnprune.select.sequential import sequential_refit

    model = tiny_model(model_type)
    acts = activations(model)
    widths = acts.layer_widths
    kept = [list(range(0, w, 3)) for w in widths]
    plain = refit_plan(model, [acts.matrix], widths, kept, ridge=1e-3)
    seq = sequential_refit(
        model, tiny_tokenizer(), TEXTS, widths, kept, ridge=1e-3, max_length=48, batch_size=4
    )
    # layer 0 sees the same inputs either way; the layers above see the pruned model's
    torch.testing.assert_close(seq.weights[0], plain.weights[0], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(seq.weights[-1], plain.weights[-1], atol=1e-4)
    plan = PrunePlan(
        model="tiny",
        model_type=model_type,
        site="hidden",
        fill="reconstruct",
        layer_widths=widths,
        kept=kept,
        refit=seq,
    )
    batch = random_batch()
    with torch.no_grad():
        with masked(model, plan):
            reference = model(**batch).logits
        sliced = slice_model(copy.deepcopy(model), plan, layout="compact")
        torch.testing.assert_close(sliced(**batch).logits, reference, atol=1e-5, rtol=0)


def test_sequential_refit_with_every_unit_kept_is_the_original_projection():
    from fbnprune.select.sequential import sequential_refit

    model = tiny_model("llama")
    widths = site_widths(model, get_adapter(model), "hidden")
    kept = [list(range(w)) for w in widths]
    seq = sequential_refit(
        model, tiny_tokenizer(), TEXTS, widths, kept, ridge=0.0, max_length=48, batch_size=4
    )
    for w, d in zip(seq.weights, down_weights(model), strict=True):
        np.testing.assert_allclose(w.numpy(), d, atol=1e-4)
