"""Sequential refit: each layer refit on the activations of a model whose lower layers are
already pruned and refit (``prune.sequential: true`` with ``fill: reconstruct``).

The original model runs once over the calibration prompts while a pre-hook on every decoder
layer records what it is called with (the hidden states entering layer 0, and each layer's
other arguments: attention mask, position embeddings, ...). Then, layer by layer, the block is
replayed on the hidden states that the pruned layers below produced: once to record its MLP's
hidden units ``H`` on the real tokens, from which ``fbnprune.refit.solve_layer`` refits the
kept down-projection columns and bias (reproducing ``H W^T``, the dense MLP's output on the
inputs the pruned model actually sees, as SparseGPT and ZipLM do); once more with that refit
applied, to produce the next layer's input. The cost is about two forward passes over the
calibration text, and memory holds one batch-set of hidden states.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fbnprune.collect import token_batches
from fbnprune.mask import masked
from fbnprune.models.adapters import get_adapter
from fbnprune.plan import PrunePlan
from fbnprune.refit import Refit, down_weights, solve_layer

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def _capture_layer_calls(
    model: PreTrainedModel, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[list[torch.Tensor], list[list[tuple[tuple, dict]]]]:
    """Per batch: the hidden states entering layer 0, and per layer (args, kwargs) of its
    call with the hidden states removed from ``args``."""
    adapter = get_adapter(model)
    layers = adapter.get_layers(model)
    inputs: list[torch.Tensor] = []
    calls: list[list[tuple[tuple, dict]]] = []
    current: list[tuple[tuple, dict]] = []

    def record(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if index == 0:
                hidden = args[0] if args else kwargs["hidden_states"]
                inputs.append(hidden.detach())
            rest = dict(kwargs)
            rest.pop("hidden_states", None)
            current.append((tuple(args[1:]), rest))

        return hook

    handles = [layer.register_forward_pre_hook(record(i), with_kwargs=True)
               for i, layer in enumerate(layers)]  # fmt: skip
    try:
        backbone = adapter.get_backbone(model)
        for input_ids, attention in batches:
            current = []
            backbone(input_ids=input_ids, attention_mask=attention, use_cache=False)
            calls.append(current)
    finally:
        for handle in handles:
            handle.remove()
    return inputs, calls


def _output(result: Any) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


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
    hidden, calls = _capture_layer_calls(model, batches)
    real = [attention.bool() for _, attention in batches]
    weights = [torch.from_numpy(d.astype(np.float32)) for d in downs]  # identity refit
    biases = [torch.zeros(d.shape[0]) for d in downs]
    all_units = [list(range(w)) for w in layer_widths]
    model_type = model.config.model_type
    for index in tqdm(range(len(layers)), desc="refit (sequential)", unit="layer",
                      disable=not progress):  # fmt: skip
        seen: list[np.ndarray] = []

        def grab(module: nn.Module, args: tuple, store: list = seen) -> None:
            store.append(args[0].detach().float().cpu())

        handle = adapter.get_down(layers[index]).register_forward_pre_hook(grab)
        try:
            for b, x in enumerate(hidden):
                args, kwargs = calls[b][index]
                layers[index](x, *args, **kwargs)
        finally:
            handle.remove()
        units = [h[m].numpy() for h, m in zip(seen, real, strict=True)]
        v, c = solve_layer(units, downs[index], kept[index], ridge=ridge)
        weights[index] = torch.from_numpy(v.astype(np.float32))
        biases[index] = torch.from_numpy(c.astype(np.float32))
        sofar = kept[: index + 1] + all_units[index + 1 :]
        plan = PrunePlan(model="", model_type=model_type, site="hidden", fill="reconstruct",
                         layer_widths=list(layer_widths), kept=sofar,
                         refit=Refit(weights, biases, ridge))  # fmt: skip
        with masked(model, plan):
            hidden = [_output(layers[index](x, *calls[b][index][0], **calls[b][index][1]))
                      for b, x in enumerate(hidden)]  # fmt: skip
    return Refit(weights, biases, ridge)
