"""Model card: what was pruned, how to load it and how well it works, as a Hub ``README.md``.

The metadata is built with ``huggingface_hub``'s ``ModelCardData`` (``base_model``, ``license``
carried from the base model, tags, datasets, ``pipeline_tag``, and a ``model-index`` whose
results hold the original and the pruned model's scores side by side). The prose
(``card_sections``) is built from the run's own files: the plan, the parity report, the size
report, the evaluation results and the export's extra formats. Nothing here reads a token or
the network.
"""

from __future__ import annotations

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from fbnprune.evaluate.answers import SCORING_RULES
from fbnprune.publish.card_facts import (
    UNKNOWN_LICENSE,
    BaseModel,
    CardFacts,
    TaskScore,
    base_model_info,
    model_name,
    read_eval_results,
    task_datasets,
)
from fbnprune.publish.card_sections import human_bytes, sections

__all__ = ["CardFacts", "TaskScore", "build_card", "human_bytes", "read_eval_results"]

TAGS = ["pruned", "fbnprune", "functional-networks"]
METRIC_IDS = {"acc": "accuracy", "acc_norm": "accuracy", "exact_match": "exact_match"}
METRIC_IDS.update({f"acc_{rule}": "accuracy" for rule in SCORING_RULES})  # answers' rules


def build_card(facts: CardFacts) -> ModelCard:
    """The model card (README.md) of an export."""
    base = base_model_info(facts.plan.model)
    datasets = task_datasets(facts.recipe)
    data = ModelCardData(
        base_model=base.hub_id,
        license=base.license,
        license_name="unknown" if base.license == UNKNOWN_LICENSE else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=[*TAGS, f"fbnprune-{facts.layout}", *(["distillation"] if facts.heal else [])],
        datasets=sorted({hub for _, hub in datasets.values() if hub}) or None,
        model_name=model_name(facts),
        eval_results=_eval_results(facts.scores, datasets, base) or None,
    )
    body = "\n\n".join(s for s in sections(facts, base) if s)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def _eval_results(
    scores: list[TaskScore], datasets: dict[str, tuple[str, str | None]], base: BaseModel
) -> list[EvalResult]:
    results = []
    for score in scores:
        dataset = datasets.get(score.task, (score.task, None))[0]
        for who, value in (("pruned", score.pruned), (f"original {base.name}", score.original)):
            if value is None:
                continue
            results.append(
                EvalResult(
                    task_type="text-generation",
                    task_name=score.task,
                    dataset_type=dataset,
                    dataset_name=score.task,
                    metric_type=METRIC_IDS.get(score.metric, score.metric),
                    metric_name=f"{score.metric} ({who})",
                    metric_value=round(value, 4),
                )
            )
    return results
