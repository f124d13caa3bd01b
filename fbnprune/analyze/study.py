"""``analyze(recipe, out_dir)``: the whole analysis of one recipe into one directory.

Data flows one way: samples -> activations -> ICA (templates, individual networks, component
sweep) -> recurrence and cross-task tables -> lesions and preservation under masks ->
``analysis.json`` -> figures and ``report.md``. The directory is written through a temporary
sibling and moved into place at the end, so a failed or interrupted analysis leaves nothing.
"""

from __future__ import annotations

import difflib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import ValidationError

from fbnprune.analyze.analysis import Analysis
from fbnprune.analyze.measure import measure_networks
from fbnprune.analyze.metric import Metric, build_metric
from fbnprune.analyze.networks import (
    IndividualNetworks,
    NetworkSet,
    fit_group,
    fit_individual,
)
from fbnprune.analyze.plans import score_under
from fbnprune.analyze.recurrence import cross_task, recurrence
from fbnprune.analyze.samples import (
    AnalyzeError,
    TaskSamples,
    draw_samples,
    id_fingerprint,
    plan_units,
)
from fbnprune.collect.activations import Activations, collect_activations
from fbnprune.io import atomic_directory, atomic_write_json
from fbnprune.recipe import AnalyzeConfig, Recipe
from fbnprune.rundir.runner import versions

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

ANALYSIS_VERSION = 1


def resolve_config(recipe: Recipe, **overrides: Any) -> AnalyzeConfig:
    """The recipe's ``analyze`` section with the given fields replaced (None = keep)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return AnalyzeConfig.model_validate({**recipe.analyze.model_dump(), **given})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise AnalyzeError(f"invalid analyze settings: {problems}") from None


def metric_tasks(recipe: Recipe, config: AnalyzeConfig) -> list[str]:
    """The tasks measured under lesions and preservation: the first task when unset;
    ``["all"]`` means every task, ``[]`` or ``["none"]`` none (templates and recurrence only)."""
    names = [t.name for t in recipe.tasks]
    wanted = config.metric_tasks
    if wanted is None:
        return names[:1]
    if wanted == ["all"]:
        return names
    if wanted == ["none"]:
        return []
    for name in wanted:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise AnalyzeError(
                f"metric task {name!r} is not a task of the recipe ({', '.join(names)}){hint}"
            )
    return list(dict.fromkeys(wanted))


def check_out_dir(out_dir: Path, overwrite: bool, *, protected: tuple[Any, ...] = ()) -> None:
    """Refuse an ``out_dir`` that is not new, empty, or (with ``overwrite``) an earlier
    analysis; never one that is the working or home directory or holds the recipe or model."""
    from fbnprune.rundir import RunDirError, check_replaceable, is_empty_dir

    if out_dir.exists() and not out_dir.is_dir():
        raise AnalyzeError(f"{out_dir} exists and is not a directory")
    if not out_dir.is_dir():
        return
    if not overwrite and not is_empty_dir(out_dir):
        raise AnalyzeError(
            f"{out_dir} exists and is not empty; choose another --out or pass "
            "--overwrite to replace an earlier analysis there"
        )
    try:  # the folder is replaced as a whole, even when empty
        check_replaceable(
            out_dir, protected=protected, markers=("analysis.json",), kind="an fbnprune analysis"
        )
    except RunDirError as exc:
        raise AnalyzeError(str(exc)) from None


class _Clock:
    """Seconds per named phase, summed."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            self.seconds[name] = round(self.seconds.get(name, 0.0) + spent, 2)


def analyze(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    config: AnalyzeConfig | None = None,
    model: PreTrainedModel | None = None,
    tokenizer: Any = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Analysis:
    """Run the analysis of ``recipe`` and write ``analysis.json``, ``report.md`` and the
    figures into ``out_dir``.

    Args:
        recipe: model, tasks, seed and ``discover`` settings (threshold, FastICA).
        out_dir: the output directory (must be new or empty unless ``overwrite``).
        config: analysis sizes; the recipe's ``analyze`` section if None.
        model, tokenizer: an already loaded model (the recipe's model is loaded if None).
        overwrite: replace an existing ``out_dir``.
        progress: show progress bars.
    """
    from fbnprune.analyze.figures import write_figures
    from fbnprune.analyze.report import write_report

    config = config or recipe.analyze
    out_dir = Path(out_dir)
    measured = metric_tasks(recipe, config)
    check_out_dir(out_dir, overwrite, protected=(recipe.model,))
    start = time.perf_counter()
    samples = {
        t.name: draw_samples(
            t,
            samples=config.samples,
            eval_docs=config.eval_docs if t.name in measured else 0,
            seed=recipe.seed,
        )
        for t in recipe.tasks
    }
    if model is None or tokenizer is None:
        from fbnprune.models.loading import load_model

        model, tokenizer = load_model(
            recipe.model, dtype=getattr(torch, recipe.dtype), allow_pickle=recipe.allow_pickle
        )
    model.eval()
    result = _Runner(recipe, config, measured, samples, model, tokenizer, progress).run()
    result.data["timings"]["total"] = round(time.perf_counter() - start, 2)
    with atomic_directory(out_dir) as tmp:
        result.data["figures"] = write_figures(result, tmp)
        atomic_write_json(tmp / "analysis.json", result.data)
        write_report(result.data, tmp / "report.md")
    result.out_dir = out_dir
    logger.info("analysis written to %s", out_dir)
    return result


class _Runner:
    """The analysis of one recipe on one loaded model; each method is one step."""

    def __init__(
        self,
        recipe: Recipe,
        config: AnalyzeConfig,
        measured: list[str],
        samples: dict[str, TaskSamples],
        model: PreTrainedModel,
        tokenizer: Any,
        progress: bool,
    ) -> None:
        self.recipe, self.config, self.measured, self.samples = recipe, config, measured, samples
        self.model, self.tokenizer, self.progress = model, tokenizer, progress
        self.clock = _Clock()
        self.seeds = {"draw_and_ica": recipe.seed, "random_controls": list(config.random_seeds)}
        self.metrics: dict[str, Metric] = {}
        self.original: dict[str, dict[str, float]] = {}

    def run(self) -> Analysis:
        self.score_originals()
        result = Analysis(Path(), self.header())
        for site in self.config.sites:
            templates: dict[str, NetworkSet] = {}
            individuals: dict[str, IndividualNetworks] = {}
            site_data: dict[str, Any] = {"units": {}, "lesions": {}, "preservation": {}}
            for task in self.samples:
                individuals[task], site_data["units"][task] = self.individual(task, site)
                templates[task], widths = self.templates(task, site, site_data)
                result.layer_widths[site] = widths
            with self.clock("recurrence"):
                site_data["recurrence"] = {
                    **recurrence(templates, individuals, self.config.iou_threshold),
                    "seeds": self.seeds,
                    "samples": {
                        t: {"template": s.ids()["template"], "individual": s.ids()["individual"]}
                        for t, s in self.samples.items()
                    },
                }
                site_data["cross_task"] = cross_task(templates, self.config.iou_threshold)
            site_data["layer_widths"] = result.layer_widths[site]
            result.data["sites"][site] = site_data
            result.templates[site] = templates
        return result

    def score_originals(self) -> None:
        for task in self.measured:
            s = self.samples[task]
            self.metrics[task] = build_metric(
                s.source,
                s.eval,
                s.prompts(s.eval),
                self.tokenizer,
                seed=self.recipe.seed,
                max_length=s.max_length,
                batch_size=self.config.batch_size,
            )
            with self.clock(f"score original {task}"):
                scores = score_under(self.model, self.metrics[task], None, progress=self.progress)
            self.original[task] = scores
            key = self.metrics[task].primary
            logger.info("%s: original %s = %.4g", task, key, scores[key])

    def header(self) -> dict[str, Any]:
        recipe, config = self.recipe, self.config
        return {
            "version": ANALYSIS_VERSION,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "model": recipe.model,
            "model_type": self.model.config.model_type,
            "recipe": recipe.name,
            "recipe_fingerprint": recipe.fingerprint(),
            "config": config.model_dump(mode="json"),
            "discover": recipe.discover.model_dump(mode="json"),
            "seeds": self.seeds,
            "versions": versions(),
            "samples": {
                t: {
                    **s.ids(),
                    "fingerprints": {p: id_fingerprint(ids) for p, ids in s.ids().items()},
                }
                for t, s in self.samples.items()
            },
            "metrics": {
                t: {
                    "kind": m.kind,
                    "primary": m.primary,
                    "higher_is_better": m.higher_is_better,
                    "doc_ids": m.doc_ids,
                    "original": self.original[t],
                }
                for t, m in self.metrics.items()
            },
            "sites": {},
            "timings": self.clock.seconds,
        }

    def collect(self, task: str, site: str, part: str) -> Activations:
        s = self.samples[task]
        with self.clock("collect"):
            return collect_activations(
                self.model,
                self.tokenizer,
                s.prompts(getattr(s, part)),
                site=site,
                max_length=s.max_length,
                batch_size=self.config.batch_size,
                progress=self.progress,
            )

    def individual(self, task: str, site: str) -> tuple[IndividualNetworks, dict[str, Any]]:
        """Individual networks of every unit of the task's individual samples."""
        s, config, k = self.samples[task], self.config, self.config.n_templates
        acts = self.collect(task, site, "individual")
        lengths = np.bincount(acts.sample_index, minlength=len(s.individual)).tolist()
        units = plan_units(
            lengths, k, per_component=config.min_tokens_per_component, policy=config.short_samples
        )
        if not units.units:
            raise AnalyzeError(
                f"{task}/{site}: no sample, alone or merged, has the {units.min_tokens} tokens "
                f"individual ICA needs (n_templates={k} x min_tokens_per_component="
                f"{config.min_tokens_per_component}); use short_samples: merge or reduce, or "
                "raise the task's max_length"
            )
        record = {
            **units.summary(),
            "sample_tokens": lengths,
            "unit_samples": [
                {
                    "samples": [s.individual[i].id for i in u.samples],
                    "n_tokens": u.n_tokens,
                    "n_components": u.n_components,
                }
                for u in units.units
            ],
            "skipped": [s.individual[i].id for i in units.skipped],
        }
        with self.clock("individual ICA"):
            found = fit_individual(
                acts.matrix,
                acts.sample_index,
                units.units,
                self.recipe.discover,
                self.recipe.seed,
                progress=self.progress,
                desc=f"individual ICA {task}/{site}",
            )
        return found, record

    def templates(
        self, task: str, site: str, site_data: dict[str, Any]
    ) -> tuple[NetworkSet, list[int]]:
        """The task's templates; for a measured task also its lesions and preservation curve
        (``analyze.measure``)."""
        k = self.config.n_templates
        acts = self.collect(task, site, "template")
        if acts.n_tokens <= k:
            raise AnalyzeError(
                f"{task}/{site}: {acts.n_tokens} template tokens cannot give "
                f"{k} templates; raise analyze.samples"
            )
        with self.clock("template ICA"):
            templates = fit_group(acts.matrix, k, self.recipe.discover, self.recipe.seed)
        logger.info("%s/%s: %d templates, sizes %s", task, site, k, templates.sizes)
        if task in self.measured:
            lesions, curve = measure_networks(
                self.model,
                self.metrics[task],
                acts,
                templates,
                tag=f"{task}/{site}",
                site=site,
                recipe=self.recipe,
                config=self.config,
                original=self.original[task],
                template_ids=self.samples[task].ids()["template"],
                clock=self.clock,
                progress=self.progress,
            )
            site_data["lesions"][task], site_data["preservation"][task] = lesions, curve
        return templates, acts.layer_widths
