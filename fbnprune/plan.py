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
from safetensors.torch import load_file, save_file

from fbnprune.errors import FbnpruneError
from fbnprune.head_cut import HeadCut
from fbnprune.integrity import sha256_file
from fbnprune.io import atomic_write_text
from fbnprune.vocabulary import Vocabulary, VocabularyError

PLAN_FORMAT_VERSION = 1
FILLS = ("zero", "mean", "reconstruct")


class PlanError(FbnpruneError, ValueError):
    """A plan that is inconsistent or does not fit the model it is applied to."""


class RefitError(FbnpruneError, ValueError):
    """A refit that cannot be computed or does not fit its plan."""


@dataclass
class Refit:
    """New down-projection columns for the kept units, and a bias shift, per layer.

    Attributes:
        weights: per layer, float32 tensor of shape (d_model, n_kept): the kept columns.
        biases: per layer, float32 tensor of shape (d_model,): added to the down bias.
        ridge: the relative ridge term the refit was solved with.
    """

    weights: list[torch.Tensor]
    biases: list[torch.Tensor]
    ridge: float

    def save(self, file: Path) -> str:
        """Write a safetensors file (atomically); return its sha256."""
        tensors = {}
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            tensors[f"layer{i}.weight"] = w.contiguous()
            tensors[f"layer{i}.bias"] = b.contiguous()
        tmp = file.with_name(f".{file.name}.tmp")
        save_file(tensors, str(tmp), metadata={"ridge": repr(self.ridge)})
        tmp.replace(file)
        return sha256_file(file)

    @classmethod
    def load(cls, file: Path, n_layers: int, ridge: float) -> Refit:
        tensors = load_file(str(file))
        weights = [tensors[f"layer{i}.weight"] for i in range(n_layers)]
        biases = [tensors[f"layer{i}.bias"] for i in range(n_layers)]
        return cls(weights, biases, ridge)

    def check_fits(self, kept_per_layer: list[int], d_model: int | None = None) -> None:
        shapes = [tuple(w.shape) for w in self.weights]
        counts = [s[1] for s in shapes]
        if counts != list(kept_per_layer):
            raise RefitError(f"refit has {counts} columns per layer, plan keeps {kept_per_layer}")
        if d_model is not None and any(s[0] != d_model for s in shapes):
            raise RefitError(f"refit rows {sorted({s[0] for s in shapes})} != d_model {d_model}")


@dataclass
class PrunePlan:
    """Which MLP units (or output channels) each layer keeps.

    Attributes:
        model: the model name the plan was made for.
        model_type: ``config.model_type`` of that model.
        site: ``hidden`` (MLP intermediate units) or ``output`` (MLP output channels).
        fill: how dropped units are compensated: ``zero``, ``mean`` (calibration mean folded
            into the down bias) or ``reconstruct`` (kept down columns and a bias refit by
            least squares, ``fbnprune.select.refit``; the tensors live in ``refit``).
        layer_widths: units per layer before pruning.
        kept: sorted kept indices per layer.
        fill_values: per layer, the value of every unit when ``fill == "mean"`` (else None).
        provenance: budget, selector, fingerprints, seed, versions, counts.
        vocabulary: with ``prune.vocabulary: task``, the token ids the model keeps
            (``fbnprune.vocabulary.Vocabulary.to_dict``); None keeps them all.
        dropped_layers: with ``select.drop_layers``, the decoder blocks removed whole
            (``fbnprune.pruning.depth``); None keeps them all.
        heads: with ``select.attention_heads``, the query heads and key-value groups each
            layer keeps (``fbnprune.pruning.heads.HeadCut.to_dict``); None keeps them all.
        refit: the refit tensors when ``fill == "reconstruct"``; saved beside the plan's JSON
            (``<plan>.refit.safetensors``, its sha256 in ``provenance["refit"]``).
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
    vocabulary: dict[str, Any] | None = None
    dropped_layers: list[int] | None = None
    heads: dict[str, Any] | None = None
    refit: Refit | None = field(default=None, repr=False, compare=False)

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

    @property
    def budget(self) -> float:
        """The budget the plan was selected for (``select.budget``, or the one chosen by
        ``budget: auto``); the kept fraction when its provenance does not say."""
        value = self.provenance.get("budget")
        return float(value) if isinstance(value, int | float) else self.kept_fraction

    def kept_vocabulary(self) -> Vocabulary | None:
        """The vocabulary cut, or None when the plan keeps every token."""
        return None if self.vocabulary is None else Vocabulary.from_dict(self.vocabulary)

    def head_cut(self) -> HeadCut | None:
        """The attention cut, or None when the plan keeps every head."""
        return None if self.heads is None else HeadCut.from_dict(self.heads)

    def kept_per_layer(self) -> list[int]:
        return [len(k) for k in self.kept]

    def keep_mask(self, layer: int) -> torch.Tensor:
        """Boolean mask over a layer's units, True where kept."""
        mask = torch.zeros(self.layer_widths[layer], dtype=torch.bool)
        mask[torch.tensor(self.kept[layer], dtype=torch.long)] = True
        return mask

    @property
    def adds_bias(self) -> bool:
        """Whether applying the plan adds a constant to the down projection's output."""
        return self.fill in ("mean", "reconstruct")

    def fill_tensor(self, layer: int) -> torch.Tensor:
        """Value of every unit of a layer when dropped (zeros unless ``fill == "mean"``)."""
        if self.fill_values is None:
            return torch.zeros(self.layer_widths[layer])
        return torch.tensor(self.fill_values[layer], dtype=torch.float32)

    # -- checks and IO -----------------------------------------------------------------------
    def validate(self) -> None:
        if self.site not in ("hidden", "output"):
            raise PlanError(f"site must be 'hidden' or 'output', got {self.site!r}")
        if self.fill not in FILLS:
            raise PlanError(f"fill must be one of {', '.join(FILLS)}, got {self.fill!r}")
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
        if self.fill == "reconstruct":
            if self.refit is None:
                raise PlanError("fill 'reconstruct' needs its refit tensors")
            try:
                self.refit.check_fits(self.kept_per_layer())
            except RefitError as exc:
                raise PlanError(str(exc)) from exc

        if self.vocabulary is not None:
            try:
                self.kept_vocabulary()
            except (VocabularyError, KeyError, TypeError) as exc:
                raise PlanError(f"the plan's vocabulary is not valid: {exc}") from exc
        if self.heads is not None:
            try:
                cut = self.head_cut()
            except (KeyError, TypeError, ValueError) as exc:
                raise PlanError(f"the plan's head cut is not valid: {exc}") from exc
            assert cut is not None
            if len(cut.query) != self.n_layers:
                raise PlanError(f"the head cut names {len(cut.query)} layers, not {self.n_layers}")
        if self.dropped_layers is not None:
            layers = self.dropped_layers
            if layers != sorted(set(layers)) or any(not 0 <= i < self.n_layers for i in layers):
                raise PlanError(f"dropped_layers {layers} must be sorted, unique layer numbers")
            if len(layers) >= self.n_layers:
                raise PlanError(f"dropping {len(layers)} of {self.n_layers} layers leaves none")

    def check_fits(self, layer_widths: list[int], model_type: str) -> None:
        """Raise unless this plan was made for a model of these shapes."""
        if model_type != self.model_type or list(layer_widths) != self.layer_widths:
            raise PlanError(
                f"plan is for a {self.model_type} with {self.n_layers} layers of widths "
                f"{sorted(set(self.layer_widths))}; this model is a {model_type} with "
                f"{len(layer_widths)} layers of widths {sorted(set(layer_widths))}"
            )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("refit")
        for cut in ("vocabulary", "dropped_layers", "heads"):
            if data[cut] is None:  # plans without these cuts keep their bytes
                data.pop(cut)
        return data

    def save(self, path: str | Path) -> None:
        """Write the plan's JSON; a refit goes beside it, its digest into the provenance."""
        path = Path(path)
        if self.refit is not None:
            file = refit_file(path)
            self.provenance["refit"] = {
                "file": file.name,
                "sha256": self.refit.save(file),
                "ridge": self.refit.ridge,
            }
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, refit: Refit | None = None) -> PrunePlan:
        version = data.get("format_version")
        if version != PLAN_FORMAT_VERSION:
            raise PlanError(f"unsupported plan format_version {version!r}")
        return cls(**data, refit=refit)

    @classmethod
    def load(cls, path: str | Path) -> PrunePlan:
        """Read a plan (and its refit tensors, checked against the recorded digest)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise PlanError(f"cannot read plan {path}: {exc}") from exc
        refit = None
        if data.get("fill") == "reconstruct":
            refit = _load_refit(path, data)
        try:
            return cls.from_dict(data, refit=refit)
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


def refit_file(plan_path: Path) -> Path:
    """Where a plan's refit tensors are stored: ``plan.json`` -> ``plan.refit.safetensors``."""
    return plan_path.with_name(f"{plan_path.stem}.refit.safetensors")


def _load_refit(path: Path, data: dict[str, Any]) -> Refit:
    info = data.get("provenance", {}).get("refit")
    if not info:
        raise PlanError(f"{path}: fill 'reconstruct' but no refit recorded in its provenance")
    file = path.with_name(info["file"])
    if not file.is_file():
        raise PlanError(f"{path}: its refit tensors {file.name} are missing")
    if sha256_file(file) != info["sha256"]:
        raise PlanError(f"{file}: content differs from the digest recorded in {path.name}")
    return Refit.load(file, len(data["layer_widths"]), info["ridge"])
