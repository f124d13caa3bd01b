"""The parity check one decoder layer at a time: a sliced checkpoint against its original.

``layerwise_parity`` replays held-out prompts through the original model block by block
(``LayerwiseModel``, ``LayerCalls``), the block masked by the plan (``mask.masked_layer``):
the reference trajectory. Each block of the sliced checkpoint is run on the same inputs as
the original's, and their outputs are compared on the real tokens. Everything that is not a
decoder block must be the original's tensors, exactly. So memory holds two blocks (one of
each model), and a wrong unit shows in the layer that holds it: the streamed form of the
check stage's float64 masked-vs-sliced comparison.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from fbnprune.collect import token_batches
from fbnprune.mask import masked_layer
from fbnprune.models.layercalls import capture_layer_calls
from fbnprune.models.onload import LayerwiseModel
from fbnprune.plan import PrunePlan
from fbnprune.slicing import COMPACT_KEY


@dataclass(frozen=True)
class LayerParity:
    """Per layer, max |masked original - sliced| of the block's output on the real tokens;
    the tensors outside the blocks that differ from the original's (none when right)."""

    layers: list[float]
    other_tensors_differing: list[str]
    atol: float

    @property
    def worst(self) -> float:
        return max(self.layers)

    @property
    def passed(self) -> bool:
        return self.worst <= self.atol and not self.other_tensors_differing


@torch.inference_mode()
def layerwise_parity(
    original: str | os.PathLike[str],
    sliced: str | os.PathLike[str],
    plan: PrunePlan,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    atol: float = 1e-4,
    max_length: int = 128,
    batch_size: int = 4,
    dtype: torch.dtype = torch.float64,
) -> LayerParity:
    """Compare the sliced checkpoint in ``sliced`` with ``plan`` applied to ``original``,
    one decoder block at a time, on ``prompts`` (in ``dtype``: float64 by default, so
    rounding cannot hide a wrong unit)."""
    compact = json.loads((Path(sliced) / "config.json").read_text()).get(COMPACT_KEY)
    reference = LayerwiseModel.from_checkpoint(original, dtype=dtype)
    candidate = LayerwiseModel.from_checkpoint(
        sliced, dtype=dtype, trust_remote_code=compact is not None
    )
    batches = token_batches(tokenizer, prompts, max_length, batch_size)
    calls = capture_layer_calls(reference.model, batches)
    hidden = calls.inputs
    real = [attention.bool() for _, attention in batches]
    adapter = reference.adapter
    worst: list[float] = []
    for index in range(reference.n_layers):
        with (
            reference.onload(index) as ref,
            candidate.onload(index) as cand,
            masked_layer(adapter, ref, index, plan),
        ):
            delta = 0.0
            for b, x in enumerate(hidden):
                want = calls.replay(ref, index, b, x)
                got = calls.replay(cand, index, b, x)
                delta = max(delta, float((got - want)[real[b]].abs().max()))
                hidden[b] = want
        worst.append(delta)
    return LayerParity(worst, _other_tensors_differing(reference, candidate), atol)


def _other_tensors_differing(a: LayerwiseModel, b: LayerwiseModel) -> list[str]:
    """The tensors outside the decoder blocks whose names or values differ."""
    assert a.checkpoint is not None and b.checkpoint is not None
    blocks = f"{a.key_prefix}{a.adapter.layers}."
    left = {k for k in a.checkpoint.files if not k.startswith(blocks)}
    right = {k for k in b.checkpoint.files if not k.startswith(blocks)}
    differ = sorted(left ^ right)
    for key in sorted(left & right):
        x, y = a.checkpoint.tensor(key), b.checkpoint.tensor(key)
        if x.shape != y.shape or not torch.equal(x.to(y.dtype), y):
            differ.append(key)
    return differ
