"""What the extra formats share: optional dependencies, logit comparison, perplexity."""

from __future__ import annotations

from typing import Any

from fbnprune.publish.errors import ExportError
from fbnprune.publish.weights import WEIGHTS_INDEX


def require(module: str, extra: str, flag: str) -> None:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ExportError(
            f"{flag} needs the '{extra}' extra ({module} is not installed): "
            f"pip install 'fbnprune[{extra}]'"
        ) from exc


def nll(logits: Any, batches: list[tuple[Any, Any]]) -> float:
    """Mean next-token negative log-likelihood over real tokens (logits as real_token_logits)."""
    import torch

    total, count, start = 0.0, 0, 0
    for input_ids, attention in batches:
        mask = attention.bool()
        n = int(mask.sum())
        rows = logits[start : start + n]
        start += n
        targets = input_ids[mask]
        # position t predicts token t+1 of the same row: drop each row's last real token
        lengths = mask.sum(1).tolist()
        keep = torch.ones(n, dtype=torch.bool)
        ends = torch.tensor(lengths).cumsum(0) - 1
        keep[ends] = False
        nxt = torch.roll(targets, -1)
        total += float(torch.nn.functional.cross_entropy(rows[keep], nxt[keep], reduction="sum"))
        count += int(keep.sum())
    return total / max(count, 1)


def compare(reference: Any, candidate: Any) -> dict[str, float]:
    delta = (candidate - reference).abs()
    return {
        "max_abs": float(delta.max()),
        "mean_abs": float(delta.mean()),
        "top1_agreement": float((candidate.argmax(-1) == reference.argmax(-1)).float().mean()),
        "n_tokens": int(reference.shape[0]),
    }


def export_only(name: str) -> bool:
    """Files of the export that a format folder does not repeat (weights, card, reports)."""
    return (
        name.endswith(".safetensors")
        or name in (WEIGHTS_INDEX, "README.md")
        or name.startswith("fbnprune_")
    )
