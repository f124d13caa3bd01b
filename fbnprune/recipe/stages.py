"""The sections of the stages: collect, discover, select, prune, check, save, heal."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from fbnprune.recipe.base import Allocation, Fill, Layout, Selector, _Additions, _Strict

_PADDED: tuple[Layout, ...] = ("padded",)  # typed: a list literal in a lambda is a list[str]


class CollectConfig(_Additions):
    added = ("precision", "onload", "packing")

    batch_size: int = Field(default=8, ge=1, description="samples (packed rows) per forward pass")
    onload: Literal["full", "sequential"] = Field(
        default="full",
        description="full: the whole model in memory, one forward pass per "
        "batch; sequential: the embeddings, then one decoder layer at a time over every batch, "
        "its weights read from the checkpoint's safetensors files (fbnprune.models.onload), so "
        "memory holds one layer and the batches' hidden states. Same activations, bit for bit",
    )
    packing: bool = Field(
        default=False,
        description="pack short samples into rows of up to the task's max_length tokens, "
        "position ids restarting at each sample and attention kept within it "
        "(fbnprune.packing): fewer padded positions, the same rows of the matrix in the same "
        "order, values equal to float32 rounding; batch_size then counts packed rows. Refused "
        "for a family or attention implementation not verified to pack exactly",
    )
    storage: Literal["memory", "memmap", "zarr"] = Field(
        default="memmap", description="zarr: a chunked on-disk store (fbnprune.scale.store)"
    )
    precision: Literal["float16", "bfloat16", "float32"] | None = Field(
        default=None,
        description="values stored by zarr (None: float16); memory and memmap hold float32",
    )

    @model_validator(mode="after")
    def _precision_needs_zarr(self) -> CollectConfig:
        if self.precision not in (None, "float32") and self.storage != "zarr":
            raise ValueError(
                f"precision {self.precision} needs storage: zarr ({self.storage} holds float32)"
            )
        return self


class DiscoverConfig(_Additions):
    added = ("engine", "memory", "scope")

    n_components: int = Field(default=128, ge=2)
    threshold: float = Field(default=3.6, gt=0)
    max_iter: int = Field(default=400, ge=10)
    tol: float = Field(default=1e-4, gt=0)
    standardize: bool = Field(
        default=False,
        description="divide every neuron by its standard deviation before PCA, so ICA is not "
        "drawn to the loudest neurons",
    )
    engine: Literal["sklearn", "dask"] = Field(
        default="sklearn",
        description="dask: centring and PCA out of core "
        "(fbnprune.scale.discover), on a cluster with fbnprune run --scheduler",
    )
    memory: str = Field(default="4GiB", description="the dask engine's memory budget")
    scope: Literal["group", "layer"] = Field(
        default="group",
        description="group: one ICA over all layers' units; layer: one per layer's units "
        "(fbnprune.layer_ica), each with min(n_components, width - 1, tokens - 1) "
        "components z-scored within the layer, memory holding one layer's block",
    )

    @field_validator("memory")
    @classmethod
    def _size(cls, value: str) -> str:
        from dask.utils import parse_bytes

        try:
            if parse_bytes(value) > 0:
                return value
        except ValueError:
            pass
        raise ValueError(f"memory must be a size such as '4GiB', got {value!r}")


class SelectConfig(_Strict):
    selector: Selector = "ica"
    budget: float = Field(default=0.10, description="fraction of MLP units kept, in (0, 1]")
    allocation: Allocation = "global"
    min_per_layer: float = Field(
        default=0.02, ge=0, lt=1, description="floor on the fraction kept in every layer"
    )
    max_per_layer: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="cap on the fraction kept in any layer (sensitivity allocation)",
    )
    sensitivity_samples: int = Field(
        default=8, ge=1, description="calibration prompts on which each layer's cut is measured"
    )
    sensitivity_power: float = Field(
        default=0.5, ge=0, description="units per layer grow as (KL of cutting it) ** power"
    )

    @field_validator("budget")
    @classmethod
    def _budget_range(cls, value: float) -> float:
        if not 0 < value <= 1:
            raise ValueError(f"budget must be in (0, 1], got {value}")
        return value

    @model_validator(mode="after")
    def _floor_and_cap_fit_the_budget(self) -> SelectConfig:
        if self.min_per_layer > self.budget:
            raise ValueError(
                f"min_per_layer ({self.min_per_layer:g}) is above the budget "
                f"({self.budget:g}): every layer would keep more than the whole "
                "model may; lower min_per_layer or raise the budget"
            )
        if self.max_per_layer < self.budget:
            raise ValueError(
                f"max_per_layer ({self.max_per_layer:g}) is below the budget "
                f"({self.budget:g}): no layer may keep enough to reach it"
            )
        return self


class PruneConfig(_Strict):
    """How dropped units are compensated.

    ``zero`` drops them; ``mean`` adds their calibration mean's contribution to the down
    projection's bias; ``reconstruct`` refits the kept down-projection columns and a bias by
    ridge least squares so the MLP output on the calibration tokens is reproduced
    (``fbnprune.refit``); with ``sequential`` each layer is refit on activations of a model
    whose lower layers are already pruned and refit.
    """

    fill: Fill = "mean"
    ridge: float = Field(
        default=1e-3,
        ge=0,
        description="ridge term of the refit, relative to the mean "
        "diagonal of the kept units' Gram matrix",
    )
    sequential: bool = False


class CheckConfig(_Strict):
    samples: int = Field(default=4, ge=1, description="held-out prompts compared")
    atol: float = Field(
        default=1e-4,
        gt=0,
        description="max |delta logits| allowed: masked vs sliced in float64, and sliced vs "
        "saved-and-reloaded in the model's dtype",
    )


class SaveConfig(_Additions):
    added = ("onload",)

    layouts: list[Layout] = Field(default_factory=lambda: list(_PADDED), min_length=1)
    onload: Literal["full", "sequential"] = Field(
        default="full",
        description="full: prune, check and save hold the model and its slices in memory; "
        "sequential: one decoder layer at a time from the model's safetensors files "
        "(fbnprune.scale): sizes from the empty (meta) model, each block sliced and written "
        "to its own shard, then checked block by block (each MLP in float64 against the "
        "masked MLP; the saved tensors against the slice, bit for bit), so memory holds one "
        "block, or one float64 MLP",
    )


class HealConfig(_Additions):
    """The ``heal`` stage: distil the original model into the sliced one (``fbnprune.heal``).

    ``enabled: null`` (the default) heals when ``select.budget < below_budget``: no structured
    pruning method reports usable models without recovery below ~80% kept (FLAP, LLM-Pruner
    recover at 20% removed), and unhealed fbnprune models of 30% kept and less fall to chance
    on SmolLM2 (see the benchmark in the README).
    """

    added = ("student", "plain_text")

    enabled: bool | None = None
    below_budget: float = Field(default=0.5, gt=0, le=1)
    student: Literal["slice", "checkpoint"] = Field(
        default="slice",
        description="slice: the student is sliced from the original in memory (teacher and "
        "student resident together); checkpoint: the teacher's targets are computed first and "
        "kept on disk, the teacher is freed, and the student is loaded from the checked "
        "checkpoint-<layout>/ (always so under accelerate launch with several processes)",
    )
    method: Literal["full", "lora"] = "full"
    modules: Literal["mlp", "all"] = Field(
        default="mlp", description="linear layers trained: the MLPs' or all of the decoder's"
    )
    steps: int = Field(default=200, ge=1)
    max_tokens: int | None = Field(
        default=None, ge=1, description="stop after training on this many tokens"
    )
    answer_weight: float = Field(
        default=1.0,
        ge=0,
        description="weight of the answer position (the last token of a "
        "multiple-choice task's prompt) against 1 for every other position",
    )
    plain_text: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="share of a multiple-choice task's calibration and healing documents "
        "also distilled as plain text (the document alone, up to max_length tokens, no "
        "answer position): the slice stays a language model of its domain, not only an "
        "answerer of the task's question",
    )
    patience: int | None = Field(
        default=None,
        ge=1,
        description="stop when the validation loss has not improved for "
        "this many evaluations (and keep the best weights)",
    )
    max_minutes: float | None = Field(default=15, gt=0, description="stop after this long")
    lr: float = Field(default=5e-4, gt=0)
    warmup: float = Field(default=0.05, ge=0, lt=1, description="fraction of steps")
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    batch_size: int = Field(default=4, ge=1)
    max_length: int = Field(default=128, ge=8, description="tokens per calibration document")
    top_k: int = Field(default=64, ge=1, description="teacher log-probs kept per position")
    temperature: float = Field(default=1.0, gt=0)
    lora_rank: int = Field(default=16, ge=1)
    lora_alpha: float = Field(default=32, gt=0)
    eval_every: int = Field(default=25, ge=1, description="held-out loss every N steps")
    checkpoint_every: int = Field(default=50, ge=1, description="training state every N steps")
    seed: int = 0

    def active(self, budget: float) -> bool:
        return self.enabled if self.enabled is not None else budget < self.below_budget
