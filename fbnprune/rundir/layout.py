"""``RunLayout``: the one place that knows the names and formats of a run directory's files.

::

    run.json                  ledger: per stage its fingerprint, wall time, peak memory
    recipe.yaml               the recipe, as validated
    documents.json            per task and split, the ids of the documents used
    collect/<task>/           activations.npy, sample_index.npy, meta.json (collect metadata)
                              (activations.zarr/ instead with collect.storage: zarr)
    discover/<task>.npz       ICA scores, z maps, explained variance, scope
    plan.json                 the PrunePlan (beside it plan.refit.safetensors when refit)
    prune.json                sizes and widths of the sliced layouts
    parity.json               the check stage's ParityResult, with checkpoint digests
    checkpoint-<layout>/      a saved checkpoint (padded | compact); -healed when healed
    heal/                     log.json, loss.png, parity.json of the healed checkpoint,
                              teacher.safetensors (the teacher's targets), state.pt
    eval/results.json         the evaluate command's results (and results.md, suite/)
    bench/                    rows.jsonl, suite/, results.json of ``fbnprune bench``
    export-<layout>/          the default folder of ``fbnprune export``
    .staging/                 checkpoints between check and save (one process only)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fbnprune.io import atomic_write_json

if TYPE_CHECKING:
    from fbnprune.parity import ParityResult
    from fbnprune.plan import PrunePlan

RUN_FILE = "run.json"
RECIPE_FILE = "recipe.yaml"
DOCUMENTS_FILE = "documents.json"
PLAN_FILE = "plan.json"
PRUNE_FILE = "prune.json"
PARITY_FILE = "parity.json"
STAGING = ".staging"
COLLECT_DIR, DISCOVER_DIR = "collect", "discover"
ACTIVATIONS_FILE, SAMPLE_INDEX_FILE, COLLECT_META_FILE = (
    "activations.npy",
    "sample_index.npy",
    "meta.json",
)
ACTIVATIONS_STORE = "activations.zarr"  # collect.storage: zarr (fbnprune.collect.store)
HEAL_DIR = "heal"
HEAL_LOG, HEAL_PLOT, HEAL_STATE = "log.json", "loss.png", "state.pt"
HEAL_TARGETS = "teacher.safetensors"
VERDICT_DIR = "verdict"
VERDICT_FILE, VERDICT_TABLE = "verdict.json", "verdict.md"
VERDICT_PREDICTIONS = "predictions.jsonl"
EVAL_DIR, SUITE_DIR = "eval", "suite"
RESULTS_FILE, RESULTS_TABLE = "results.json", "results.md"
BENCH_DIR, BENCH_ROWS = "bench", "rows.jsonl"
EXPORT_PREFIX = "export-"
CHECKPOINT_PREFIX = "checkpoint-"
HEALED_SUFFIX = "-healed"
LAYOUTS = ("padded", "compact")
# the files every saved checkpoint carries beside its weights
CHECKPOINT_PLAN, CHECKPOINT_RECIPE = "fbnprune_plan.json", "fbnprune_recipe.yaml"
CHECKPOINT_PARITY, CHECKPOINT_HEAL = "fbnprune_parity.json", "fbnprune_heal.json"


def checkpoint_name(layout: str, *, healed: bool = False) -> str:
    """``checkpoint-<layout>`` (``-healed`` appended for the healed checkpoint)."""
    return f"{CHECKPOINT_PREFIX}{layout}{HEALED_SUFFIX if healed else ''}"


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run directory's files, and typed reads and writes of them."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # -- paths -----------------------------------------------------------------------------
    @property
    def run_file(self) -> Path:
        return self.root / RUN_FILE

    @property
    def recipe_file(self) -> Path:
        return self.root / RECIPE_FILE

    @property
    def documents_file(self) -> Path:
        return self.root / DOCUMENTS_FILE

    def collect_dir(self, task: str) -> Path:
        return self.root / COLLECT_DIR / task

    def activations_file(self, task: str) -> Path:
        return self.collect_dir(task) / ACTIVATIONS_FILE

    def activations_store(self, task: str) -> Path:
        """The zarr activation store (``collect.storage: zarr``; ``fbnprune.collect.store``)."""
        return self.collect_dir(task) / ACTIVATIONS_STORE

    def collect_meta_file(self, task: str) -> Path:
        return self.collect_dir(task) / COLLECT_META_FILE

    def discover_file(self, task: str) -> Path:
        return self.root / DISCOVER_DIR / f"{task}.npz"

    @property
    def plan_file(self) -> Path:
        return self.root / PLAN_FILE

    @property
    def prune_file(self) -> Path:
        return self.root / PRUNE_FILE

    @property
    def parity_file(self) -> Path:
        return self.root / PARITY_FILE

    def checkpoint_dir(self, layout: str, *, healed: bool = False) -> Path:
        return self.root / checkpoint_name(layout, healed=healed)

    @property
    def staging_root(self) -> Path:
        return self.root / STAGING

    def staging_dir(self, layout: str) -> Path:
        return self.staging_root / f"{CHECKPOINT_PREFIX}{layout}"

    @property
    def heal_dir(self) -> Path:
        return self.root / HEAL_DIR

    @property
    def heal_log_file(self) -> Path:
        return self.heal_dir / HEAL_LOG

    @property
    def heal_plot_file(self) -> Path:
        return self.heal_dir / HEAL_PLOT

    @property
    def heal_state_file(self) -> Path:
        """Healing's resumable training state."""
        return self.heal_dir / HEAL_STATE

    @property
    def heal_targets_file(self) -> Path:
        """The teacher's top-k targets (``fbnprune.heal.distill.save_targets``)."""
        return self.heal_dir / HEAL_TARGETS

    @property
    def verdict_dir(self) -> Path:
        return self.root / VERDICT_DIR

    @property
    def verdict_file(self) -> Path:
        """The verdict stage's scores and flags (``fbnprune.verdict.stage``)."""
        return self.verdict_dir / VERDICT_FILE

    @property
    def verdict_table(self) -> Path:
        return self.verdict_dir / VERDICT_TABLE

    @property
    def verdict_predictions(self) -> Path:
        """Every model's written answer to every generation task's verdict document."""
        return self.verdict_dir / VERDICT_PREDICTIONS

    def read_verdict(self) -> dict[str, Any] | None:
        """The recorded verdict, None when the run has none."""
        file = self.verdict_file
        return json.loads(file.read_text()) if file.is_file() else None

    @property
    def heal_parity_file(self) -> Path:
        return self.heal_dir / PARITY_FILE

    @property
    def eval_dir(self) -> Path:
        return self.root / EVAL_DIR

    @property
    def eval_suite_dir(self) -> Path:
        """The offline lm-eval suite ``fbnprune evaluate`` generates."""
        return self.eval_dir / SUITE_DIR

    @property
    def eval_results_file(self) -> Path:
        return self.eval_dir / RESULTS_FILE

    @property
    def eval_predictions(self) -> Path:
        """Every evaluated model's written answers to the generation tasks."""
        return self.eval_dir / VERDICT_PREDICTIONS

    @property
    def bench_dir(self) -> Path:
        return self.root / BENCH_DIR

    @property
    def bench_rows_file(self) -> Path:
        """One JSON object per finished benchmark variant."""
        return self.bench_dir / BENCH_ROWS

    @property
    def bench_suite_dir(self) -> Path:
        return self.bench_dir / SUITE_DIR

    def bench_site_dir(self, site: str) -> Path:
        """The sub-run of the benchmark's other neuron site."""
        return self.bench_dir / f"site-{site}"

    def export_dir(self, name: str) -> Path:
        """``export-<layout>[-healed]``, the default folder of ``fbnprune export``."""
        return self.root / f"{EXPORT_PREFIX}{name}"

    def relative(self, path: Path) -> str:
        """``path`` inside the run directory, as a POSIX string (``heal/parity.json``)."""
        return path.relative_to(self.root).as_posix()

    def saved_checkpoints(self) -> list[Path]:
        """Every saved ``checkpoint-*/`` folder holding a ``config.json``, sorted by name."""
        return sorted(
            d for d in self.root.glob(f"{CHECKPOINT_PREFIX}*") if (d / "config.json").is_file()
        )

    # -- typed reads and writes ------------------------------------------------------------
    def read_plan(self) -> PrunePlan:
        from fbnprune.plan import PrunePlan

        return PrunePlan.load(self.plan_file)

    def read_parity(self, *, healed: bool = False) -> ParityResult:
        from fbnprune.parity import ParityResult

        file = self.heal_parity_file if healed else self.parity_file
        return ParityResult.from_dict(read_json(file))

    def write_parity(self, result: ParityResult, *, healed: bool = False) -> None:
        atomic_write_json(self.heal_parity_file if healed else self.parity_file, result.to_dict())

    def read_prune_report(self) -> dict[str, Any]:
        return dict(read_json(self.prune_file))

    def write_prune_report(self, report: dict[str, Any]) -> None:
        atomic_write_json(self.prune_file, report)

    def read_collect_meta(self, task: str) -> dict[str, Any]:
        return dict(read_json(self.collect_meta_file(task)))

    def write_collect_meta(self, task: str, meta: dict[str, Any]) -> None:
        atomic_write_json(self.collect_meta_file(task), meta)

    def read_all_collect_meta(self) -> list[dict[str, Any]]:
        """Every task's collect metadata, in the order of the tasks' folder names."""
        files = sorted(self.root.glob("collect/*/meta.json"))
        return [dict(read_json(file)) for file in files]

    def read_documents(self) -> dict[str, Any]:
        return dict(read_json(self.documents_file))

    def write_documents(self, document_ids: dict[str, dict[str, list[str]]]) -> None:
        atomic_write_json(
            self.documents_file,
            {
                "note": "calibration: collect, discover, select, refit; heal: healing only; "
                "heldout: parity check and healing's validation loss. Evaluation documents are "
                "drawn outside all three (eval/suite/manifest.json).",
                "tasks": document_ids,
            },
        )
