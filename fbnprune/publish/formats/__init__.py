"""The export's extra formats (``int8/``, ``onnx/``), measured against the exported model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fbnprune.publish.formats.common import require
from fbnprune.publish.formats.int8 import quantize_int8
from fbnprune.publish.formats.onnx import ONNX_MIN_ATOL, export_onnx
from fbnprune.publish.inputs import read_yaml

logger = logging.getLogger(__name__)

FALLBACK_TEXTS = (
    "The committee published its annual report on Tuesday, with figures for every region.",
    "def add(a, b):\n    return a + b\n",
    "Rain is expected across the north tonight, clearing by the morning.",
    "The striker scored twice in the second half to win the match.",
)


def evaluation_texts(recipe_text: str, n: int = 8) -> tuple[list[str], str]:
    """The run's held-out prompts (round-robin over tasks), or fixed fallback sentences."""
    try:
        from fbnprune.data.task_text import load_task
        from fbnprune.recipe import parse_recipe

        recipe = parse_recipe(read_yaml(recipe_text))
        per_task = [load_task(t, seed=recipe.seed).prompts("heldout") for t in recipe.tasks]
        texts = [p[i] for i in range(max(map(len, per_task))) for p in per_task if i < len(p)]
        if texts:
            return texts[:n], "heldout"
    except Exception as exc:  # noqa: BLE001 - any failure to rebuild the data means "fallback"
        logger.warning(
            "export: cannot rebuild the run's held-out text (%s); comparing formats "
            "on fixed sentences",
            exc,
        )
    return list(FALLBACK_TEXTS), "fallback"


def extra_formats(
    folder: Path,
    layout: str,
    *,
    quantize: str | None,
    onnx: bool,
    texts: list[str],
    atol: float,
    repo_id: str | None,
) -> dict[str, dict[str, Any]]:
    """Write the int8 and ONNX formats of the exported model and measure them against it."""
    if quantize:
        require("optimum.quanto", "quantize", "--quantize int8")
    if onnx:
        for module in ("onnx", "onnxscript", "onnxruntime"):
            require(module, "onnx", "--onnx")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fbnprune.check.compare import real_token_logits
    from fbnprune.collect.activations import token_batches

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, trust_remote_code=layout == "compact"
    ).eval()
    batches = token_batches(tokenizer, texts, max_length=128, batch_size=4)
    reference = real_token_logits(model, batches)
    out = {}
    if quantize:
        out["int8"] = quantize_int8(model, folder, layout, batches, reference, repo_id)
    if onnx:
        out["onnx"] = export_onnx(model, folder, batches, reference, max(atol, ONNX_MIN_ATOL))
    return out
