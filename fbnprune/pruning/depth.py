"""The depth cut: whole decoder blocks dropped.

``skipped_blocks(model, layers)`` makes the named blocks pass their input through unchanged
(forward hooks; the weights stay): the masked reference a model without those blocks must
reproduce. ``drop_blocks(model, layers)`` removes them: the block list, every per-layer
list of the config (e.g. Gemma 3's ``layer_types``, the compact layout's MLP widths) and the
layer numbers the attention modules index their cache with, so the result is a stock model
of fewer layers that ``from_pretrained`` builds from its config.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from fbnprune.errors import FbnpruneError
from fbnprune.models.adapters import get_adapter
from fbnprune.models.loading import COMPACT_KEY

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

LAYER_COUNT_KEY = "num_hidden_layers"  # GPT-2's n_layer answers to it through attribute_map


class DepthError(FbnpruneError, ValueError):
    """Blocks that cannot be dropped as asked."""


def _pass_through(_: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
    hidden = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, tuple):  # families whose blocks return (hidden, extras...)
        return (hidden, *output[1:])
    return hidden


@contextlib.contextmanager
def skipped_blocks(model: PreTrainedModel, layers: Sequence[int]) -> Iterator[None]:
    """Inside the block, the decoder blocks numbered ``layers`` return their input."""
    blocks = get_adapter(model).get_layers(model)
    handles = [
        blocks[i].register_forward_hook(_pass_through, with_kwargs=True) for i in sorted(layers)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def check_droppable(n_layers: int, layers: Sequence[int]) -> None:
    """Raise unless ``layers`` are distinct block numbers that leave at least one block."""
    if len(set(layers)) != len(layers) or any(not 0 <= i < n_layers for i in layers):
        raise DepthError(f"dropped layers {list(layers)} must be distinct, in [0, {n_layers})")
    if len(layers) >= n_layers:
        raise DepthError(f"dropping {len(layers)} of {n_layers} layers leaves none")


def drop_blocks(model: PreTrainedModel, layers: Sequence[int]) -> PreTrainedModel:
    """Remove the decoder blocks numbered ``layers`` (in place) and renumber the rest;
    return the model."""
    adapter = get_adapter(model)
    block_list = adapter.get_layer_list(model)
    n_layers = len(block_list)
    check_droppable(n_layers, layers)
    kept = [i for i in range(n_layers) if i not in set(layers)]
    new_blocks = nn.ModuleList([block_list[i] for i in kept])
    for new_index, block in enumerate(new_blocks):
        for module in block.modules():
            numbered: Any = module
            if isinstance(getattr(numbered, "layer_idx", None), int):
                numbered.layer_idx = new_index  # the cache slot it reads and writes
    parent_path, _, name = f"{adapter.backbone}.{adapter.layers}".rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new_blocks)
    drop_from_config(model.config, n_layers, kept)
    return model


def drop_from_config(config: Any, n_layers: int, kept: Sequence[int]) -> None:
    """Keep ``kept`` of ``n_layers`` in the config (and its text config): the layer count
    and every list with one entry per layer."""
    for part in {id(c): c for c in (config, config.get_text_config())}.values():
        if getattr(part, LAYER_COUNT_KEY, None) != n_layers:
            continue
        setattr(part, LAYER_COUNT_KEY, len(kept))
        for key, value in list(vars(part).items()):
            if isinstance(value, list) and len(value) == n_layers:
                setattr(part, key, [value[i] for i in kept])
                logger.info(
                    "config.%s: %d -> %d entries (layers dropped)", key, n_layers, len(kept)
                )
        spec = getattr(part, COMPACT_KEY, None)
        if isinstance(spec, dict) and len(spec.get("widths", ())) == n_layers:
            spec["widths"] = [spec["widths"][i] for i in kept]
    logger.info("config.%s: %d -> %d", LAYER_COUNT_KEY, n_layers, len(kept))
