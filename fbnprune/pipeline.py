"""The whole pipeline over one run directory: collect -> discover -> select -> prune -> check
-> save.

Each stage is computed lazily and at most once per process; a stage whose inputs did not
change since the last run (same fingerprint in ``run.json``, outputs present) is read back
from disk instead. ``run_pipeline`` is the entry point used by ``fbnprune run``.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
import torch
import transformers
from torch import nn

from fbnprune import __version__
from fbnprune.adapters import get_adapter
from fbnprune.check import ParityError, ParityResult, check_parity
from fbnprune.collect import Activations, collect_activations
from fbnprune.data import TaskData, load_task
from fbnprune.discover import GroupICA
from fbnprune.integrity import digest_mismatches, file_digests, sha256_file
from fbnprune.io import atomic_directory, atomic_write_text
from fbnprune.mask import masked
from fbnprune.plan import PrunePlan
from fbnprune.recipe import Recipe, SelectConfig
from fbnprune.refit import refit_plan
from fbnprune.rundir import RunDir, RunLayout, StageRecord, fingerprint, measure, now
from fbnprune.rundir.layout import (
    CHECKPOINT_HEAL,
    CHECKPOINT_PARITY,
    CHECKPOINT_PLAN,
    CHECKPOINT_RECIPE,
)
from fbnprune.save import checkpoint_bytes, model_size, save_checkpoint
from fbnprune.select import allocate, column_means, layer_bounds, unit_scores
from fbnprune.slicing import SliceError, slice_model

logger = logging.getLogger(__name__)

STAGES = ("collect", "discover", "select", "prune", "check", "save", "heal")


def versions() -> dict[str, str]:
    return {
        "fbnprune": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "scikit-learn": sklearn.__version__,
        "numpy": np.__version__,
    }


@dataclass
class RunSummary:
    run_dir: Path
    stages: dict[str, StageRecord]
    plan: PrunePlan | None
    parity: ParityResult | None
    checkpoints: dict[str, Path]


class Pipeline:
    """Lazily computed stages of one recipe over one run directory."""

    def __init__(
        self,
        recipe: Recipe,
        run: RunDir,
        *,
        progress: bool = True,
        model_and_tokenizer: tuple[nn.Module, Any] | None = None,
    ) -> None:
        """``model_and_tokenizer``: the recipe's model, already loaded (shared between
        pipelines of one model, e.g. the benchmark's two neuron sites)."""
        self.recipe, self.run, self.progress = recipe, run, progress
        self.layout = RunLayout(run.path)
        self.executed: list[str] = []
        self._merged_scores: dict[tuple[str, int], np.ndarray] = {}
        self._sensitivity: dict[tuple, list[float]] = {}
        if model_and_tokenizer is not None:
            self.__dict__["model_and_tokenizer"] = model_and_tokenizer

    # -- inputs ----------------------------------------------------------------------------
    @functools.cached_property
    def tasks(self) -> dict[str, TaskData]:
        return {t.name: load_task(t, seed=self.recipe.seed) for t in self.recipe.tasks}

    @functools.cached_property
    def model_and_tokenizer(self) -> tuple[nn.Module, Any]:
        from fbnprune.loading import load_model

        dtype = getattr(torch, self.recipe.dtype)
        model, tokenizer = load_model(self.recipe.model, dtype=dtype)
        get_adapter(model)  # fail early on unsupported architectures
        return model, tokenizer

    @property
    def model(self) -> nn.Module:
        return self.model_and_tokenizer[0]

    @property
    def tokenizer(self) -> Any:
        return self.model_and_tokenizer[1]

    # -- stage keys --------------------------------------------------------------------------
    def collect_key(self, task: str) -> str:
        r = self.recipe
        cfg = next(t for t in r.tasks if t.name == task)
        # healing documents and evaluation wordings change neither collection nor the plan
        return fingerprint(
            r.model, self.model_fingerprint, r.dtype, r.site,
            cfg.model_dump(exclude={"heal_samples", "wordings"}), r.collect.model_dump(),
            self.tasks[task].fingerprint(heal=False),
        )  # fmt: skip

    @functools.cached_property
    def model_fingerprint(self) -> str:
        """The model's content (``loading.model_fingerprint``): new weights at the same path
        make every stage run again."""
        from fbnprune.loading import model_fingerprint

        return model_fingerprint(self.recipe.model)

    def discover_key(self, task: str) -> str:
        r = self.recipe
        return fingerprint(self.collect_key(task), r.discover.model_dump(), r.seed)

    @functools.cached_property
    def select_key(self) -> str:
        r = self.recipe
        upstream = [
            self.discover_key(t) if r.select.selector == "ica" else self.collect_key(t)
            for t in self.tasks
        ]
        return fingerprint(upstream, r.select.model_dump(), r.prune.model_dump(), r.seed)

    @property
    def prune_key(self) -> str:
        """Also keyed on the plan's content, so an edited ``plan.json`` is pruned, checked
        and saved again (read it after the select stage ran)."""
        plan = sha256_file(self.layout.plan_file) if self.layout.plan_file.is_file() else None
        return fingerprint(self.select_key, self.recipe.save.model_dump(), plan)

    @property
    def check_key(self) -> str:
        return fingerprint(self.prune_key, self.recipe.check.model_dump())

    @property
    def heal_key(self) -> str:
        heal_data = [data.fingerprint() for data in self.tasks.values()]
        return fingerprint(self.check_key, self.recipe.heal.model_dump(), heal_data)

    # -- paths -------------------------------------------------------------------------------
    @property
    def heal_layout(self) -> str:
        """Healing trains the compact slice when the recipe saves one (LoRA adapters would
        bring the padded layout's zero units to life), else the padded one."""
        layouts = self.recipe.save.layouts
        return "compact" if "compact" in layouts else layouts[0]

    @property
    def healed_dir(self) -> Path:
        return self.layout.checkpoint_dir(self.heal_layout, healed=True)

    # -- stage runner ------------------------------------------------------------------------
    def _stage(self, name: str, key: str, outputs: list[Path], compute) -> Any:
        """Reuse a fresh stage's outputs or compute them, recording time and memory."""
        if self.run.is_fresh(name, key, outputs):
            logger.info("%s: up to date, reusing %s", name, outputs[0].relative_to(self.run.path))
            return None
        logger.info("%s: running", name)
        try:
            with measure() as m:
                details = compute() or {}
        except BaseException:
            # staged checkpoints only live between check and save in one process: a failed
            # or interrupted stage (a full disk, Ctrl-C) leaves none of its tens of MB behind
            shutil.rmtree(self.layout.staging_root, ignore_errors=True)
            raise
        rec = StageRecord(key, round(m["seconds"], 2), round(m["peak_rss_mib"], 1), now(), details)
        self.run.mark_done(name, rec)
        self.executed.append(name)
        logger.info("%s: done in %.1f s (peak RSS %.0f MiB)", name, rec.seconds, rec.peak_rss_mib)
        return rec

    # -- 1. collect --------------------------------------------------------------------------
    def activations(self, task: str) -> Activations:
        directory = self.layout.collect_dir(task)
        zarr = self.recipe.collect.storage == "zarr"
        matrix = self.layout.activations_store(task) if zarr else self.layout.activations_file(task)
        outputs = [matrix, self.layout.collect_meta_file(task)]
        self._stage(f"collect:{task}", self.collect_key(task), outputs, lambda: self._collect(task))
        meta = self.layout.read_collect_meta(task)
        if zarr:
            from fbnprune.scale.collect import ActivationStore, StoredActivations

            return StoredActivations(ActivationStore(matrix))
        acts = Activations.load(directory, meta["layer_widths"], meta["site"])
        acts.tokens_per_second = meta["tokens_per_second"]
        return acts

    def _collect(self, task: str) -> dict:
        cfg = next(t for t in self.recipe.tasks if t.name == task)
        directory = self.layout.collect_dir(task)
        directory.mkdir(parents=True, exist_ok=True)
        memmap = self.recipe.collect.storage == "memmap"
        collect = collect_activations
        if self.recipe.collect.storage == "zarr":
            from fbnprune.scale.collect import store_collector

            collect = store_collector(self.layout.activations_store(task),
                                      self.recipe.collect.precision or "float16")  # fmt: skip
        acts = collect(
            self.model,
            self.tokenizer,
            self.tasks[task].prompts("calibration"),
            site=self.recipe.site,
            max_length=cfg.max_length,
            batch_size=self.recipe.collect.batch_size,
            out_file=self.layout.activations_file(task) if memmap else None,
            progress=self.progress,
        )
        if self.recipe.collect.storage == "memory":
            tmp = directory / ".activations.npy.tmp"
            with open(tmp, "wb") as handle:
                np.save(handle, acts.matrix)
            os.replace(tmp, self.layout.activations_file(task))
        acts.save(directory)
        meta = {
            "task": task,
            "model_type": self.model.config.model_type,
            "site": acts.site,
            "n_tokens": acts.n_tokens,
            "n_samples": len(self.tasks[task].calibration),
            "layer_widths": acts.layer_widths,
            "tokens_per_second": acts.tokens_per_second,
            "sample_ids": [d.id for d in self.tasks[task].calibration],
        }
        self.layout.write_collect_meta(task, meta)
        return {k: meta[k] for k in ("n_tokens", "n_samples", "tokens_per_second")}

    # -- 2. discover ---------------------------------------------------------------------------
    def ica_scores(self, task: str) -> np.ndarray:
        file = self.layout.discover_file(task)
        if not self.run.is_fresh(f"discover:{task}", self.discover_key(task), [file]):
            self.activations(task)  # run collect first, so stages log in order
        self._stage(
            f"discover:{task}", self.discover_key(task), [file], lambda: self._discover(task)
        )
        with np.load(file) as data:
            return data["scores"]

    def _discover(self, task: str) -> dict:
        cfg = self.recipe.discover
        acts = self.activations(task)
        estimator = GroupICA
        if cfg.engine == "dask":
            from fbnprune.scale.discover import DaskGroupICA, discover_input

            estimator = functools.partial(DaskGroupICA, memory=cfg.memory)
        ica = estimator(
            n_components=cfg.n_components,
            threshold=cfg.threshold,
            max_iter=cfg.max_iter,
            tol=cfg.tol,
            random_state=self.recipe.seed,
            standardize=cfg.standardize,
        ).fit(acts.matrix if cfg.engine == "sklearn" else discover_input(acts))
        file = self.layout.discover_file(task)
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.tmp.npz")
        np.savez(
            tmp,
            scores=ica.neuron_scores(),
            z_maps=ica.z_maps_,
            explained_variance_ratio=ica.explained_variance_ratio_,
            layer_widths=np.asarray(acts.layer_widths),
        )
        os.replace(tmp, file)
        sizes = ica.networks_.sum(axis=1)
        return {
            "n_iter": ica.n_iter_,
            "converged": ica.converged_,
            "explained_variance": float(ica.explained_variance_ratio_.sum()),
            "network_size_median": float(np.median(sizes)),
            "union_units": int(ica.union().sum()),
        }

    # -- 3. select ---------------------------------------------------------------------------
    def plan(self) -> PrunePlan:
        if not self.run.is_fresh("select", self.select_key, [self.layout.plan_file]):
            for task in self.tasks:  # upstream stages first, so stages log in order
                self._task_scores(task)
        self._stage("select", self.select_key, [self.layout.plan_file], self._select)
        return PrunePlan.load(self.layout.plan_file)

    def _task_scores(self, task: str) -> np.ndarray:
        return self.task_scores(task, self.recipe.select.selector, seed=self.recipe.seed)

    def task_scores(self, task: str, selector: str, *, seed: int) -> np.ndarray:
        """One score per unit of the task's calibration activations (higher: keep first)."""
        if selector == "ica":
            return self.ica_scores(task)
        return unit_scores(selector, self.model, self.activations(task).matrix, seed=seed)

    @functools.cached_property
    def unit_means(self) -> np.ndarray:
        """Every unit's mean over the calibration tokens of all tasks (the ``mean`` fill)."""
        all_acts = [self.activations(t) for t in self.tasks]
        tokens = sum(a.n_tokens for a in all_acts)
        return sum(column_means(a.matrix).astype(np.float64) * a.n_tokens
                   for a in all_acts) / tokens  # fmt: skip

    def merged_scores(self, selector: str, seed: int) -> np.ndarray:
        """Every unit's score, the tasks' scores merged by max (a union of tasks); computed
        once per (selector, seed) in this process."""
        key = (selector, seed)
        if key not in self._merged_scores:
            self._merged_scores[key] = np.max(
                [self.task_scores(t, selector, seed=seed) for t in self.tasks], axis=0
            )
        return self._merged_scores[key]

    layer_bounds = staticmethod(layer_bounds)

    @property
    def max_length(self) -> int:
        """The longest prompt, in tokens, any task allows."""
        return max(t.max_length for t in self.recipe.tasks)

    def build_plan(self, select: SelectConfig, fill: str, *, seed: int) -> PrunePlan:
        """The plan of one selection: the merged scores, the budget allocated over layers,
        the fill of dropped units."""
        r = self.recipe
        all_acts = {t: self.activations(t) for t in self.tasks}
        widths = next(iter(all_acts.values())).layer_widths
        scores = self.merged_scores(select.selector, seed)
        layers = self.layer_bounds(widths)
        layer_scores = [scores[a:b] for a, b in layers]
        sensitivity = None
        if select.allocation == "sensitivity":
            sensitivity = self.layer_sensitivity(select, seed)
        kept = allocate(layer_scores, select.budget, policy=select.allocation,
                        min_per_layer=select.min_per_layer, max_per_layer=select.max_per_layer,
                        sensitivity=sensitivity, power=select.sensitivity_power)  # fmt: skip
        fill_values = None
        if fill == "mean":
            fill_values = [self.unit_means[a:b].astype(np.float32).tolist() for a, b in layers]
        refit = None
        if fill == "reconstruct" and r.prune.sequential:
            from fbnprune.sequential import sequential_refit

            refit = sequential_refit(self.model, self.tokenizer, self.calibration_prompts(),
                                     list(widths), kept, ridge=r.prune.ridge,
                                     max_length=self.max_length,
                                     batch_size=r.collect.batch_size,
                                     progress=self.progress)  # fmt: skip
        elif fill == "reconstruct":
            refit = refit_plan(self.model, [a.matrix for a in all_acts.values()], list(widths),
                               kept, ridge=r.prune.ridge, progress=self.progress)  # fmt: skip
        provenance: dict[str, Any] = {
            "recipe": r.name,
            "recipe_fingerprint": r.fingerprint(),
            "tasks": {t: d.fingerprint() for t, d in self.tasks.items()},
            "calibration_tokens": {t: a.n_tokens for t, a in all_acts.items()},
            "seed": seed,
            "budget": select.budget,
            "allocation": select.allocation,
            "min_per_layer": select.min_per_layer,
            "selector": select.selector,
            "kept_per_layer": [len(k) for k in kept],
            "versions": versions(),
            "created": now(),
        }
        if sensitivity is not None:
            provenance["sensitivity"] = {
                "kl_per_layer": sensitivity, "power": select.sensitivity_power,
                "max_per_layer": select.max_per_layer, "samples": select.sensitivity_samples,
                "why": "each layer alone cut to the budget (top units, mean fill); KL of the "
                "next-token distribution from the original's on calibration prompts; units "
                "per layer proportional to width * KL ** power within floor and cap",
            }  # fmt: skip
        if select.selector == "ica":
            union = scores >= r.discover.threshold
            provenance.update(
                n_components=r.discover.n_components,
                threshold=r.discover.threshold,
                threshold_union_units=int(union.sum()),
                threshold_union_fraction=float(union.mean()),
                threshold_union_per_layer=[int(union[a:b].sum()) for a, b in layers],
            )
        model_type = self.layout.read_collect_meta(next(iter(self.tasks)))["model_type"]
        return PrunePlan(
            model=r.model, model_type=model_type, site=r.site, fill=fill,
            layer_widths=list(widths), kept=kept, fill_values=fill_values, provenance=provenance,
            refit=refit,
        )  # fmt: skip

    def layer_sensitivity(self, select: SelectConfig, seed: int) -> list[float]:
        """Per layer, the KL from the original when that layer alone is cut to the budget
        (``fbnprune.sensitivity``); computed once per (selector, seed, budget, samples)."""
        from fbnprune.sensitivity import layer_sensitivity

        key = (select.selector, seed, select.budget, select.sensitivity_samples)
        if key not in self._sensitivity:
            widths = self.activations(next(iter(self.tasks))).layer_widths
            layers = self.layer_bounds(widths)
            scores = self.merged_scores(select.selector, seed)
            prompts = self.calibration_prompts()[: select.sensitivity_samples]
            self._sensitivity[key] = layer_sensitivity(
                self.model, self.tokenizer, prompts, [scores[a:b] for a, b in layers],
                select.budget, unit_means=[self.unit_means[a:b] for a, b in layers],
                model_name=self.recipe.model,
                max_length=self.max_length, batch_size=self.recipe.collect.batch_size,
                progress=self.progress,
            )  # fmt: skip
            logger.info("select: layer sensitivity (KL) %s",
                        " ".join(f"{v:.3g}" for v in self._sensitivity[key]))  # fmt: skip
        return self._sensitivity[key]

    def _select(self) -> dict:
        r = self.recipe
        plan = self.build_plan(r.select, r.prune.fill, seed=r.seed)
        provenance = plan.provenance
        plan.save(self.layout.plan_file)
        logger.info("select: %s", plan.summary())
        if "threshold_union_units" in provenance:
            logger.info(
                "select: the threshold union (|z| >= %.1f) alone would keep %d units (%.1f%%)",
                r.discover.threshold, provenance["threshold_union_units"],
                100 * provenance["threshold_union_fraction"],
            )  # fmt: skip
        return {"kept": plan.n_kept, "kept_fraction": plan.kept_fraction}

    # -- 4. prune ------------------------------------------------------------------------------
    @functools.cached_property
    def sliced(self) -> dict[str, nn.Module]:
        """The sliced model for every layout the recipe saves (in memory)."""
        plan = self.plan()
        return {
            layout: slice_model(copy.deepcopy(self.model), plan, layout=layout).eval()
            for layout in self.recipe.save.layouts
        }

    def prune_report(self) -> dict:
        self.plan()
        self._stage("prune", self.prune_key, [self.layout.prune_file], self._prune)
        return self.layout.read_prune_report()

    def _prune(self) -> dict:
        plan = self.plan()
        original = model_size(self.model)
        sizes: dict[str, Any] = {
            "original": {"parameters": original.parameters, "bytes": original.bytes}
        }
        for layout in ("padded", "compact"):
            if layout in self.recipe.save.layouts:
                model = self.sliced[layout]
            else:
                try:
                    model = slice_model(copy.deepcopy(self.model), plan, layout=layout)
                except SliceError as exc:
                    sizes[layout] = {"unavailable": str(exc)}
                    continue
            size = model_size(model)
            sizes[layout] = {"parameters": size.parameters, "bytes": size.bytes}
        widths_before = plan.layer_widths
        report = {
            "site": plan.site,
            "layouts": self.recipe.save.layouts,
            "kept_per_layer": plan.kept_per_layer(),
            "width_before": widths_before,
            "padded_width": max(plan.kept_per_layer()),
            "sizes": sizes,
        }
        self.layout.write_prune_report(report)
        for name, s in sizes.items():
            if "parameters" in s:
                logger.info("prune: %-8s %9.2f M params  %8.1f MiB", name, s["parameters"] / 1e6,
                            s["bytes"] / 2**20)  # fmt: skip
            else:
                logger.info("prune: %-8s unavailable (%s)", name, s["unavailable"])
        return {"padded_width": report["padded_width"]}

    # -- 5. check ------------------------------------------------------------------------------
    def parity(self) -> ParityResult:
        self.prune_report()
        self._stage("check", self.check_key, [self.layout.parity_file], self._check)
        return self.layout.read_parity()

    def calibration_prompts(self) -> list[str]:
        """Every task's calibration prompts, task after task."""
        return [p for data in self.tasks.values() for p in data.prompts("calibration")]

    def prompts_of(self, splits: tuple[str, ...]) -> tuple[list[str], list[bool]]:
        """Every task's prompts of the given splits, and per prompt whether it is a
        multiple-choice question (its last position predicts the answer)."""
        prompts, questions = [], []
        for data in self.tasks.values():
            for split in splits:
                batch = data.prompts(split)
                prompts += batch
                questions += [data.choices is not None] * len(batch)
        return prompts, questions

    def document_ids(self) -> dict[str, dict[str, list[str]]]:
        """Per task and split, the ids of the documents this run uses (``documents.json``)."""
        return {name: data.document_ids() for name, data in self.tasks.items()}

    def heldout_prompts(self, n: int) -> list[str]:
        """Up to ``n`` held-out prompts, taken round-robin across tasks."""
        per_task = [d.prompts("heldout") for d in self.tasks.values()]
        out: list[str] = []
        for i in range(max(len(p) for p in per_task)):
            out.extend(p[i] for p in per_task if i < len(p))
        return out[:n]

    def _check(self) -> dict:
        """float64: masked vs sliced, both from the float64 model (exactness of the slice);
        model dtype: sliced vs saved-and-reloaded (serialisation), and masked vs sliced (for
        information: the float32 bias that holds the mean fill and the changed summation
        order round differently, ~1e-3 on 30-layer models)."""
        from transformers import AutoModelForCausalLM

        self.prune_report()
        plan = self.plan()
        dtype = getattr(torch, self.recipe.dtype)
        cfg = self.recipe.check
        kwargs = dict(
            tokenizer=self.tokenizer,
            prompts=self.heldout_prompts(cfg.samples),
            max_length=self.max_length,
        )
        reloaded: dict[str, nn.Module] = {}
        files: dict[str, dict[str, str]] = {}
        for layout, model in self.sliced.items():
            staging = self.layout.staging_dir(layout)
            save_checkpoint(model, self.tokenizer, staging)
            files[self.layout.checkpoint_dir(layout).name] = file_digests(staging)
            reloaded[layout] = AutoModelForCausalLM.from_pretrained(
                staging, dtype=dtype, trust_remote_code=layout == "compact"
            ).eval()
        # each saved layout against its own in-memory slice, in the model's dtype
        per_layout = [
            check_parity((f"sliced-{layout}", self.sliced[layout], None),
                         {f"reloaded-{layout}": reloaded[layout]}, atol=cfg.atol, **kwargs)
            for layout in self.sliced
        ]  # fmt: skip
        serialisation = per_layout[0]
        serialisation.reference = "sliced (in memory)"
        serialisation.comparisons = [r.comparisons[0] for r in per_layout]
        del reloaded
        sliced = {f"sliced-{layout}": m for layout, m in self.sliced.items()}
        in_dtype = check_parity(("masked", self.model, lambda: masked(self.model, plan)),
                                sliced, atol=cfg.atol, gating=False, **kwargs)  # fmt: skip
        # the slicing procedure itself, run in float64 so rounding cannot hide a wrong unit
        reference64 = copy.deepcopy(self.model).double()
        sliced64 = {
            f"sliced-{layout}": slice_model(copy.deepcopy(reference64), plan, layout=layout)
            for layout in self.sliced
        }
        exact = check_parity(("masked", reference64, lambda: masked(reference64, plan)),
                             sliced64, atol=cfg.atol, **kwargs)  # fmt: skip
        result = ParityResult([exact, serialisation, in_dtype], files=files)
        logger.info("check:\n%s", result.table())
        self.layout.write_parity(result)
        if not result.passed:
            shutil.rmtree(self.layout.staging_root, ignore_errors=True)
            result.raise_if_failed()
        return {"max_abs": result.worst(), "passed": result.passed}

    # -- 6. save -------------------------------------------------------------------------------
    def checkpoints(self) -> dict[str, Path]:
        outputs = [self.layout.checkpoint_dir(layout) for layout in self.recipe.save.layouts]
        changed = self._changed_since_check(outputs)
        if changed:
            logger.warning("save: the saved checkpoints differ from the checked ones (%s); "
                           "checking and saving them again", "; ".join(changed))  # fmt: skip
            self.run.forget("check")
            self.run.forget("save")
        self.parity()
        self._stage("save", self.check_key, outputs, self._save)
        return dict(zip(self.recipe.save.layouts, outputs, strict=True))

    def _changed_since_check(self, folders: list[Path]) -> list[str]:
        """What differs in the saved checkpoints from the bytes the check stage compared
        (only when the ledger says save is done: a run in progress has nothing to verify)."""
        if not self.run.is_fresh("save", self.check_key, folders):
            return []
        files = self.parity().files
        return [f"{folder.name}/{line}" for folder in folders
                for line in digest_mismatches(folder, files.get(folder.name, {}))]  # fmt: skip

    def _save(self) -> dict:
        if not all(self.layout.staging_dir(layout).is_dir() for layout in self.recipe.save.layouts):
            # checked in an earlier process, staging gone: check again (it saves the staging)
            self.run.forget("check")
            self.parity()
        files = self.parity().files
        extras = self._checkpoint_extras()
        sizes = {}
        for layout in self.recipe.save.layouts:
            staging, final = self.layout.staging_dir(layout), self.layout.checkpoint_dir(layout)
            changed = digest_mismatches(staging, files.get(final.name, {}))
            if changed:
                raise ParityError(f"the staged {final.name} is not what was checked: "
                                  f"{'; '.join(changed)}; run the command again")  # fmt: skip
            with atomic_directory(final) as tmp:
                shutil.copytree(staging, tmp, dirs_exist_ok=True)
                for name, text in extras.items():
                    atomic_write_text(tmp / name, text)
            shutil.rmtree(staging)
            sizes[layout] = checkpoint_bytes(final)
            logger.info("save: %s (%.1f MiB of safetensors)", final, sizes[layout] / 2**20)
        shutil.rmtree(self.layout.staging_root, ignore_errors=True)
        return {"safetensors_bytes": sizes}


    def _checkpoint_extras(self) -> dict[str, str]:
        """The files every saved checkpoint carries beside its weights."""
        return {
            CHECKPOINT_PLAN: self.layout.plan_file.read_text(),
            CHECKPOINT_RECIPE: self.recipe.to_yaml(),
            CHECKPOINT_PARITY: self.layout.parity_file.read_text(),
        }

    # -- 7. heal -------------------------------------------------------------------------------
    def healed(self) -> Path:
        """The healed checkpoint (``checkpoint-<layout>-healed/``), healing if needed."""
        self.checkpoints()
        outputs = [self.healed_dir, self.layout.heal_log_file, self.heal_parity_file]
        if self.run.is_fresh("heal", self.heal_key, outputs):
            recorded = self.layout.read_parity(healed=True)
            changed = digest_mismatches(self.healed_dir,
                                        recorded.files.get(self.healed_dir.name, {}))
            if changed:
                logger.warning("heal: %s differs from the checked one (%s); healing again",
                               self.healed_dir.name, "; ".join(changed))  # fmt: skip
                self.run.forget("heal")
        self._stage("heal", self.heal_key, outputs, self._heal)
        return self.healed_dir

    @property
    def heal_parity_file(self) -> Path:
        """The healed checkpoint's reload check and file digests."""
        return self.layout.heal_parity_file

    def _heal(self) -> dict:
        """Distil the original into a copy of the checked slice on the calibration prompts
        (held-out prompts only for the logged validation loss), then save it through the
        same code as the unhealed checkpoint and check that it reloads bit for bit."""
        from transformers import AutoModelForCausalLM

        from fbnprune.heal import heal_model, plot_loss

        cfg, layout = self.recipe.heal, self.heal_layout
        heal_dir = self.layout.heal_dir
        # one fresh slice of the layout healed (``self.sliced`` would build every layout)
        student = slice_model(copy.deepcopy(self.model), self.plan(), layout=layout).eval()
        texts, questions = self.prompts_of(("calibration", "heal"))
        validation, validation_questions = self.prompts_of(("heldout",))
        healed, log = heal_model(student, self.model, self.tokenizer, texts, cfg,
                                 validation=validation, questions=questions,
                                 validation_questions=validation_questions,
                                 state_file=heal_dir / "state.pt",
                                 progress=self.progress)  # fmt: skip
        staging = self.layout.staging_dir(f"{layout}-healed")
        save_checkpoint(healed, self.tokenizer, staging)
        reloaded = AutoModelForCausalLM.from_pretrained(
            staging, dtype=getattr(torch, self.recipe.dtype), trust_remote_code=layout == "compact"
        ).eval()
        serialisation = check_parity(
            (f"healed-{layout}", healed, None), {f"reloaded-healed-{layout}": reloaded},
            tokenizer=self.tokenizer, prompts=self.heldout_prompts(self.recipe.check.samples),
            max_length=self.max_length, atol=self.recipe.check.atol,
        )  # fmt: skip
        result = ParityResult([serialisation],
                              files={self.healed_dir.name: file_digests(staging)})
        if not result.passed:
            shutil.rmtree(self.layout.staging_root, ignore_errors=True)
            result.raise_if_failed()
        self.layout.write_parity(result, healed=True)
        log_text = json.dumps(log.to_dict(), indent=2) + "\n"  # as atomic_write_json writes
        atomic_write_text(self.layout.heal_log_file, log_text)
        plot_loss({"healing": log}, heal_dir / "loss.png",
                  title=f"healing {self.recipe.model} ({layout}, {cfg.method})")
        extras = {**self._checkpoint_extras(), CHECKPOINT_HEAL: log_text}
        with atomic_directory(self.healed_dir) as tmp:
            shutil.copytree(staging, tmp, dirs_exist_ok=True)
            for name, text in extras.items():
                atomic_write_text(tmp / name, text)
        shutil.rmtree(self.layout.staging_root, ignore_errors=True)
        logger.info("heal: saved %s", self.healed_dir)
        return {"steps": log.steps, "stopped_by": log.stopped_by,
                "loss_first": log.train_loss[0], "loss_last": log.train_loss[-1],
                "reload_max_abs": result.worst()}  # fmt: skip


def run_pipeline(
    recipe: Recipe,
    out: Path,
    *,
    until: str = "heal",
    overwrite: bool = False,
    progress: bool = True,
) -> RunSummary:
    """Run the recipe's stages up to ``until`` into ``out``; reuse stages that are fresh."""
    if until not in STAGES:
        raise ValueError(f"unknown stage {until!r}; stages: {', '.join(STAGES)}")
    run = RunDir.open(out, overwrite=overwrite, protected=(recipe.model,))
    run.write_meta(recipe=recipe.name, recipe_fingerprint=recipe.fingerprint(),
                   versions=versions())  # fmt: skip
    pipe = Pipeline(recipe, run, progress=progress)
    atomic_write_text(pipe.layout.recipe_file, recipe.to_yaml())
    pipe.layout.write_documents(pipe.document_ids())
    plan = parity = None
    checkpoints: dict[str, Path] = {}
    stop = STAGES.index(until)
    if stop == 0:
        for task in pipe.tasks:
            pipe.activations(task)
    if stop >= 1 and recipe.select.selector == "ica":
        for task in pipe.tasks:
            pipe.ica_scores(task)
    if stop >= 2:
        plan = pipe.plan()
    if stop >= 3:
        pipe.prune_report()
    if stop >= 4:
        parity = pipe.parity()
    if stop >= 5:
        checkpoints = pipe.checkpoints()
    if stop >= 6 and recipe.heal.active(recipe.select.budget):
        checkpoints[f"{pipe.heal_layout}-healed"] = pipe.healed()
    elif stop >= 6:
        if pipe.healed_dir.exists():  # healed from an earlier plan: it no longer matches
            shutil.rmtree(pipe.healed_dir)
            shutil.rmtree(pipe.layout.heal_dir, ignore_errors=True)
            run.forget("heal")
            logger.info("heal: removed %s, healed from an earlier plan", pipe.healed_dir.name)
        logger.info("heal: skipped (budget %.0f%% is not below heal.below_budget %.0f%%; "
                    "set heal.enabled: true to heal anyway)", 100 * recipe.select.budget,
                    100 * recipe.heal.below_budget)  # fmt: skip
    ledger = run.ledger()["stages"]
    stages = {name: StageRecord(**rec) for name, rec in ledger.items()}
    return RunSummary(run.path, stages, plan, parity, checkpoints)
