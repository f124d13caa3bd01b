"""ONNX: ``torch.onnx.export(dynamo=True)`` of the logits, checked in onnxruntime."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fbnprune.publish.errors import ExportError
from fbnprune.publish.formats.common import compare

logger = logging.getLogger(__name__)

ONNX_FILE = "onnx/model.onnx"
ONNX_MIN_ATOL = 1e-3  # onnxruntime and PyTorch kernels differ by float rounding


def logits_only(model: Any) -> Any:
    """Wrap ``model`` so it returns only logits, without cache: what the ONNX graph computes."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.inner(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).logits

    return LogitsOnly(model).eval()


def export_onnx(
    model: Any, folder: Path, batches: list, reference: Any, atol: float
) -> dict[str, Any]:
    """``torch.onnx.export(dynamo=True)`` with dynamic batch and sequence; check in onnxruntime."""
    import numpy as np
    import onnxruntime
    import torch

    target = folder / ONNX_FILE
    target.parent.mkdir(parents=True)
    # a batch of 2+ so that the exporter does not specialise the batch dimension to 1
    example = (torch.full((2, 8), 3, dtype=torch.long), torch.ones(2, 8, dtype=torch.long))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    large = sum(p.numel() * p.element_size() for p in model.parameters()) > 2**30
    chatty = [logging.getLogger(n) for n in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [log.level for log in chatty]
    for log in chatty:  # one INFO line per deduplicated initializer otherwise
        log.setLevel(max(log.getEffectiveLevel(), logging.WARNING))
    try:
        program = torch.onnx.export(
            logits_only(model),
            example,
            dynamo=True,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            verbose=False,
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
        )
        assert program is not None  # dynamo=True always returns a program
        program.save(str(target), external_data=large)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types
        raise ExportError(
            f"ONNX export failed ({type(exc).__name__}: {str(exc)[:500]}); export without --onnx"
        ) from exc
    finally:
        for log, level in zip(chatty, levels, strict=True):
            log.setLevel(level)
    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    outputs = []
    for input_ids, attention in batches:
        logits = session.run(
            ["logits"], {"input_ids": input_ids.numpy(), "attention_mask": attention.numpy()}
        )[0]
        outputs.append(torch.from_numpy(np.asarray(logits))[attention.bool()])
    result: dict[str, Any] = {
        "path": ONNX_FILE,
        "bytes": sum(p.stat().st_size for p in target.parent.iterdir() if p.is_file()),
        "runtime": f"onnxruntime {onnxruntime.__version__}",
        "atol": atol,
        **compare(reference, torch.cat(outputs).float()),
    }
    if result["max_abs"] > atol:
        raise ExportError(
            f"onnxruntime logits differ from PyTorch by {result['max_abs']:.3g} "
            f"(> {atol:g}); export without --onnx"
        )
    logger.info(
        "export: onnx %.2f MiB, onnxruntime vs torch max |d logits| %.3g",
        result["bytes"] / 2**20,
        result["max_abs"],
    )
    return result
