"""The vocabulary cut: which token ids a task model keeps.

A ``Vocabulary`` is the sorted list of the original ids that stay; new id ``i`` is old id
``kept[i]``. The plan records it (``PrunePlan.vocabulary``); ``fbnprune.pruning.embedding``
cuts the model's rows and ``fbnprune.pruning.tokenizer_trim`` the tokenizer to it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from fbnprune.errors import FbnpruneError


class VocabularyError(FbnpruneError, ValueError):
    """A vocabulary cut that cannot be applied as asked."""


@dataclass(frozen=True)
class Vocabulary:
    """The ids a trimmed model keeps.

    Attributes:
        kept: the original ids that stay, sorted; new id ``i`` is ``kept[i]``.
        original_size: the original model's vocabulary (embedding rows).
    """

    kept: tuple[int, ...]
    original_size: int

    def __post_init__(self) -> None:
        if list(self.kept) != sorted(set(self.kept)):
            raise VocabularyError("the kept token ids must be sorted and unique")
        if self.kept and (self.kept[0] < 0 or self.kept[-1] >= self.original_size):
            raise VocabularyError(f"a kept token id is outside [0, {self.original_size})")

    @classmethod
    def of(cls, ids: Iterable[int], original_size: int) -> Vocabulary:
        return cls(tuple(sorted(set(int(i) for i in ids))), original_size)

    @property
    def size(self) -> int:
        return len(self.kept)

    @property
    def to_old(self) -> torch.Tensor:
        """new id -> old id."""
        return torch.tensor(self.kept, dtype=torch.long)

    @property
    def to_new(self) -> torch.Tensor:
        """old id -> new id, -1 for a dropped one."""
        table = torch.full((self.original_size,), -1, dtype=torch.long)
        table[self.to_old] = torch.arange(self.size)
        return table

    def new_ids(self, old: torch.Tensor) -> torch.Tensor:
        """The new ids of ``old`` ids; ``VocabularyError`` if any was dropped."""
        new = self.to_new[old]
        if bool((new < 0).any()):
            dropped = sorted(set(old[new < 0].tolist()))[:5]
            raise VocabularyError(f"token ids {dropped} are not in the trimmed vocabulary")
        return new

    def new_id(self, old: int) -> int:
        return int(self.new_ids(torch.tensor([old]))[0])

    def to_dict(self) -> dict[str, Any]:
        return {"original_size": self.original_size, "kept": list(self.kept)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Vocabulary:
        return cls(tuple(data["kept"]), int(data["original_size"]))
