"""Architecture adapters: where each model family keeps its MLPs.

This table is the only place in fbnprune that knows module paths. Every other module asks
an ``MLPAdapter`` for the layers, the MLP's input projections (whose output rows are the
hidden units) and its down projection (whose input columns are the hidden units).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TypedDict, cast

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from fbnprune.errors import FbnpruneError


class UnsupportedArchitectureError(FbnpruneError, ValueError):
    """The model's family has no adapter."""


# an MLP projection: ``nn.Linear``, or GPT-2's ``Conv1D`` (weight stored as (in, out))
Projection = nn.Linear | Conv1D


@dataclass(frozen=True)
class MLPAdapter:
    """Where one family keeps its MLP modules, and how their weights are laid out.

    Attributes:
        family: human-readable family name.
        model_types: ``config.model_type`` values this adapter serves.
        backbone: attribute path of the decoder (the model without its LM head).
        layers: attribute path, from the backbone, of the ``nn.ModuleList`` of blocks.
        mlp: attribute name of the MLP inside a block.
        in_projs: names of the projections whose output units are the hidden units
            (gate first when gated). For fused gate/up, one name with ``fused_gate_up``.
        down: name of the projection that maps hidden units back to the residual stream.
        fused_gate_up: the single in-projection stacks [gate; up] along its output.
        conv1d: weights are GPT-2 ``Conv1D`` (stored transposed: ``(in, out)``).
        width_key: config attribute holding the MLP width (``None`` in config means 4*d).
        bias_key: config attribute that switches MLP biases on (``None``: fixed by family).
        always_bias: the family's MLP projections always carry biases.
    """

    family: str
    model_types: tuple[str, ...]
    backbone: str
    layers: str
    mlp: str
    in_projs: tuple[str, ...]
    down: str
    fused_gate_up: bool = False
    conv1d: bool = False
    width_key: str = "intermediate_size"
    bias_key: str | None = None
    always_bias: bool = False

    # -- module access -------------------------------------------------------------------
    def get_backbone(self, model: nn.Module) -> nn.Module:
        return _get_path(model, self.backbone)

    def get_layers(self, model: nn.Module) -> list[nn.Module]:
        return list(self.get_layer_list(model))

    def get_layer_list(self, model: nn.Module) -> nn.ModuleList:
        """The ``nn.ModuleList`` of blocks itself (to swap a block in place)."""
        return cast(nn.ModuleList, _get_path(self.get_backbone(model), self.layers))

    def get_mlp(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.mlp)

    def get_down(self, layer: nn.Module) -> Projection:
        return cast(Projection, getattr(self.get_mlp(layer), self.down))

    def get_in_projs(self, layer: nn.Module) -> list[Projection]:
        return [cast(Projection, getattr(self.get_mlp(layer), name)) for name in self.in_projs]

    # -- shapes ----------------------------------------------------------------------------
    def hidden_width(self, layer: nn.Module) -> int:
        """Number of hidden units of one block's MLP (read off its down projection)."""
        down = self.get_down(layer)
        return down.weight.shape[0] if self.conv1d else down.weight.shape[1]

    def output_width(self, layer: nn.Module) -> int:
        """Number of output channels (d_model) of one block's MLP."""
        down = self.get_down(layer)
        return down.weight.shape[1] if self.conv1d else down.weight.shape[0]

    def can_hold_down_bias(self) -> bool:
        """Whether a stock config of this family can give the down projection a bias."""
        return self.always_bias or self.bias_key is not None

    def config_width(self, config: PretrainedConfig) -> int:
        width = getattr(config, self.width_key, None)
        if width is not None:
            return int(width)
        if self.conv1d:  # GPT-2: n_inner=None means 4 * n_embd
            return 4 * int(config.n_embd)
        raise UnsupportedArchitectureError(f"the {self.family} config has no {self.width_key}")


class _Paths(TypedDict):
    backbone: str
    layers: str
    mlp: str
    in_projs: tuple[str, ...]
    down: str


LLAMA_LIKE: _Paths = dict(
    backbone="model",
    layers="layers",
    mlp="mlp",
    in_projs=("gate_proj", "up_proj"),
    down="down_proj",
)

ADAPTERS: tuple[MLPAdapter, ...] = (
    MLPAdapter(family="Llama", model_types=("llama",), bias_key="mlp_bias", **LLAMA_LIKE),
    MLPAdapter(family="Mistral", model_types=("mistral",), **LLAMA_LIKE),
    MLPAdapter(family="Qwen2", model_types=("qwen2",), **LLAMA_LIKE),
    MLPAdapter(family="Gemma3 text", model_types=("gemma3_text",), **LLAMA_LIKE),
    MLPAdapter(
        family="Phi-3",
        model_types=("phi3",),
        backbone="model",
        layers="layers",
        mlp="mlp",
        in_projs=("gate_up_proj",),
        down="down_proj",
        fused_gate_up=True,
    ),
    MLPAdapter(
        family="GPT-NeoX",
        model_types=("gpt_neox",),
        backbone="gpt_neox",
        layers="layers",
        mlp="mlp",
        in_projs=("dense_h_to_4h",),
        down="dense_4h_to_h",
        always_bias=True,
    ),
    MLPAdapter(
        family="GPT-2",
        model_types=("gpt2",),
        backbone="transformer",
        layers="h",
        mlp="mlp",
        in_projs=("c_fc",),
        down="c_proj",
        conv1d=True,
        width_key="n_inner",
        always_bias=True,
    ),
)

_BY_MODEL_TYPE = {mt: a for a in ADAPTERS for mt in a.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def get_adapter(model_or_config: PreTrainedModel | PretrainedConfig) -> MLPAdapter:
    """The adapter for a model (or its config); a clear error for unsupported families."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    hint = difflib.get_close_matches(str(model_type), _BY_MODEL_TYPE, n=1)
    raise UnsupportedArchitectureError(
        f"fbnprune has no adapter for model_type {model_type!r}"
        + (f" (did you mean {hint[0]!r}?)" if hint else "")
        + f". Supported: {', '.join(supported_model_types())}."
    )


def _get_path(root: nn.Module, path: str) -> nn.Module:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj
