"""Selection: exact budgets, allocation policies, floors, scorers."""

from __future__ import annotations

import numpy as np
import pytest

from fbnprune.select.selection import (
    SelectError,
    allocate,
    column_means,
    magnitude_scores,
    random_scores,
)


def scores(widths=(100, 50, 150), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.random(w).astype(np.float32) for w in widths]


@pytest.mark.parametrize("policy", ["global", "uniform"])
@pytest.mark.parametrize("budget", [0.01, 0.1, 0.333, 1.0])
def test_budget_is_exact(policy, budget):
    kept = allocate(scores(), budget, policy=policy, min_per_layer=0.0)
    assert sum(map(len, kept)) == max(1, round(budget * 300))
    for k, w in zip(kept, (100, 50, 150), strict=True):
        assert k == sorted(set(k)) and all(0 <= i < w for i in k)


def test_global_takes_the_top_scores():
    layer_scores = [np.array([0.9, 0.1, 0.8]), np.array([0.7, 0.95])]
    assert allocate(layer_scores, 0.6, policy="global") == [[0, 2], [1]]


def test_global_can_empty_a_layer_but_the_floor_prevents_it():
    layer_scores = [np.full(100, 0.01), np.linspace(1, 2, 100)]
    assert allocate(layer_scores, 0.1, policy="global")[0] == []
    kept = allocate(layer_scores, 0.1, policy="global", min_per_layer=0.03)
    assert len(kept[0]) == 3 and sum(map(len, kept)) == 20


def test_uniform_keeps_the_same_fraction_per_layer():
    kept = allocate(scores((100, 200, 100)), 0.1, policy="uniform")
    assert list(map(len, kept)) == [10, 20, 10]


def test_bad_budgets_and_floors():
    with pytest.raises(SelectError, match="budget"):
        allocate(scores(), 0.0)
    with pytest.raises(SelectError, match="budget"):
        allocate(scores(), 1.5)
    with pytest.raises(SelectError, match="floor"):
        allocate(scores(), 0.01, min_per_layer=0.5)


def test_scorers_on_known_matrix():
    matrix = np.array([[1.0, -2.0, 0.0], [3.0, 2.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(magnitude_scores(matrix, chunk=1), [2.0, 2.0, 0.0])
    np.testing.assert_allclose(column_means(matrix, chunk=1), [2.0, 0.0, 0.0])
    assert sorted(random_scores(5, seed=3).tolist()) == [0, 1, 2, 3, 4]
    assert (random_scores(50, 3) == random_scores(50, 3)).all()
    assert (random_scores(50, 3) != random_scores(50, 4)).any()
