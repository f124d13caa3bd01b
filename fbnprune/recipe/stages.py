"""The sections of the stages: collect, discover, select, prune, check, save, heal."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from fbnprune.recipe.base import (
    MAX_SEED,
    Allocation,
    Fill,
    Layout,
    Scoring,
    Selector,
    _Additions,
    _Strict,
)

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
        "(fbnprune.collect.packing): fewer padded positions, the same rows of the matrix in "
        "the same order, values equal to float32 rounding; batch_size then counts packed "
        "rows. Refused for a family or attention implementation not verified to pack exactly",
    )
    storage: Literal["memory", "memmap", "zarr"] = Field(
        default="memmap", description="zarr: a chunked on-disk store (fbnprune.collect.store)"
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
        "(fbnprune.discover.dask_ica), on a cluster with fbnprune run --scheduler",
    )
    memory: str = Field(default="4GiB", description="the dask engine's memory budget")
    scope: Literal["group", "layer"] = Field(
        default="group",
        description="group: one ICA over all layers' units; layer: one per layer's units "
        "(fbnprune.discover.layer_ica), each with min(n_components, width - 1, tokens - 1) "
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


class SelectConfig(_Additions):
    added = ("keep_accuracy", "budgets", "search_steps", "drop_layers", "attention_heads")

    selector: Selector = "ica"
    budget: float | Literal["auto"] = Field(
        default=0.10,
        description="fraction of MLP units kept, in (0, 1]; or auto: the smallest of "
        "`budgets` that keeps `keep_accuracy` of the original's held-out accuracy",
    )
    keep_accuracy: float = Field(
        default=0.90,
        gt=0,
        le=1.5,
        description="budget: auto: the share of the original's accuracy on the held-out "
        "documents (under verdict.scoring, the smallest over tasks) a budget must keep",
    )
    budgets: tuple[float, ...] = Field(
        default=(0.05, 0.10, 0.15, 0.20, 0.30, 0.50),
        min_length=1,
        description="budget: auto: the candidates, tried by bisection (kept share assumed "
        "to grow with the budget)",
    )
    search_steps: int = Field(
        default=30,
        ge=0,
        description="budget: auto: healing steps given each candidate before it is scored "
        "(the recipe's heal settings; 0 scores the unhealed slice)",
    )
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
    drop_layers: int = Field(
        default=0,
        ge=0,
        description="decoder blocks removed whole: those whose skipping moves the original's "
        "next-token distribution least (KL on sensitivity_samples calibration prompts; "
        "fbnprune.select.block_skip)",
    )
    attention_heads: int = Field(
        default=0,
        ge=0,
        description="query heads kept in every layer (0: all): whole key-value groups when "
        "it is a multiple of the heads per group, else an equal share of every group; the "
        "heads that write most to the residual stream on the calibration prompts "
        "(fbnprune.select.head_scores)",
    )

    @field_validator("budget")
    @classmethod
    def _budget_range(cls, value: float | str) -> float | str:
        if value != "auto" and not 0 < float(value) <= 1:
            raise ValueError(f"budget must be in (0, 1] or auto, got {value}")
        return value

    @field_validator("budgets")
    @classmethod
    def _budgets_range(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        bad = [b for b in value if not 0 < b <= 1]
        if bad:
            raise ValueError(f"budgets must lie in (0, 1], got {bad}")
        return value

    @property
    def auto(self) -> bool:
        return self.budget == "auto"

    @property
    def fraction(self) -> float:
        """The fixed budget (a ``budget: auto`` selection has none until it is searched)."""
        if isinstance(self.budget, str):
            raise ValueError("budget: auto has no fixed fraction; search it first (at())")
        return float(self.budget)

    def at(self, budget: float) -> SelectConfig:
        """This selection at a fixed ``budget`` (a candidate of ``budget: auto``)."""
        return self.model_copy(update={"budget": budget})

    @model_validator(mode="after")
    def _floor_and_cap_fit_the_budget(self) -> SelectConfig:
        low = min(self.budgets) if self.auto else float(self.budget)
        high = max(self.budgets) if self.auto else float(self.budget)
        if self.min_per_layer > low:
            raise ValueError(
                f"min_per_layer ({self.min_per_layer:g}) is above the budget "
                f"({low:g}): every layer would keep more than the whole "
                "model may; lower min_per_layer or raise the budget"
            )
        if self.max_per_layer < high:
            raise ValueError(
                f"max_per_layer ({self.max_per_layer:g}) is below the budget "
                f"({high:g}): no layer may keep enough to reach it"
            )
        return self


class PruneConfig(_Additions):
    """How dropped units are compensated, and which tokens the model keeps.

    ``zero`` drops them; ``mean`` adds their calibration mean's contribution to the down
    projection's bias; ``reconstruct`` refits the kept down-projection columns and a bias by
    ridge least squares so the MLP output on the calibration tokens is reproduced
    (``fbnprune.select.refit``); with ``sequential`` each layer is refit on activations of a model
    whose lower layers are already pruned and refit.
    """

    added = ("vocabulary",)

    fill: Fill = "mean"
    ridge: float = Field(
        default=1e-3,
        ge=0,
        description="ridge term of the refit, relative to the mean "
        "diagonal of the kept units' Gram matrix",
    )
    sequential: bool = False
    vocabulary: Literal["full", "task"] = Field(
        default="full",
        description="full: every token stays; task: only the tokens of the task's calibration "
        "and healing prompts (every wording, every answer), the special tokens and the byte "
        "pieces any text is written in; the embedding, LM head and tokenizer are cut to them "
        "(fbnprune.pruning.tokenizer_trim), and text with dropped tokens falls back to "
        "smaller kept pieces",
    )


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
        "(fbnprune.save.streamed): sizes from the empty (meta) model, each block sliced and "
        "written to its own shard, then checked block by block (each MLP in float64 against the "
        "masked MLP; the saved tensors against the slice, bit for bit), so memory holds one "
        "block, or one float64 MLP",
    )


class HealConfig(_Additions):
    """The ``heal`` stage: distil the original model into the sliced one (``fbnprune.heal.train``).

    ``enabled: null`` (the default) heals when ``select.budget < below_budget``: no structured
    pruning method reports usable models without recovery below ~80% kept (FLAP, LLM-Pruner
    recover at 20% removed), and unhealed fbnprune models of 30% kept and less fall to chance
    on SmolLM2 (see the benchmark in the README).
    """

    # label_weight is keyed by the heal stage itself (stages.keys.heal_key): healing without
    # it (0) is what ran before it existed
    added = (
        "student",
        "plain_text",
        "corpus",
        "corpus_samples",
        "general_text",
        "label_weight",
        "activation_checkpointing",
    )

    enabled: bool | None = None
    below_budget: float = Field(default=0.5, gt=0, le=1)
    student: Literal["slice", "checkpoint"] = Field(
        default="slice",
        description="slice: the student is sliced from the original in memory, then the "
        "teacher (its targets computed) is freed before training; checkpoint: the teacher is "
        "freed first and the student is loaded from the checked checkpoint-<layout>/, so the "
        "two are never resident together (always so under accelerate launch with several "
        "processes)",
    )
    activation_checkpointing: bool = Field(
        default=False,
        description="keep no decoder block's activations for the backward pass, recompute "
        "them there (transformers' activation checkpointing): the same weights bit for bit, "
        "a fifth less memory in SmolLM2's demo heal, up to ~24% more time",
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
    label_weight: float = Field(
        default=1.0,
        ge=0,
        description="weight of the gold answer's cross-entropy (a labelled multiple-choice "
        "document's answer appended to its prompt) beside the distillation loss: the student "
        "learns the task where the teacher is wrong or leans to one answer; 0 distils only",
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
    corpus: str | None = Field(
        default=None,
        description="unlabelled in-domain text also distilled as plain text (a source like a "
        "task's: file:PATH, builtin:NAME): more text than a small task's documents, so "
        "healing does not over-fit them; a corpus text equal to a held-out document is dropped",
    )
    corpus_samples: int = Field(
        default=200, ge=1, description="documents of heal.corpus used (at most)"
    )
    general_text: float = Field(
        default=0.0,
        ge=0,
        le=4,
        description="general text (packaged Wikipedia passages) also distilled as plain text, "
        "as a share of the tasks' healing texts: the slice stays a language model",
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
    seed: int = Field(default=0, ge=0, le=MAX_SEED)

    def active(self, budget: float) -> bool:
        return self.enabled if self.enabled is not None else budget < self.below_budget


class VerdictConfig(_Strict):
    """The ``verdict`` stage: every multiple-choice task scored on documents outside every
    split (the original, the unhealed and the healed model), with the majority label's rate
    and the spread of the answers; a constant or below-majority model is flagged, and
    ``export`` refuses it without ``--force``; a generation task's written answers scored by
    its metric beside a constant answer's score (``fbnprune.verdict.stage``)."""

    enabled: bool = True
    limit: int = Field(
        default=100, ge=1, description="documents per task outside every split (at most)"
    )
    scoring: Scoring = Field(
        default="calibrated",
        description="how an answer is read off the answers' log-likelihoods, for every model "
        "alike: sum (as shipped: the likeliest answer), mean (per token), byte (per byte), "
        "calibrated (minus a content-free prompt's, 'N/A' as the text), first_token (the "
        "first token that tells the answers apart); the plain sum is reported beside it",
    )
    batch_size: int = Field(default=8, ge=1)
    suggest_budget: bool = Field(
        default=True,
        description="when a fixed budget's shipped model keeps less than select.keep_accuracy "
        "of the original's accuracy, run the budget search of select.budget: auto and say "
        "which budget it would choose (costs a few short heals, only then)",
    )
