"""Layer-sequential onloading: a model whose decoder blocks hold weights one at a time.

``LayerwiseModel.from_checkpoint`` builds the model on the meta device (accelerate's
``init_empty_weights``), loads what is not a decoder block (embeddings, final norm; the LM
head is never needed) from the checkpoint's safetensors files, and ``onload(i)`` fills block
``i`` from disk (``safetensors.safe_open``, accelerate's ``set_module_tensor_to_device``) and
empties it again afterwards. So memory holds one block's weights, whatever the model's size.
``LayerwiseModel.resident`` wraps a model already in memory (``onload`` does nothing): the same
code path for small models.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fbnprune.models.adapters import MLPAdapter, get_adapter
from fbnprune.models.errors import ModelLoadError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

INDEX_FILE = "model.safetensors.index.json"  # a checkpoint's own file names (transformers')
SINGLE_FILE = "model.safetensors"


class Checkpoint:
    """The tensors of a safetensors checkpoint (one file, or shards and their index), read
    one tensor at a time (a file is mapped only while one of its tensors is read)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {k: self.directory / f for k, f in weight_map.items()}
        elif (self.directory / SINGLE_FILE).is_file():
            from safetensors import safe_open

            with safe_open(self.directory / SINGLE_FILE, framework="pt") as f:
                self.files = {k: self.directory / SINGLE_FILE for k in f.keys()}  # noqa: SIM118
        else:
            raise ModelLoadError(
                f"{self.directory} holds no safetensors weights ({SINGLE_FILE} "
                f"or {INDEX_FILE}): layer-sequential onloading reads only "
                "safetensors checkpoints"
            )

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def tensor(self, key: str) -> torch.Tensor:
        with self._open(key) as f:
            return f.get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of tensor ``key``, from the file's header (nothing loaded)."""
        with self._open(key) as f:
            return tuple(f.get_slice(key).get_shape())

    def _open(self, key: str) -> Any:
        """The safetensors file that holds ``key``, opened on the CPU."""
        from safetensors import safe_open

        if key not in self.files:
            raise ModelLoadError(f"{self.directory}: the checkpoint has no tensor {key!r}")
        return safe_open(self.files[key], framework="pt", device="cpu")

    def load(
        self, module: nn.Module, prefix: str, device: torch.device, *, skip: tuple[str, ...] = ()
    ) -> None:
        """Fill ``module``'s parameters and persistent buffers from the tensors named
        ``prefix + name`` (in the dtype the module holds); names under ``skip`` stay as
        they are. Buffers the checkpoint lacks keep their computed values."""
        from accelerate.utils import set_module_tensor_to_device

        persistent = {n for n, _ in module.named_buffers()} - _non_persistent(module)
        names = [n for n, _ in module.named_parameters()] + sorted(persistent)
        for name in names:
            if name.startswith(skip):
                continue
            key = prefix + name
            if key not in self and name in persistent:
                continue
            set_module_tensor_to_device(module, name, device, value=self.tensor(key))


def _non_persistent(module: nn.Module) -> set[str]:
    return {
        f"{p}.{b}" if p else b
        for p, m in module.named_modules()
        for b in m._non_persistent_buffers_set
    }


def release(module: nn.Module) -> None:
    """Move ``module``'s parameters back to the meta device (their memory is freed)."""
    from accelerate.utils import set_module_tensor_to_device

    for name, _ in list(module.named_parameters()):
        set_module_tensor_to_device(module, name, "meta")


class LayerwiseModel:
    """A causal LM whose decoder blocks are onloaded one at a time (``onload``).

    Attributes:
        model: the model; from a checkpoint, its blocks are on the meta device except while
            onloaded.
        adapter: its family's ``MLPAdapter``.
        device: where onloaded weights and the hidden states live.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        checkpoint: Checkpoint | None,
        device: torch.device,
        prefix: str = "",
    ) -> None:
        """``prefix``: the checkpoint's key prefix of the backbone's tensors."""
        self.model, self.checkpoint, self.device = model, checkpoint, device
        self.adapter: MLPAdapter = get_adapter(model)
        self.key_prefix = prefix

    @classmethod
    def resident(cls, model: PreTrainedModel) -> LayerwiseModel:
        """A model already in memory: ``onload`` gives its blocks as they are."""
        return cls(model, None, next(model.parameters()).device)

    @classmethod
    def from_checkpoint(
        cls,
        directory: str | os.PathLike[str],
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        trust_remote_code: bool = False,
    ) -> LayerwiseModel:
        """The model of the checkpoint in ``directory`` (``config.json`` and safetensors),
        everything but its decoder blocks (and LM head) loaded on ``device``
        (``trust_remote_code``: a compact checkpoint's own modeling file)."""
        model = empty_model(directory, dtype=dtype, trust_remote_code=trust_remote_code)
        checkpoint, device = Checkpoint(directory), torch.device(device)
        adapter = get_adapter(model)
        prefix = adapter.backbone + "."
        if not any(k.startswith(prefix) for k in checkpoint.files):
            prefix = ""  # a base model's checkpoint (keys without the backbone's name)
        checkpoint.load(adapter.get_backbone(model), prefix, device, skip=(adapter.layers + ".",))
        return cls(model, checkpoint, device, prefix)

    @property
    def n_layers(self) -> int:
        return len(self.adapter.get_layer_list(self.model))

    def block_prefix(self, index: int) -> str:
        """The checkpoint's key prefix of block ``index``'s tensors."""
        return f"{self.key_prefix}{self.adapter.layers}.{index}."

    @contextlib.contextmanager
    def onload(self, index: int) -> Iterator[nn.Module]:
        """Block ``index`` with its weights, emptied again on leaving (from a checkpoint)."""
        block = self.adapter.get_layer_list(self.model)[index]
        if self.checkpoint is None:
            yield block
            return
        self.checkpoint.load(block, self.block_prefix(index), self.device)
        try:
            yield block
        finally:
            release(block)

    @contextlib.contextmanager
    def onload_mlp(self, index: int, dtype: torch.dtype) -> Iterator[nn.Module]:
        """A copy of block ``index``'s MLP in ``dtype``, with its weights; from a checkpoint
        only the MLP's tensors are read, and freed again on leaving."""
        mlp = self.adapter.get_mlp(self.adapter.get_layer_list(self.model)[index])
        if self.checkpoint is None:
            yield copy.deepcopy(mlp).to(dtype)
            return
        copied = copy.deepcopy(mlp).to(dtype)  # empty: the block is on the meta device
        prefix = f"{self.block_prefix(index)}{self.adapter.mlp}."
        self.checkpoint.load(copied, prefix, self.device)
        try:
            yield copied
        finally:
            release(copied)


def down_projections(source: PreTrainedModel | LayerwiseModel) -> Iterator[torch.Tensor]:
    """Every block's down-projection weight as a (d_model, units) tensor in its stored
    dtype, one block at a time: from a model in memory, or read tensor by tensor from a
    ``LayerwiseModel``'s checkpoint, so no more than one is held (the refit and the wanda
    selector need nothing else of the weights)."""
    if isinstance(source, LayerwiseModel) and source.checkpoint is not None:
        adapter, checkpoint = source.adapter, source.checkpoint
        for index in range(source.n_layers):
            key = f"{source.block_prefix(index)}{adapter.mlp}.{adapter.down}.weight"
            weight = checkpoint.tensor(key)
            yield weight.T if adapter.conv1d else weight
        return
    model = source.model if isinstance(source, LayerwiseModel) else source
    adapter = get_adapter(model)
    for layer in adapter.get_layers(model):
        weight = adapter.get_down(layer).weight.detach()
        yield weight.T if adapter.conv1d else weight


def empty_model(
    directory: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """The model of ``directory``'s config on the meta device (accelerate's
    ``init_empty_weights``): every shape and dtype, no memory, no weights read."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    remote = {"trust_remote_code": True} if trust_remote_code else {}
    config = AutoConfig.from_pretrained(directory, **remote)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **remote)
    return model.eval()


def checkpoint_dir(name: str | os.PathLike[str]) -> Path:
    """The local folder of a model's checkpoint, by any name ``load_model`` accepts (a Hub
    id: its snapshot in the Hugging Face cache, downloaded when online)."""
    from fbnprune.models.loading import resolve_model

    source = resolve_model(name)
    if isinstance(source, Path):
        return source
    from huggingface_hub import constants, snapshot_download

    return Path(
        snapshot_download(
            source,
            allow_patterns=["*.json", "*.safetensors"],
            local_files_only=constants.HF_HUB_OFFLINE,
        )
    )


def down_weights(model: PreTrainedModel) -> list[np.ndarray]:
    """Every layer's down projection as a float64 (d_model, units) array."""
    return [w.double().cpu().numpy() for w in down_projections(model)]


def down_weight(adapter: MLPAdapter, layer: nn.Module) -> np.ndarray:
    """One decoder block's down projection as a float64 (d_model, units) array."""
    weight = adapter.get_down(layer).weight.detach().double().cpu()
    return (weight.T if adapter.conv1d else weight).numpy()
