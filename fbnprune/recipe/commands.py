"""The sections of the commands beside a run: evaluate, analyze, bench."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from fbnprune.recipe.base import Allocation, Fill, Layout, Selector, Site, _Strict

EVAL_SUITE_TASKS = ("bbc_topics", "word_problems", "ppl_news", "ppl_wiki", "ppl_code")

# defaults of list fields, typed (a list literal in a lambda would be a list[str])
_SITES: tuple[Site, ...] = ("hidden", "output")
_BENCH_SELECTORS: tuple[Selector, ...] = ("ica", "magnitude", "wanda", "random")
_BENCH_FILLS: tuple[Fill, ...] = ("zero", "mean")
_OUTPUT_SELECTORS: tuple[Selector, ...] = ("ica", "random")


class EvaluateConfig(_Strict):
    """``fbnprune evaluate``: lm-eval tasks and settings (see ``fbnprune.evaluate``).

    ``tasks`` names tasks of the generated offline suite (``EVAL_SUITE_TASKS``), of YAML
    files under ``include_paths``, or built-in lm-eval tasks (those need the network).
    """

    tasks: list[str] | None = Field(
        default=None,
        min_length=1,
        description="None: the recipe's own multiple-choice tasks (every wording) and the "
        "suite's perplexity tasks (the whole suite when the recipe has no such task)",
    )
    include_paths: list[str] = Field(default_factory=list)
    limit: int | None = Field(default=None, ge=1, description="documents per task (all if None)")
    batch_size: int = Field(default=8, ge=1)
    max_length: int | None = Field(
        default=None, ge=16, description="context window; the model's own if None"
    )
    choice_samples: int = Field(
        default=100, ge=1, description="documents per multiple-choice suite task"
    )
    perplexity_samples: int = Field(
        default=20, ge=1, description="documents per perplexity suite task"
    )
    perplexity_max_words: int = Field(
        default=256, ge=8, description="perplexity documents are cut to this"
    )
    seed: int = Field(default=0, description="which documents outside the run's splits are drawn")


ShortSamples = Literal["merge", "reduce", "skip"]


class AnalyzeConfig(_Strict):
    """``fbnprune analyze``: templates and recurrence, lesions, preservation curve (see
    ``fbnprune.analyze``). Network threshold and FastICA settings come from ``discover``."""

    samples: int = Field(
        default=100,
        ge=2,
        description="samples per task for the templates, and as many other samples for "
        "individual ICA",
    )
    n_templates: int = Field(default=10, ge=2, description="group-ICA components (templates)")
    iou_threshold: float = Field(
        default=0.2, ge=0, lt=1, description="IoU above which an individual network matches"
    )
    short_samples: ShortSamples = Field(
        default="merge",
        description="individual ICA on a sample with fewer than "
        "min_tokens_per_component * n_templates tokens: merge it with the next short samples, "
        "reduce its number of components, or skip it",
    )
    min_tokens_per_component: float = Field(default=4.0, ge=1.5)
    sites: list[Site] = Field(default_factory=lambda: list(_SITES), min_length=1)
    preserve_components: list[int] = Field(
        default_factory=lambda: [10, 64, 128, 256, 512],
        min_length=1,
        description="n_components of the preservation curve",
    )
    metric_tasks: list[str] | None = Field(
        default=None,
        description="tasks whose metric is measured under lesions and preservation "
        "(None: the first task; ['all']: every task; []: none)",
    )
    eval_docs: int = Field(default=50, ge=1, description="documents scored per metric task")
    random_fraction: float = Field(default=0.15, gt=0, lt=1)
    random_seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    batch_size: int = Field(default=8, ge=1)

    @field_validator("preserve_components")
    @classmethod
    def _components(cls, value: list[int]) -> list[int]:
        if min(value) < 2:
            raise ValueError(f"every n_components must be at least 2, got {value}")
        return sorted(set(value))

    @field_validator("sites", "random_seeds")
    @classmethod
    def _unique(cls, value: list) -> list:
        if len(set(value)) != len(value):
            raise ValueError(f"values must be unique, got {value}")
        return value


class BenchConfig(_Strict):
    """``fbnprune bench``: the grid of selections scored against the original.

    Every (selector, seed, budget, fill) is sliced (``layout``; exact, see ``check``) and
    scored on ``tasks``; the ``heal_budgets`` also get a healed variant (the recipe's
    ``heal`` settings, ``heal_steps`` steps, the recipe's fill); the ``output`` site is
    masked at the same budgets for ``output_selectors``. The defaults fit the demo recipe
    in 45 minutes on 2 CPU cores (README, Benchmarks).
    """

    budgets: list[float] = Field(
        default_factory=lambda: [0.05, 0.10, 0.20, 0.30, 0.50], min_length=1
    )
    selectors: list[Selector] = Field(default_factory=lambda: list(_BENCH_SELECTORS), min_length=1)
    random_seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    fills: list[Fill] = Field(default_factory=lambda: list(_BENCH_FILLS), min_length=1)
    heal_budgets: list[float] = Field(default_factory=lambda: [0.10])
    heal_steps: int | None = Field(default=40, ge=1, description="None: heal.steps")
    heal_seeds: int = Field(
        default=1,
        ge=1,
        description="healed runs per selector and heal budget, run i with heal.seed + i "
        "(the random selector also with its i-th selection seed)",
    )
    allocations: list[Allocation] | None = Field(
        default=None, description="allocation policies compared (None: the recipe's)"
    )
    output_selectors: list[Selector] = Field(default_factory=lambda: list(_OUTPUT_SELECTORS))
    tasks: list[str] | None = Field(
        default=None,
        min_length=1,
        description="None: the recipe's own multiple-choice tasks (every wording) and "
        "ppl_news (bbc_topics and ppl_news when the recipe has none)",
    )
    limit: int | None = Field(default=50, ge=1, description="documents per task")
    layout: Layout = "compact"
    cost: bool = True
    cost_repeats: int = Field(default=5, ge=1)

    @field_validator("budgets", "heal_budgets")
    @classmethod
    def _fractions(cls, values: list[float]) -> list[float]:
        bad = [v for v in values if not 0 < v <= 1]
        if bad:
            raise ValueError(f"budgets must be in (0, 1], got {bad}")
        return sorted(set(values))
