"""Recipes: the validated YAML that drives a run.

A recipe names the model, the tasks and every stage's settings. Unknown keys are errors
(``extra="forbid"``), so a typo never passes silently. ``Recipe.fingerprint`` hashes the
normalised recipe; run directories use per-stage fingerprints to decide what to reuse.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from fbnprune.errors import FbnpruneError
from fbnprune.rundir.runner import digest

RECIPE_VERSION = 1

Site = Literal["hidden", "output"]
Fill = Literal["zero", "mean", "reconstruct"]
Layout = Literal["padded", "compact"]
Allocation = Literal["global", "uniform", "sensitivity"]
Selector = Literal["ica", "magnitude", "random", "wanda"]


class RecipeError(FbnpruneError, ValueError):
    """A recipe that cannot be read or does not validate."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: object) -> object:
        """YAML reads ``true``/``yes``/``on`` as booleans, which pydantic would take as 1:
        ``budget: true`` must not mean 100%."""
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name) if isinstance(name, str) else None
                if isinstance(value, bool) and field and not _takes_bool(field.annotation):
                    raise ValueError(f"{name}: expected a number or text, got the boolean {value}")
        return data


def _takes_bool(annotation: object) -> bool:
    """Whether a field's type admits ``bool`` (``bool``, ``bool | None``, ...)."""
    return annotation is bool or any(_takes_bool(arg) for arg in get_args(annotation))


def _text_slot(value: str) -> str:
    if "{text}" not in value:
        raise ValueError("template must contain the placeholder '{text}'")
    return value


class Wording(_Strict):
    """Another way to ask a task's question: its own template and answer texts per label."""

    name: str = Field(pattern=r"^[A-Za-z0-9_]+$")
    template: str
    choices: dict[str, str] = Field(min_length=2)

    @field_validator("template")
    @classmethod
    def _has_text_slot(cls, value: str) -> str:
        return _text_slot(value)


class TaskConfig(_Strict):
    """One task: where its text comes from and how much of it is used.

    ``source`` is ``builtin:NAME`` (bbc_news, wikipedia, python_code, arithmetic),
    ``file:PATH`` (.txt: one document per blank-line-separated block; .jsonl: one object
    per line), ``hf:DATASET`` (Hugging Face ``datasets``; needs the network) or
    ``lmeval:TASK.yaml`` (a multiple-choice lm-eval task: its ``doc_to_text`` is the prompt,
    its ``doc_to_choice`` the answers, ``doc_to_target`` the label; ``fbnprune.lmeval_tasks``).
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    source: str
    template: str = "{text}"
    text_field: str = "text"
    split: str = "train"
    hf_config: str | None = None
    calibration_samples: int = Field(default=64, ge=1)
    heldout_samples: int = Field(default=16, ge=1)
    heal_samples: int = Field(
        default=0,
        ge=0,
        description="further documents for healing only, disjoint from calibration and "
        "held-out (never evaluated on)",
    )
    max_length: int = Field(default=128, ge=8)
    max_words: int | None = Field(
        default=None,
        ge=1,
        description="cut each document to its first N words before the template is applied, "
        "so the question after {text} survives truncation",
    )
    choices: dict[str, str] | None = Field(
        default=None,
        description="label -> answer text (e.g. {sport: ' sport'}): the task is multiple "
        "choice over these answers, the document's label picks the gold one",
    )
    label_field: str = Field(default="label", description="label key of .jsonl documents")
    wordings: list[Wording] = Field(
        default_factory=list,
        description="other wordings of the same question (template and answers), scored by "
        "evaluate and bench only, so a model tied to one template shows",
    )

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme, sep, rest = value.partition(":")
        if not sep or scheme not in {"builtin", "file", "hf", "lmeval"} or not rest:
            raise ValueError(
                f"source {value!r} must look like 'builtin:NAME', 'file:PATH', 'hf:DATASET' "
                "or 'lmeval:TASK.yaml'"
            )
        return value

    @field_validator("template")
    @classmethod
    def _has_text_slot(cls, value: str) -> str:
        return _text_slot(value)

    @model_validator(mode="after")
    def _wordings_match(self) -> TaskConfig:
        for wording in self.wordings:
            if self.choices is None and self.source.startswith("lmeval:"):
                continue  # the lm-eval task's answers are known once it is loaded
            if self.choices is None or set(wording.choices) != set(self.choices):
                raise ValueError(
                    f"wording {wording.name!r}: its choices must answer the task's labels "
                    f"{sorted(self.choices or {})}, got {sorted(wording.choices)}"
                )
        if len({w.name for w in self.wordings}) != len(self.wordings):
            raise ValueError("wording names must be unique")
        return self


class _Additions(_Strict):
    """A section whose ``added`` fields came after its stage key was defined: they are left
    out of dumps (stage keys, fingerprints, the run's recipe.yaml) while at their defaults, so
    earlier recipes keep their keys and their runs are reused."""

    added: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_default_additions(self, handler: Any) -> Any:
        data = handler(self)
        fields = type(self).model_fields
        for name in self.added:
            if isinstance(data, dict) and getattr(self, name) == fields[name].default:
                data.pop(name, None)
        return data


class CollectConfig(_Additions):
    added = ("precision",)

    batch_size: int = Field(default=8, ge=1)
    storage: Literal["memory", "memmap", "zarr"] = Field(
        default="memmap", description="zarr: a chunked on-disk store (fbnprune.scale.store)"
    )
    precision: Literal["float16", "bfloat16", "float32"] | None = Field(
        default=None, description="values stored by zarr (None: float16); memory and memmap "
        "hold float32",
    )  # fmt: skip

    @model_validator(mode="after")
    def _precision_needs_zarr(self) -> CollectConfig:
        if self.precision not in (None, "float32") and self.storage != "zarr":
            raise ValueError(f"precision {self.precision} needs storage: zarr "
                             f"({self.storage} holds float32)")  # fmt: skip
        return self


class DiscoverConfig(_Additions):
    added = ("engine", "memory")

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
        default="sklearn", description="dask: centring and PCA out of core "
        "(fbnprune.scale.discover), on a cluster with fbnprune run --scheduler",
    )  # fmt: skip
    memory: str = Field(default="4GiB", description="the dask engine's memory budget")

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
        default=1.0, gt=0, le=1, description="cap on the fraction kept in any layer "
        "(sensitivity allocation)",
    )  # fmt: skip
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
            raise ValueError(f"min_per_layer ({self.min_per_layer:g}) is above the budget "
                             f"({self.budget:g}): every layer would keep more than the whole "
                             "model may; lower min_per_layer or raise the budget")  # fmt: skip
        if self.max_per_layer < self.budget:
            raise ValueError(f"max_per_layer ({self.max_per_layer:g}) is below the budget "
                             f"({self.budget:g}): no layer may keep enough to reach it")
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
        default=1e-3, ge=0, description="ridge term of the refit, relative to the mean "
        "diagonal of the kept units' Gram matrix",
    )  # fmt: skip
    sequential: bool = False


class CheckConfig(_Strict):
    samples: int = Field(default=4, ge=1, description="held-out prompts compared")
    atol: float = Field(
        default=1e-4,
        gt=0,
        description="max |delta logits| allowed: masked vs sliced in float64, and sliced vs "
        "saved-and-reloaded in the model's dtype",
    )


class SaveConfig(_Strict):
    layouts: list[Layout] = Field(default_factory=lambda: ["padded"], min_length=1)


class HealConfig(_Strict):
    """The ``heal`` stage: distil the original model into the sliced one (``fbnprune.heal``).

    ``enabled: null`` (the default) heals when ``select.budget < below_budget``: no structured
    pruning method reports usable models without recovery below ~80% kept (FLAP, LLM-Pruner
    recover at 20% removed), and unhealed fbnprune models of 30% kept and less fall to chance
    on SmolLM2 (see the benchmark in the README).
    """

    enabled: bool | None = None
    below_budget: float = Field(default=0.5, gt=0, le=1)
    method: Literal["full", "lora"] = "full"
    modules: Literal["mlp", "all"] = Field(
        default="mlp", description="linear layers trained: the MLPs' or all of the decoder's"
    )
    steps: int = Field(default=200, ge=1)
    max_tokens: int | None = Field(
        default=None, ge=1, description="stop after training on this many tokens"
    )
    answer_weight: float = Field(
        default=1.0, ge=0, description="weight of the answer position (the last token of a "
        "multiple-choice task's prompt) against 1 for every other position",
    )  # fmt: skip
    patience: int | None = Field(
        default=None, ge=1, description="stop when the validation loss has not improved for "
        "this many evaluations (and keep the best weights)",
    )  # fmt: skip
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


EVAL_SUITE_TASKS = ("bbc_topics", "word_problems", "ppl_news", "ppl_wiki", "ppl_code")


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
    seed: int = Field(default=0, description="which documents outside calibration are drawn")


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
    sites: list[Site] = Field(default_factory=lambda: ["hidden", "output"], min_length=1)
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

    budgets: list[float] = Field(default_factory=lambda: [0.05, 0.10, 0.20, 0.30, 0.50],
                                 min_length=1)  # fmt: skip
    selectors: list[Selector] = Field(
        default_factory=lambda: ["ica", "magnitude", "wanda", "random"], min_length=1
    )
    random_seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    fills: list[Fill] = Field(default_factory=lambda: ["zero", "mean"], min_length=1)
    heal_budgets: list[float] = Field(default_factory=lambda: [0.10])
    heal_steps: int | None = Field(default=40, ge=1, description="None: heal.steps")
    heal_seeds: int = Field(
        default=1, ge=1, description="random seeds healed (the random selector's first N)"
    )
    allocations: list[Allocation] | None = Field(
        default=None, description="allocation policies compared (None: the recipe's)"
    )
    output_selectors: list[Selector] = Field(default_factory=lambda: ["ica", "random"])
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


class Recipe(_Strict):
    """A whole run: model, tasks and stage settings."""

    version: Literal[1] = RECIPE_VERSION
    name: str = "fbnprune-run"
    model: str
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    site: Site = "hidden"
    seed: int = 0
    tasks: list[TaskConfig] = Field(min_length=1)
    collect: CollectConfig = CollectConfig()
    discover: DiscoverConfig = DiscoverConfig()
    select: SelectConfig = SelectConfig()
    prune: PruneConfig = PruneConfig()
    check: CheckConfig = CheckConfig()
    save: SaveConfig = SaveConfig()
    heal: HealConfig = HealConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    bench: BenchConfig = BenchConfig()
    analyze: AnalyzeConfig = AnalyzeConfig()

    @field_validator("tasks")
    @classmethod
    def _unique_names(cls, tasks: list[TaskConfig]) -> list[TaskConfig]:
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        return tasks

    def fingerprint(self, *parts: str) -> str:
        """Hash of the given top-level sections (all of them when none are named)."""
        data = self.model_dump(mode="json")
        if parts:
            data = {k: data[k] for k in parts}
        return digest(json.dumps(data, sort_keys=True).encode())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; raise ``RecipeError`` with every problem listed.

    The file must be UTF-8 YAML; a key given twice in one mapping is an error (plain YAML
    would silently keep the last one)."""
    path = Path(path)
    if path.is_dir():
        yamls = sorted(p.name for p in path.glob("*.y*ml"))
        hint = f"; pass one of the recipes in it: {', '.join(yamls)}" if yamls else ""
        raise RecipeError(f"{path} is a directory, not a recipe file{hint}")
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}")
    text = _read_recipe_text(path)
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except _DuplicateKeyError as exc:
        raise RecipeError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping, got {type(raw).__name__}")
    return parse_recipe(_paths_beside(raw, path.parent), origin=str(path))


def _paths_beside(raw: dict, folder: Path) -> dict:
    """Relative ``file:``/``lmeval:`` task sources, resolved against the recipe's folder (not
    the working directory), so a recipe runs the same from anywhere."""
    tasks = raw.get("tasks")
    if not isinstance(tasks, list):
        return raw
    resolved = []
    for task in tasks:
        source = task.get("source") if isinstance(task, dict) else None
        scheme, sep, rest = source.partition(":") if isinstance(source, str) else ("", "", "")
        is_path = scheme == "file" or Path(rest).suffix.lower() in (".yaml", ".yml")
        if sep and scheme in ("file", "lmeval") and is_path and rest and \
                not Path(rest).expanduser().is_absolute():
            task = {**task, "source": f"{scheme}:{(folder / rest).resolve()}"}
        resolved.append(task)
    return {**raw, "tasks": resolved}


def _read_recipe_text(path: Path) -> str:
    """The recipe's text, decoded as UTF-8 (a leading byte-order mark is allowed)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise RecipeError(
            f"{path}: not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start} "
            f"(line {line}) cannot be decoded; save the recipe as UTF-8"
        ) from None


class _DuplicateKeyError(yaml.YAMLError):
    """A mapping key given twice."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode,
                              deep: bool = False) -> dict:  # fmt: skip
    seen: dict[object, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # ``<<: *anchor`` merges; explicit keys may override merged ones
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        try:
            first = seen.get(key)
        except TypeError:
            continue  # unhashable key: construct_mapping reports it
        if first is not None:
            raise _DuplicateKeyError(
                f"duplicate key {key!r} at line {line} (first given at line {first}); YAML "
                "would silently keep the last value: remove one of them"
            )
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                 _construct_unique_mapping)  # fmt: skip


def parse_recipe(raw: dict, *, origin: str = "<recipe>") -> Recipe:
    """Validate a recipe given as a mapping."""
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{origin}: invalid recipe ({exc.error_count()} problem(s)):"]
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = "unknown key (typo?)" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"  - {where}: {msg}")
        raise RecipeError("\n".join(lines)) from None
