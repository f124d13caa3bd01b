"""The size of a model: unique parameters (tied weights counted once) and their bytes."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class CheckpointSize:
    """Parameters and bytes of a model or a saved checkpoint."""

    parameters: int
    bytes: int

    def __str__(self) -> str:
        return f"{self.parameters / 1e6:.2f} M params, {self.bytes / 2**20:.1f} MiB"


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    seen = {id(p): p.numel() for p in model.parameters()}
    return sum(seen.values())


def model_size(model: nn.Module) -> CheckpointSize:
    unique = {id(p): p for p in model.parameters()}.values()
    return CheckpointSize(
        parameters=sum(p.numel() for p in unique),
        bytes=sum(p.numel() * p.element_size() for p in unique),
    )
