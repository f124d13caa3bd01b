"""Stage 1, collect: each task's calibration activations (tokens x units), on disk."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from fbnprune.collect.activations import Activations, collect_activations
from fbnprune.data.fit import question_cut
from fbnprune.models.onload import LayerwiseModel
from fbnprune.recipe import RecipeError
from fbnprune.rundir.context import RunContext
from fbnprune.rundir.keys import collect_key
from fbnprune.rundir.layout import ACTIVATIONS_FILE


def collect(ctx: RunContext, task: str) -> Activations:
    """The task's calibration activations: reused when fresh, else recorded."""
    layout = ctx.layout
    zarr = ctx.recipe.collect.storage == "zarr"
    matrix = layout.activations_store(task) if zarr else layout.activations_file(task)
    outputs = [matrix, layout.collect_meta_file(task)]
    ctx.run.stage(f"collect:{task}", collect_key(ctx, task), outputs, lambda: _collect(ctx, task))
    meta = layout.read_collect_meta(task)
    if zarr:
        from fbnprune.collect.to_store import ActivationStore, StoredActivations

        return StoredActivations(ActivationStore(matrix))
    acts = Activations.load(layout.collect_dir(task), meta["layer_widths"], meta["site"])
    acts.tokens_per_second = meta["tokens_per_second"]
    return acts


def _collect(ctx: RunContext, task: str) -> dict[str, Any]:
    recipe, layout = ctx.recipe, ctx.layout
    cfg = next(t for t in recipe.tasks if t.name == task)
    cut = question_cut(ctx.tasks[task], ctx.tokenizer, cfg.max_length)
    if cut is not None:
        raise RecipeError(cut)
    directory = layout.collect_dir(task)
    directory.mkdir(parents=True, exist_ok=True)
    memmap = recipe.collect.storage == "memmap"
    collect = collect_activations
    if recipe.collect.storage == "zarr":
        from fbnprune.collect.to_store import store_collector

        collect = store_collector(
            layout.activations_store(task), recipe.collect.precision or "float16"
        )
    model = ctx.layerwise_model() if recipe.collect.onload == "sequential" else ctx.model
    pretrained = model.model if isinstance(model, LayerwiseModel) else model
    acts = collect(
        model,
        ctx.tokenizer,
        ctx.tasks[task].texts("calibration"),
        site=recipe.site,
        max_length=cfg.max_length,
        batch_size=recipe.collect.batch_size,
        out_file=layout.activations_file(task) if memmap else None,
        packing=recipe.collect.packing,
        progress=ctx.progress,
    )
    if recipe.collect.storage == "memory":
        tmp = directory / f".{ACTIVATIONS_FILE}.tmp"
        with open(tmp, "wb") as handle:
            np.save(handle, acts.matrix)
        os.replace(tmp, layout.activations_file(task))
    acts.save(directory)
    meta = {
        "task": task,
        "model_type": pretrained.config.model_type,
        "site": acts.site,
        "n_tokens": acts.n_tokens,
        "n_samples": len(ctx.tasks[task].calibration),
        "layer_widths": acts.layer_widths,
        "tokens_per_second": acts.tokens_per_second,
        "packing": recipe.collect.packing,
        "sample_ids": [d.id for d in ctx.tasks[task].calibration],
    }
    layout.write_collect_meta(task, meta)
    return {k: meta[k] for k in ("n_tokens", "n_samples", "tokens_per_second")}
