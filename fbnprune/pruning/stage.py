"""Stage 4, prune: the plan applied to copies of the model, one per layout; their sizes."""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any

from fbnprune.models.size import component_sizes, model_size
from fbnprune.plan import PrunePlan
from fbnprune.pruning.slicing import SliceError, sliced_copy
from fbnprune.pruning.tokenizer_trim import trim_tokenizer
from fbnprune.rundir.context import RunContext
from fbnprune.rundir.keys import prune_key
from fbnprune.rundir.layout import LAYOUTS

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

PruneReport = dict[str, Any]  # prune.json: site, widths, kept per layer, sizes per layout


class Slices:
    """The sliced model of every layout the recipe saves, built on first use (in memory):
    a run whose prune and check are reused never loads the model. With ``save.onload:
    sequential`` there are none: the check stage slices one block at a time."""

    def __init__(self, ctx: RunContext, plan: PrunePlan) -> None:
        self.ctx, self.plan = ctx, plan
        self.layouts = list(ctx.recipe.save.layouts)
        self.streamed = ctx.recipe.save.onload == "sequential"

    @functools.cached_property
    def models(self) -> dict[str, PreTrainedModel]:
        assert not self.streamed, "save.onload: sequential holds no sliced model"
        model = self.ctx.model
        return {
            layout: sliced_copy(model, self.plan, layout=layout).eval() for layout in self.layouts
        }

    def release(self) -> None:
        """Drop the sliced models (after save; heal slices or loads its own)."""
        self.__dict__.pop("models", None)


def _sizes(model: PreTrainedModel) -> dict[str, Any]:
    """Parameters and bytes of ``model``, in all and per component."""
    size = model_size(model)
    parts = {
        name: {"parameters": part.parameters, "bytes": part.bytes}
        for name, part in component_sizes(model).items()
    }
    return {"parameters": size.parameters, "bytes": size.bytes, "components": parts}


def sliced_tokenizer(ctx: RunContext, plan: PrunePlan) -> Any:
    """The tokenizer of a model sliced by ``plan``: the model's, or cut to the plan's
    vocabulary (``tokenizer_trim``; built once per run context and vocabulary)."""
    vocab = plan.kept_vocabulary()
    if vocab is None:
        return ctx.tokenizer
    cache = ctx.__dict__.setdefault("_trimmed_tokenizers", {})
    if vocab not in cache:
        cache[vocab] = trim_tokenizer(ctx.tokenizer, vocab)
    return cache[vocab]


def prune(ctx: RunContext, plan: PrunePlan, slices: Slices) -> PruneReport:
    """The prune report (``prune.json``): reused when fresh, else measured on ``slices``."""
    ctx.run.stage(
        "prune", prune_key(ctx), [ctx.layout.prune_file], lambda: _prune(ctx, plan, slices)
    )
    return ctx.layout.read_prune_report()


def _prune(ctx: RunContext, plan: PrunePlan, slices: Slices) -> dict[str, Any]:
    # streamed: the sizes of the model and its slices on the meta device (shapes only)
    reference = ctx.empty_model() if slices.streamed else ctx.model
    sizes: dict[str, Any] = {"original": _sizes(reference)}
    for layout in LAYOUTS:
        if layout in slices.layouts and not slices.streamed:
            model = slices.models[layout]
        else:
            try:
                model = sliced_copy(reference, plan, layout=layout)
            except SliceError as exc:
                sizes[layout] = {"unavailable": str(exc)}
                continue
        sizes[layout] = _sizes(model)
    report = {
        "site": plan.site,
        "layouts": slices.layouts,
        "kept_per_layer": plan.kept_per_layer(),
        "width_before": plan.layer_widths,
        "padded_width": max(plan.kept_per_layer()),
        "sizes": sizes,
    }
    vocab = plan.kept_vocabulary()
    if vocab is not None:
        report["vocabulary"] = {"original": vocab.original_size, "kept": vocab.size}
        logger.info("prune: %d of %d tokens kept", vocab.size, vocab.original_size)
    heads = plan.head_cut()
    if heads is not None:
        report["heads"] = {"query": len(heads.query[0]), "groups": len(heads.groups[0])}
        logger.info(
            "prune: %d query heads and %d key-value groups per layer",
            len(heads.query[0]),
            len(heads.groups[0]),
        )
    if plan.dropped_layers:
        report["layers"] = {
            "original": plan.n_layers,
            "kept": plan.n_layers - len(plan.dropped_layers),
            "dropped": plan.dropped_layers,
        }
        logger.info("prune: decoder blocks %s dropped", plan.dropped_layers)
    ctx.layout.write_prune_report(report)
    for name, s in sizes.items():
        if "parameters" in s:
            parts = ", ".join(
                f"{part} {size['parameters'] / 1e6:.1f}" for part, size in s["components"].items()
            )
            logger.info(
                "prune: %-8s %9.2f M params  %8.1f MiB  (%s)",
                name,
                s["parameters"] / 1e6,
                s["bytes"] / 2**20,
                parts,
            )
        else:
            logger.info("prune: %-8s unavailable (%s)", name, s["unavailable"])
    return {"padded_width": report["padded_width"]}
