"""The PrunePlan: the one hand-off between "what to keep" and "how to cut".

Masking and slicing both consume a plan, which is what makes their parity check meaningful.
A plan is plain JSON: per-layer kept unit indices, the fill value of dropped units, and the
provenance needed to trace it back to its model, recipe and data.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fbnprune.io import atomic_write_text

PLAN_FORMAT_VERSION = 1


class PlanError(ValueError):
    """A plan that is inconsistent or does not fit the model it is applied to."""


@dataclass
class PrunePlan:
    """Which MLP units (or output channels) each layer keeps.

    Attributes:
        model: the model name the plan was made for.
        model_type: ``config.model_type`` of that model.
        site: ``hidden`` (MLP intermediate units) or ``output`` (MLP output channels).
        fill: what dropped units are replaced with: ``zero`` or ``mean`` (calibration mean).
        layer_widths: units per layer before pruning.
        kept: sorted kept indices per layer.
        fill_values: per layer, the value of every unit when ``fill == "mean"`` (else None).
        provenance: budget, selector, fingerprints, seed, versions, counts.
    """

    model: str
    model_type: str
    site: str
    fill: str
    layer_widths: list[int]
    kept: list[list[int]]
    fill_values: list[list[float]] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    format_version: int = PLAN_FORMAT_VERSION

    def __post_init__(self) -> None:
        self.validate()

    # -- derived views ---------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layer_widths)

    @property
    def n_units(self) -> int:
        return sum(self.layer_widths)

    @property
    def n_kept(self) -> int:
        return sum(len(k) for k in self.kept)

    @property
    def kept_fraction(self) -> float:
        return self.n_kept / self.n_units

    def kept_per_layer(self) -> list[int]:
        return [len(k) for k in self.kept]

    def keep_mask(self, layer: int) -> torch.Tensor:
        """Boolean mask over a layer's units, True where kept."""
        mask = torch.zeros(self.layer_widths[layer], dtype=torch.bool)
        mask[torch.tensor(self.kept[layer], dtype=torch.long)] = True
        return mask

    def fill_tensor(self, layer: int) -> torch.Tensor:
        """Value of every unit of a layer when dropped (zeros for ``fill == "zero"``)."""
        if self.fill_values is None:
            return torch.zeros(self.layer_widths[layer])
        return torch.tensor(self.fill_values[layer], dtype=torch.float32)

    # -- checks and IO -----------------------------------------------------------------------
    def validate(self) -> None:
        if self.site not in ("hidden", "output"):
            raise PlanError(f"site must be 'hidden' or 'output', got {self.site!r}")
        if self.fill not in ("zero", "mean"):
            raise PlanError(f"fill must be 'zero' or 'mean', got {self.fill!r}")
        if len(self.kept) != len(self.layer_widths):
            raise PlanError(
                f"plan has {len(self.kept)} kept lists for {len(self.layer_widths)} layers"
            )
        for i, (idx, width) in enumerate(zip(self.kept, self.layer_widths, strict=True)):
            if list(idx) != sorted(set(idx)):
                raise PlanError(f"layer {i}: kept indices must be sorted and unique")
            if idx and (idx[0] < 0 or idx[-1] >= width):
                raise PlanError(f"layer {i}: kept index out of range [0, {width})")
        if self.fill == "mean":
            if self.fill_values is None:
                raise PlanError("fill 'mean' needs fill_values")
            widths = [len(v) for v in self.fill_values]
            if widths != self.layer_widths:
                raise PlanError(f"fill_values widths {widths} != layer widths")

    def check_fits(self, layer_widths: list[int], model_type: str) -> None:
        """Raise unless this plan was made for a model of these shapes."""
        if model_type != self.model_type or list(layer_widths) != self.layer_widths:
            raise PlanError(
                f"plan is for a {self.model_type} with {self.n_layers} layers of widths "
                f"{sorted(set(self.layer_widths))}; this model is a {model_type} with "
                f"{len(layer_widths)} layers of widths {sorted(set(layer_widths))}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrunePlan:
        version = data.get("format_version")
        if version != PLAN_FORMAT_VERSION:
            raise PlanError(f"unsupported plan format_version {version!r}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> PrunePlan:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise PlanError(f"cannot read plan {path}: {exc}") from exc
        try:
            return cls.from_dict(data)
        except TypeError as exc:
            raise PlanError(f"{path}: not a PrunePlan: {exc}") from exc

    def summary(self) -> str:
        per_layer = " ".join(
            f"{len(k) / w:.0%}" for k, w in zip(self.kept, self.layer_widths, strict=True)
        )
        return (
            f"{self.n_kept}/{self.n_units} {self.site} units kept ({self.kept_fraction:.1%}), "
            f"fill={self.fill}; per layer: {per_layer}"
        )
