"""PrunePlan: validation and JSON round trip."""

from __future__ import annotations

import json

import pytest

from fbnprune.plan import PlanError, PrunePlan


def plan(**overrides) -> PrunePlan:
    fields = dict(
        model="m",
        model_type="llama",
        site="hidden",
        fill="mean",
        layer_widths=[4, 6],
        kept=[[0, 3], [1, 2, 5]],
        fill_values=[[0.1, 0.2, 0.3, 0.4], [1e-8, -2.5, 3.0, 0.0, 7.0, 1 / 3]],
        provenance={"budget": 0.5, "seed": 0},
    )
    return PrunePlan(**{**fields, **overrides})


def test_round_trip_is_exact(tmp_path):
    original = plan()
    original.save(tmp_path / "plan.json")
    loaded = PrunePlan.load(tmp_path / "plan.json")
    assert loaded == original
    assert loaded.fill_tensor(1).tolist() == pytest.approx(original.fill_values[1], rel=1e-7)
    assert loaded.n_kept == 5 and loaded.kept_fraction == 0.5
    assert loaded.keep_mask(0).tolist() == [True, False, False, True]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"kept": [[3, 0], [1]]}, "sorted"),
        ({"kept": [[0, 4], [1]]}, "out of range"),
        ({"kept": [[0]]}, "kept lists"),
        ({"fill_values": None}, "needs fill_values"),
        ({"site": "attn"}, "site"),
        ({"fill": "noise"}, "fill"),
    ],
)
def test_inconsistent_plans_are_rejected(overrides, message):
    with pytest.raises(PlanError, match=message):
        plan(**overrides)


def test_corrupt_plan_file(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PlanError, match="cannot read plan"):
        PrunePlan.load(tmp_path / "bad.json")
    data = plan().to_dict()
    data["format_version"] = 99
    (tmp_path / "future.json").write_text(json.dumps(data))
    with pytest.raises(PlanError, match="format_version"):
        PrunePlan.load(tmp_path / "future.json")
