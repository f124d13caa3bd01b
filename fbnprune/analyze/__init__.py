"""Analyze: what the functional networks of a model are, and whether the model needs them.

``analyze(recipe, out_dir)`` (CLI: ``fbnprune analyze RECIPE --out DIR``) reproduces the seed
paper's analyses (Liu et al., ICML 2025) with fbnprune's collection, group ICA and masks:

- ``recurrence``: templates (group ICA per task) recurring among individual networks (ICA
  on single samples), by IoU (Table 1), and templates shared across tasks.
- ``lesions``: each network zeroed alone, all together, and random sets of a fixed share
  and of the same size (Tables 4, 5).
- ``preservation``: keep only the union of the networks at several ``n_components``, with
  zero and mean fill (Tables 8-10, Figure 3).
- ``metric``: the in-process task metric (multiple-choice accuracy or perplexity).
- ``figures``, ``report``: PNG figures and ``report.md``; ``analysis.json`` holds every number.

Modules: ``overlap`` (IoU), ``samples`` (documents, short-sample units), ``networks`` (ICA
fits), ``plans`` (plans over neuron sets), ``measure`` (a measured task's lesions and
preservation curve at one site), ``run`` (the orchestration).
"""

from fbnprune.analyze.metric import ChoiceMetric, PerplexityMetric, build_metric
from fbnprune.analyze.overlap import chance_iou, iou_matrix, match_counts
from fbnprune.analyze.plans import keep_plan, lesion_plan, random_set
from fbnprune.analyze.samples import AnalyzeError, plan_units
from fbnprune.analyze.study import Analysis, analyze, metric_tasks, resolve_config

__all__ = [
    "Analysis",
    "AnalyzeError",
    "ChoiceMetric",
    "PerplexityMetric",
    "analyze",
    "build_metric",
    "chance_iou",
    "iou_matrix",
    "keep_plan",
    "lesion_plan",
    "match_counts",
    "metric_tasks",
    "plan_units",
    "random_set",
    "resolve_config",
]
