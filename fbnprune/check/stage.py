"""Stage 5, check: the sliced models equal the masked original, and reload bit for bit."""

from __future__ import annotations

import copy
import functools
import logging
import shutil
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fbnprune.check.compare import check_parity
from fbnprune.check.layer_check import saved_tensors_parity, slicing_parity
from fbnprune.check.reload import parity_inputs, reload_parity
from fbnprune.integrity import file_digests
from fbnprune.models.onload import LayerwiseModel, checkpoint_dir
from fbnprune.parity import ParityReport, ParityResult
from fbnprune.plan import PrunePlan
from fbnprune.pruning.mask import masked
from fbnprune.pruning.slicing import sliced_copy
from fbnprune.pruning.stage import Slices, sliced_tokenizer
from fbnprune.pruning.tokenizer_trim import tokenization_parity
from fbnprune.rundir.context import RunContext
from fbnprune.rundir.keys import check_key
from fbnprune.save.checked import stage_checkpoint
from fbnprune.save.streamed import save_sliced_layerwise
from fbnprune.vocabulary import Vocabulary

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


def check(ctx: RunContext, plan: PrunePlan, slices: Slices) -> ParityResult:
    """The parity result (``parity.json``): reused when fresh, else measured; the checked
    checkpoints are left in staging for save."""
    if slices.streamed:
        body = functools.partial(_check_streamed, ctx, plan, slices.layouts)
    else:
        body = functools.partial(_check, ctx, plan, slices)
    ctx.run.stage("check", check_key(ctx), [ctx.layout.parity_file], body)
    return ctx.layout.read_parity()


def _check(ctx: RunContext, plan: PrunePlan, slices: Slices) -> dict[str, Any]:
    """float64: masked vs sliced (exactness of the slice, ``exactness``); model dtype:
    sliced vs saved-and-reloaded (serialisation), and masked vs sliced (for information:
    the float32 bias that holds the mean fill and the changed summation order round
    differently, ~1e-3 on 30-layer models)."""
    tokenizer, vocabulary = sliced_tokenizer(ctx, plan), plan.kept_vocabulary()
    inputs = {**parity_inputs(ctx, tokenizer), "vocabulary": vocabulary}
    # every layout saved before any is compared
    staged = [
        stage_checkpoint(ctx, model, layout, tokenizer) for layout, model in slices.models.items()
    ]
    files = {s.final.name: s.files for s in staged}
    # each saved layout against its own in-memory slice, in the model's dtype
    per_layout = [reload_parity(ctx, s, slices.models[s.layout]) for s in staged]
    serialisation = per_layout[0]
    serialisation.reference = "sliced (in memory)"
    serialisation.comparisons = [r.comparisons[0] for r in per_layout]
    sliced = {f"sliced-{layout}": m for layout, m in slices.models.items()}
    model = ctx.model
    in_dtype = check_parity(
        ("masked", model, lambda: masked(model, plan)), sliced, gating=False, **inputs
    )
    exact = exactness(model, plan, slices.layouts, **inputs)
    tokenization = None if vocabulary is None else tokenization_proof(ctx, tokenizer, vocabulary)
    return _record(ctx, ParityResult([exact, serialisation, in_dtype], files, tokenization))


def exactness(
    model: PreTrainedModel,
    plan: PrunePlan,
    layouts: Sequence[str],
    *,
    vocabulary: Vocabulary | None,
    **inputs: Any,
) -> ParityReport:
    """The slicing procedure itself against masking, in float64 so that rounding cannot hide
    a wrong unit. A plan that cuts only MLP units is proven MLP by MLP on the masked
    model's trajectory (``slicing_parity``: one float64 MLP at a time, a fraction of the
    model); one that also cuts heads, layers or the vocabulary by whole float64 models:
    the masked one, and one slice of it at a time (``sliced_copy``)."""
    if vocabulary is None and plan.head_cut() is None and not plan.dropped_layers:
        return slicing_parity(LayerwiseModel.resident(model), plan, layouts, **inputs)
    return whole_model_exactness(model, plan, layouts, vocabulary=vocabulary, **inputs)


def whole_model_exactness(
    model: PreTrainedModel,
    plan: PrunePlan,
    layouts: Sequence[str],
    *,
    vocabulary: Vocabulary | None = None,
    **inputs: Any,
) -> ParityReport:
    """float64 logits of the masked model against each float64 slice, one slice at a time
    (``sliced_copy``: it shares the tensors the plan leaves as they are)."""
    reference64 = copy.deepcopy(model).double()
    comparisons = []
    for layout in layouts:
        sliced64 = sliced_copy(reference64, plan, layout=layout)
        report = check_parity(
            ("masked", reference64, lambda: masked(reference64, plan)),
            {f"sliced-{layout}": sliced64},
            vocabulary=vocabulary,
            **inputs,
        )
        comparisons += report.comparisons
        del sliced64
    report.comparisons = comparisons
    return report


def tokenization_proof(
    ctx: RunContext, trimmed: Any, vocabulary: Vocabulary
) -> dict[str, dict[str, Any]]:
    """How the ``trimmed`` tokenizer writes the calibration prompts (all made of kept
    tokens: each must be tokenized as before) and the held-out prompts (those made of kept
    tokens as before; every prompt must decode as before)."""
    out = {}
    for split in ("calibration", "heldout"):
        prompts, _ = ctx.prompts_of((split,))
        out[split] = tokenization_parity(ctx.tokenizer, trimmed, vocabulary, prompts)
    calibration = out["calibration"]
    if calibration["in_vocabulary"] != calibration["texts"]:
        calibration["passed"] = False  # the cut was made from them: every one must be kept
    return out


def _check_streamed(ctx: RunContext, plan: PrunePlan, layouts: Sequence[str]) -> dict[str, Any]:
    """``save.onload: sequential``, one decoder block in memory at a time: every layout
    sliced and saved from the model's safetensors into staging (``scale.stream_save``);
    float64: each block's MLP sliced in memory against the MLP masked by the plan, on the
    inputs of replayed held-out prompts; the model's dtype: the saved tensors against the
    slice, bit for bit, and the saved config's shapes against them."""
    source = checkpoint_dir(ctx.recipe.model)
    staged = {layout: ctx.layout.staging_dir(layout) for layout in layouts}
    for layout, staging in staged.items():
        save_sliced_layerwise(
            source, plan, staging, layout=layout, dtype=ctx.dtype, tokenizer=ctx.tokenizer
        )
    files = {ctx.layout.checkpoint_dir(lay).name: file_digests(d) for lay, d in staged.items()}
    cfg = ctx.recipe.check
    prompts = ctx.heldout_prompts(cfg.samples)
    exact = slicing_parity(
        source,
        plan,
        layouts,
        ctx.tokenizer,
        prompts,
        atol=cfg.atol,
        max_length=ctx.max_length,
        dtype=ctx.dtype,
    )
    saved = saved_tensors_parity(source, staged, plan, dtype=ctx.dtype)
    return _record(ctx, ParityResult([exact, saved], files=files))


def _record(ctx: RunContext, result: ParityResult) -> dict[str, Any]:
    """Write the parity result; on failure drop the staged checkpoints and raise."""
    logger.info("check:\n%s", result.table())
    ctx.layout.write_parity(result)
    if not result.passed:
        shutil.rmtree(ctx.layout.staging_root, ignore_errors=True)
        result.raise_if_failed()
    return {"max_abs": result.worst(), "passed": result.passed}
