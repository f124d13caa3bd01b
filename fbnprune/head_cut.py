"""The attention cut: which query heads and key-value groups each layer keeps.

A ``HeadCut`` names, per layer, the kept query heads and the kept key-value groups; every kept
query head belongs to a kept group and every kept group keeps as many query heads, so grouped
attention pairs them as before, and every layer keeps the same counts, so a stock config
(``num_attention_heads``, ``num_key_value_heads``, ``head_dim``) describes the result. The plan
records it (``PrunePlan.heads``); ``fbnprune.pruning.heads`` masks and slices it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fbnprune.errors import FbnpruneError


class HeadError(FbnpruneError, ValueError):
    """Attention heads that cannot be cut as asked."""


@dataclass(frozen=True)
class HeadShape:
    """A model's attention: query heads, key-value groups and the size of a head."""

    query: int
    groups: int
    head_dim: int

    @property
    def per_group(self) -> int:
        return self.query // self.groups


@dataclass(frozen=True)
class HeadCut:
    """Per layer, the kept query heads and key-value groups (sorted), and the head size."""

    query: list[list[int]]
    groups: list[list[int]]
    head_dim: int

    def check(self, shape: HeadShape, n_layers: int) -> None:
        """Raise unless the cut fits ``shape`` in ``n_layers`` layers and keeps a stock
        config valid (equal counts in every layer, equal query heads per kept group)."""
        if len(self.query) != n_layers or len(self.groups) != n_layers:
            raise HeadError(
                f"the head cut names {len(self.query)} layers, the model has {n_layers}"
            )
        if self.head_dim != shape.head_dim:
            raise HeadError(f"the head cut is for heads of {self.head_dim}, not {shape.head_dim}")
        counts = {(len(q), len(g)) for q, g in zip(self.query, self.groups, strict=True)}
        if len(counts) != 1:
            raise HeadError(f"every layer must keep as many heads and groups, got {counts}")
        for layer, (query, groups) in enumerate(zip(self.query, self.groups, strict=True)):
            if query != sorted(set(query)) or groups != sorted(set(groups)) or not groups:
                raise HeadError(f"layer {layer}: kept heads and groups must be sorted and unique")
            if query[-1] >= shape.query or groups[-1] >= shape.groups or query[0] < 0:
                raise HeadError(f"layer {layer}: a kept head or group is out of range")
            owners = [h // shape.per_group for h in query]
            if sorted(set(owners)) != groups or len(query) % len(groups):
                raise HeadError(f"layer {layer}: kept heads {query} do not fill groups {groups}")
            if any(owners.count(g) != len(query) // len(groups) for g in groups):
                raise HeadError(f"layer {layer}: kept groups keep unequal numbers of heads")

    def to_dict(self) -> dict[str, Any]:
        return {"query": self.query, "groups": self.groups, "head_dim": self.head_dim}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeadCut:
        return cls(
            [list(q) for q in data["query"]],
            [list(g) for g in data["groups"]],
            int(data["head_dim"]),
        )
