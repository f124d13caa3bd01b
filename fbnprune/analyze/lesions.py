"""Lesions (the seed paper's Tables 4 and 5): mask networks, measure the task metric.

- Each template network alone, zeroed (the paper's lesion), with its size.
- All templates together, against two random controls over several seeds: a random
  ``random_fraction`` of all neurons (the paper's control) and a random set of the same size
  as the templates' union (the control the paper lacked: a lesion's effect grows with its
  size, so only a same-size control isolates the choice of neurons).
- When the neurons' activation spread is given, a third control: the same number of the
  neurons whose activations vary most over the template tokens. ICA maps are computed on
  raw activations, so high-variance neurons (the last layers' outputs, "massive activation"
  channels) weigh most in them; this control asks whether a network's effect is more than
  the effect of zeroing the loudest neurons, and ``union_in_top_variance`` says how much of
  the templates' union is made of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from fbnprune.analyze.metric import Metric
from fbnprune.analyze.networks import NetworkSet
from fbnprune.analyze.plans import lesion_plan, mean_std, random_set, score_under, top_set

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def run_lesions(
    model: PreTrainedModel,
    metric: Metric,
    templates: NetworkSet,
    layer_widths: list[int],
    *,
    site: str,
    model_name: str,
    original: dict[str, float],
    random_fraction: float,
    seeds: list[int],
    spread: np.ndarray | None = None,
    progress: bool = False,
    desc: str = "lesions",
) -> dict[str, Any]:
    """Lesion table of one task and site (numbers only; the caller adds seeds and ids).
    ``spread``: per-neuron activation standard deviation, for the top-variance control."""
    n = sum(layer_widths)
    plan_kw = dict(model=model_name, model_type=model.config.model_type, site=site)
    union = templates.union()
    jobs: list[tuple[str, int | None, Any]] = [
        ("network", j, net) for j, net in enumerate(templates.members)
    ]
    jobs.append(("all", None, union))
    for name, size in (
        ("random_fraction", round(random_fraction * n)),
        ("random_same_size", int(union.sum())),
    ):
        jobs.extend((name, seed, random_set(n, size, seed)) for seed in seeds)
    loudest = None
    if spread is not None:
        loudest = top_set(spread, int(union.sum()))
        jobs.append(("top_variance_same_size", None, loudest))

    key = metric.primary
    results: dict[str, Any] = {
        "networks": [],
        "all": None,
        "random_fraction": [],
        "random_same_size": [],
    }
    for kind, tag, lesioned in tqdm(jobs, desc=desc, leave=False, disable=not progress):
        scores = score_under(model, metric, lesion_plan(lesioned, layer_widths, **plan_kw))
        row = {
            "size": int(lesioned.sum()),
            "fraction": float(lesioned.sum() / n),
            "scores": scores,
            "delta": scores[key] - original[key],
        }
        if kind == "network":
            results["networks"].append({"template": tag, **row})
        elif kind in ("all", "top_variance_same_size"):
            results[kind] = row
        else:
            results[kind].append({"seed": tag, **row})
    if loudest is not None:
        results["union_in_top_variance"] = float((union & loudest).sum() / max(union.sum(), 1))
    for kind in ("random_fraction", "random_same_size"):
        runs = results[kind]
        results[f"{kind}_summary"] = {
            "size": runs[0]["size"],
            "fraction": runs[0]["fraction"],
            **mean_std([r["scores"][key] for r in runs]),
        }
    return results
