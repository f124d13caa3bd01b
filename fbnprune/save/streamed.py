"""A sliced checkpoint written one decoder layer at a time, from the original's safetensors.

``save_sliced_layerwise`` onloads each decoder block of the original checkpoint
(``LayerwiseModel``), slices it with the same code as ``slicing.slice_model``
(``slice_layer``), writes its tensors to their own shard and empties it again; the other
tensors (embeddings, final norm, LM head) are copied from the original's files, the config is
``slice_config``'s. So memory holds one block, and the checkpoint is the one ``slice_model`` +
``save_checkpoint`` write, tensor for tensor (the tests compare them exactly).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerBase

from fbnprune.io import atomic_directory
from fbnprune.models.hooks import site_widths
from fbnprune.models.onload import INDEX_FILE, LayerwiseModel
from fbnprune.plan import PrunePlan
from fbnprune.pruning.slicing import SliceError, check_sliceable, slice_config, slice_layer
from fbnprune.save.checkpoint import own_auto_map, stock_class, write_modeling_file

GENERATION_CONFIG = "generation_config.json"  # transformers' own file name


def shard_name(index: int, count: int) -> str:
    """transformers' name of shard ``index`` (from 0) of ``count``."""
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def save_sliced_layerwise(
    source_dir: str | os.PathLike[str],
    plan: PrunePlan,
    directory: Path,
    *,
    layout: str = "padded",
    dtype: torch.dtype = torch.float32,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Path:
    """Write the checkpoint of ``plan`` applied to the model in ``source_dir`` (``config.json``
    and safetensors) to ``directory`` (atomically), one decoder block in memory at a time.

    Args:
        source_dir: the original checkpoint.
        plan: the plan; must fit the model.
        directory: the sliced checkpoint; one shard per block and one for the rest.
        layout: ``padded`` or ``compact`` (as ``slice_model``).
        dtype: the weights' dtype (as the model loaded for ``slice_model``).
        tokenizer: saved beside the weights when given.
    """
    if plan.vocabulary is not None or plan.dropped_layers or plan.heads is not None:
        raise SliceError(
            "save.onload: sequential slices only the MLPs, and copies the embedding and LM "
            "head as they are; a plan with a vocabulary, head or depth cut is saved with "
            "save.onload: full"
        )
    source = LayerwiseModel.from_checkpoint(source_dir, dtype=dtype)
    model, adapter, checkpoint = source.model, source.adapter, source.checkpoint
    assert checkpoint is not None
    plan.check_fits(site_widths(model, adapter, plan.site), model.config.model_type)
    check_sliceable(adapter, plan, layout)
    blocks = f"{source.key_prefix}{adapter.layers}."
    count = source.n_layers + 1
    weight_map: dict[str, str] = {}
    total = 0
    with atomic_directory(Path(directory)) as tmp:
        for index in range(source.n_layers):
            with source.onload(index) as block:
                slice_layer(adapter, block, plan, index, layout=layout)
                tensors = {
                    f"{blocks}{index}.{name}": value.contiguous()
                    for name, value in block.state_dict().items()
                }
                total += _write(tensors, tmp, shard_name(index, count), weight_map)
        rest = {
            key: _as(checkpoint.tensor(key), dtype)
            for key in checkpoint.files
            if not key.startswith(blocks)
        }
        total += _write(rest, tmp, shard_name(count - 1, count), weight_map)
        listing = {
            "metadata": {"total_size": total},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (tmp / INDEX_FILE).write_text(json.dumps(listing, indent=2) + "\n")
        config = copy.deepcopy(model.config)
        slice_config(config, adapter, plan, layout=layout)
        if layout == "compact":
            write_modeling_file(tmp, stock_class(model))
        own_auto_map(config, layout == "compact")  # a copy: nothing to restore
        config.save_pretrained(tmp)
        if (Path(source_dir) / GENERATION_CONFIG).is_file():
            shutil.copyfile(Path(source_dir) / GENERATION_CONFIG, tmp / GENERATION_CONFIG)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(directory)


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _write(
    tensors: dict[str, torch.Tensor], directory: Path, name: str, weight_map: dict[str, str]
) -> int:
    """Write one shard; record its tensors in ``weight_map``; return its bytes."""
    save_file(tensors, str(directory / name), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(tensors, name))
    return sum(t.numel() * t.element_size() for t in tensors.values())
