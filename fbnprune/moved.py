"""Old import paths, kept working after the package took one folder per stage family.

A module that moved is the same module object under its old name (``fbnprune.mask`` is
``fbnprune.pruning.mask``), through a finder that knows only the names below; a package that
replaced a module (``fbnprune.collect`` was ``collect.py``) forwards that module's public
names on first use (``fbnprune.collect.Activations``). New code imports the new paths.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
from collections.abc import Callable, Sequence
from importlib.machinery import ModuleSpec
from typing import Any

# old module -> the module that holds its code now
MODULES: dict[str, str] = {
    "fbnprune.packing": "fbnprune.collect.packing",
    "fbnprune.scale.store": "fbnprune.collect.store",
    "fbnprune.scale.collect": "fbnprune.collect.to_store",
    "fbnprune.stages.collect": "fbnprune.collect.stage",
    "fbnprune.layer_ica": "fbnprune.discover.layer_ica",
    "fbnprune.scale.discover": "fbnprune.discover.dask_ica",
    "fbnprune.stages.discover": "fbnprune.discover.stage",
    "fbnprune.sensitivity": "fbnprune.select.sensitivity",
    "fbnprune.refit": "fbnprune.select.refit",
    "fbnprune.sequential": "fbnprune.select.sequential",
    "fbnprune.budget": "fbnprune.select.budget",
    "fbnprune.stages.calibration": "fbnprune.select.calibration",
    "fbnprune.stages.select": "fbnprune.select.stage",
    "fbnprune.mask": "fbnprune.pruning.mask",
    "fbnprune.slicing": "fbnprune.pruning.slicing",
    "fbnprune.stages.prune": "fbnprune.pruning.stage",
    "fbnprune.scale.layer_check": "fbnprune.check.layer_check",
    "fbnprune.stages.check": "fbnprune.check.stage",
    "fbnprune.scale.stream_save": "fbnprune.save.streamed",
    "fbnprune.stages.save": "fbnprune.save.stage",
    "fbnprune.heal_state": "fbnprune.heal.state",
    "fbnprune.distill": "fbnprune.heal.distill",
    "fbnprune.stages.heal_launch": "fbnprune.heal.launch",
    "fbnprune.stages.heal": "fbnprune.heal.stage",
    "fbnprune.stages.verdict": "fbnprune.verdict.stage",
    "fbnprune.stages.questions": "fbnprune.evaluate.questions",
    "fbnprune.stages.keys": "fbnprune.rundir.keys",
    "fbnprune.stages.pipeline": "fbnprune.pipeline",
    "fbnprune.evaluate.run": "fbnprune.evaluate.run_eval",
    "fbnprune.analyze.run": "fbnprune.analyze.study",
    "fbnprune.bench.run": "fbnprune.bench.scoring",
    "fbnprune.bench.report": "fbnprune.bench.summary",
    "fbnprune.data.tasks": "fbnprune.data.task_text",
    "fbnprune.publish.export": "fbnprune.publish.folder",
    "fbnprune.cli.stages": "fbnprune.cli.stage_commands",
}
# old packages that are gone; their modules are in MODULES
PACKAGES = ("fbnprune.stages", "fbnprune.scale")

# package that replaced a module -> {each of that module's public names: where it is now}
FORWARDED: dict[str, dict[str, str]] = {
    "fbnprune.collect": {
        "ACTIVATIONS_FILE": "fbnprune.collect.activations",
        "Activations": "fbnprune.collect.activations",
        "Batch": "fbnprune.collect.activations",
        "CollectError": "fbnprune.collect.activations",
        "FbnpruneError": "fbnprune.errors",
        "LayerwiseModel": "fbnprune.models.onload",
        "SAMPLE_INDEX_FILE": "fbnprune.collect.activations",
        "SiteHooks": "fbnprune.models.hooks",
        "capture_layer_calls": "fbnprune.models.layercalls",
        "check_packable": "fbnprune.collect.packing",
        "collect_activations": "fbnprune.collect.activations",
        "collect_bar": "fbnprune.collect.activations",
        "get_adapter": "fbnprune.models.adapters",
        "iter_batches": "fbnprune.collect.activations",
        "layer_rows": "fbnprune.collect.activations",
        "length_order": "fbnprune.collect.packing",
        "model_batches": "fbnprune.collect.activations",
        "model_of": "fbnprune.collect.activations",
        "packed_batches": "fbnprune.collect.packing",
        "pad_batch": "fbnprune.collect.activations",
        "row_blocks": "fbnprune.collect.activations",
        "sample_rows": "fbnprune.collect.activations",
        "site_hook": "fbnprune.models.hooks",
        "site_widths": "fbnprune.models.hooks",
        "token_batches": "fbnprune.collect.activations",
        "tokenize": "fbnprune.collect.activations",
    },
    "fbnprune.discover": {
        "DiscoverError": "fbnprune.discover.group_ica",
        "FbnpruneError": "fbnprune.errors",
        "GroupICA": "fbnprune.discover.group_ica",
        "ICAParams": "fbnprune.discover.group_ica",
        "MIN_TOKENS_PER_COMPONENT": "fbnprune.discover.group_ica",
        "check_size": "fbnprune.discover.group_ica",
        "ica_feasible": "fbnprune.discover.group_ica",
        "ica_maps": "fbnprune.discover.group_ica",
    },
    "fbnprune.select": {
        "ACTIVATION_SCORERS": "fbnprune.select.selection",
        "FbnpruneError": "fbnprune.errors",
        "LayerwiseModel": "fbnprune.models.onload",
        "ModelSource": "fbnprune.select.selection",
        "SelectError": "fbnprune.select.selection",
        "allocate": "fbnprune.select.selection",
        "bounded_counts": "fbnprune.select.selection",
        "column_means": "fbnprune.select.selection",
        "down_projections": "fbnprune.models.onload",
        "layer_bounds": "fbnprune.select.selection",
        "magnitude_scores": "fbnprune.select.selection",
        "random_scores": "fbnprune.select.selection",
        "rms_scores": "fbnprune.select.selection",
        "top_indices": "fbnprune.select.selection",
        "unit_scores": "fbnprune.select.selection",
        "wanda_scores": "fbnprune.select.selection",
    },
    "fbnprune.check": {
        "Comparison": "fbnprune.parity",
        "ParityError": "fbnprune.parity",
        "ParityReport": "fbnprune.parity",
        "ParityResult": "fbnprune.parity",
        "check_parity": "fbnprune.check.compare",
        "real_token_logits": "fbnprune.check.compare",
        "token_batches": "fbnprune.collect.activations",
    },
    "fbnprune.save": {
        "COMPACT_AUTO_MAP": "fbnprune.save.checkpoint",
        "COMPACT_CLASS": "fbnprune.save.checkpoint",
        "COMPACT_KEY": "fbnprune.pruning.slicing",
        "CheckpointSize": "fbnprune.models.size",
        "MODELING_FILE": "fbnprune.save.checkpoint",
        "atomic_directory": "fbnprune.io",
        "checkpoint_bytes": "fbnprune.save.checkpoint",
        "count_parameters": "fbnprune.models.size",
        "model_size": "fbnprune.models.size",
        "save_checkpoint": "fbnprune.save.checkpoint",
        "stock_class": "fbnprune.save.checkpoint",
        "write_modeling_file": "fbnprune.save.checkpoint",
    },
    "fbnprune.heal": {
        "EarlyStopping": "fbnprune.heal.state",
        "HealConfig": "fbnprune.recipe.stages",
        "HealError": "fbnprune.heal.distill",
        "HealLog": "fbnprune.heal.state",
        "Targets": "fbnprune.heal.distill",
        "TeacherTargets": "fbnprune.heal.distill",
        "any_process": "fbnprune.accel",
        "get_adapter": "fbnprune.models.adapters",
        "heal_loss": "fbnprune.heal.distill",
        "heal_model": "fbnprune.heal.train",
        "is_fsdp": "fbnprune.accel",
        "load_state": "fbnprune.heal.state",
        "make_accelerator": "fbnprune.accel",
        "mean_over_processes": "fbnprune.accel",
        "plot_loss": "fbnprune.heal.state",
        "prepare_targets": "fbnprune.heal.distill",
        "save_state": "fbnprune.heal.state",
        "trainable_linears": "fbnprune.heal.train",
    },
}


class _OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old module paths (and only those) and loads them as their new modules."""

    def __init__(self) -> None:
        self._own_specs: dict[str, ModuleSpec | None] = {}

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname in MODULES or fullname in PACKAGES:
            return importlib.util.spec_from_loader(fullname, self, is_package=fullname in PACKAGES)
        return None

    def create_module(self, spec: ModuleSpec) -> types.ModuleType:
        if spec.name in PACKAGES:
            return types.ModuleType(spec.name, "Moved: see fbnprune.moved.")
        module = importlib.import_module(MODULES[spec.name])
        self._own_specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        # the import system gave the module the old name's spec: give it back its own
        assert module.__spec__ is not None
        own = self._own_specs.pop(module.__spec__.name, None)
        if own is not None:
            module.__spec__ = own


def install() -> None:
    """Put the old-path finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, _OldPaths) for finder in sys.meta_path):
        sys.meta_path.insert(0, _OldPaths())


def forward(package: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that serves the old module's public names."""
    homes = FORWARDED[package]

    def __getattr__(name: str) -> Any:
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(homes[name]), name)

    return __getattr__
