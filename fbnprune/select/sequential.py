"""Sequential refit: each layer refit on the activations of a model whose lower layers are
already pruned and refit (``prune.sequential: true`` with ``fill: reconstruct``).

What the model calls its decoder layers with is recorded once
(``fbnprune.models.layercalls``: the hidden states entering layer 0, and each layer's other
arguments: attention mask, position embeddings, ...). Then, layer by layer, the block is
replayed on the hidden states that the pruned layers below produced: once to record its MLP's
hidden units ``H`` on the real tokens, from which ``fbnprune.select.refit.solve_layer`` refits the
kept down-projection columns and bias (reproducing ``H W^T``, the dense MLP's output on the
inputs the pruned model actually sees, as SparseGPT and ZipLM do); once more with that refit
applied, to produce the next layer's input. The cost is about two forward passes over the
calibration text, and memory holds the hidden states of every batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fbnprune.collect.activations import token_batches
from fbnprune.models.adapters import get_adapter
from fbnprune.models.layercalls import capture_layer_calls
from fbnprune.models.onload import down_weights
from fbnprune.plan import PrunePlan, Refit
from fbnprune.pruning.mask import masked
from fbnprune.select.refit import solve_layer

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@torch.inference_mode()
def sequential_refit(
    model: PreTrainedModel,
    tokenizer: Any,
    prompts: list[str],
    layer_widths: list[int],
    kept: list[list[int]],
    *,
    ridge: float,
    max_length: int,
    batch_size: int = 8,
    progress: bool = False,
) -> Refit:
    """The refit of every layer, each on inputs from the already pruned layers below it."""
    adapter = get_adapter(model)
    layers = adapter.get_layers(model)
    downs = down_weights(model)
    batches = token_batches(tokenizer, prompts, max_length, batch_size)
    calls = capture_layer_calls(model, batches)
    hidden = calls.inputs
    real = [attention.bool() for _, attention in batches]
    weights = [torch.from_numpy(d.astype(np.float32)) for d in downs]  # identity refit
    biases = [torch.zeros(d.shape[0]) for d in downs]
    all_units = [list(range(w)) for w in layer_widths]
    model_type = model.config.model_type
    for index in tqdm(
        range(len(layers)), desc="refit (sequential)", unit="layer", disable=not progress
    ):
        seen: list[np.ndarray] = []

        def grab(module: nn.Module, args: tuple, store: list = seen) -> None:
            store.append(args[0].detach().float().cpu())

        handle = adapter.get_down(layers[index]).register_forward_pre_hook(grab)
        try:
            for b, x in enumerate(hidden):
                calls.replay(layers[index], index, b, x)
        finally:
            handle.remove()
        units = [h[m].numpy() for h, m in zip(seen, real, strict=True)]
        v, c = solve_layer(units, downs[index], kept[index], ridge=ridge)
        weights[index] = torch.from_numpy(v.astype(np.float32))
        biases[index] = torch.from_numpy(c.astype(np.float32))
        sofar = kept[: index + 1] + all_units[index + 1 :]
        plan = PrunePlan(
            model="",
            model_type=model_type,
            site="hidden",
            fill="reconstruct",
            layer_widths=list(layer_widths),
            kept=sofar,
            refit=Refit(weights, biases, ridge),
        )
        with masked(model, plan):
            hidden = [calls.replay(layers[index], index, b, x) for b, x in enumerate(hidden)]
    return Refit(weights, biases, ridge)
