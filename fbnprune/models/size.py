"""The size of a model: unique parameters (tied weights counted once) and their bytes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class CheckpointSize:
    """Parameters and bytes of a model or a saved checkpoint."""

    parameters: int
    bytes: int

    def __str__(self) -> str:
        return f"{self.parameters / 1e6:.2f} M params, {self.bytes / 2**20:.1f} MiB"


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    seen = {id(p): p.numel() for p in model.parameters()}
    return sum(seen.values())


def model_size(model: nn.Module) -> CheckpointSize:
    unique = {id(p): p for p in model.parameters()}.values()
    return CheckpointSize(
        parameters=sum(p.numel() for p in unique),
        bytes=sum(p.numel() * p.element_size() for p in unique),
    )


COMPONENTS = ("embedding", "lm_head", "attention", "mlp", "norms and other")


def component_sizes(model: PreTrainedModel) -> dict[str, CheckpointSize]:
    """The model's size per component: the input ``embedding`` (with the LM head when they
    are tied), an untied ``lm_head``, each block's ``attention`` (what is neither its MLP nor
    a norm), the ``mlp`` and the rest (norms, position embeddings)."""
    from fbnprune.models.adapters import get_adapter

    adapter = get_adapter(model)
    owner: dict[int, str] = {}

    def claim(module: nn.Module | None, name: str) -> None:
        for p in () if module is None else module.parameters():
            owner.setdefault(id(p), name)

    claim(model.get_input_embeddings(), "embedding")
    claim(model.get_output_embeddings(), "lm_head")
    for block in adapter.get_layers(model):
        claim(getattr(block, adapter.mlp), "mlp")
        for module in block.modules():
            if "norm" in type(module).__name__.lower():
                claim(module, "norms and other")
        claim(block, "attention")
    unique = {id(p): p for p in model.parameters()}
    sizes = {name: [0, 0] for name in COMPONENTS}
    for key, p in unique.items():
        size = sizes[owner.get(key, "norms and other")]
        size[0] += p.numel()
        size[1] += p.numel() * p.element_size()
    return {name: CheckpointSize(*size) for name, size in sizes.items() if size[0]}
