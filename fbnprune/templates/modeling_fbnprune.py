"""Compact fbnprune checkpoint: a stock __BASE_CLASS__ whose MLPs have per-layer widths.

Written by fbnprune. ``config.fbnprune_compact`` lists each layer's number of MLP units; this
class builds the stock model, then gives every MLP projection its pruned shape before the
weights are loaded. Load with ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``.
"""

from torch import nn
from transformers import __BASE_CLASS__
from transformers.pytorch_utils import Conv1D


def _resolve(root, path):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _projection(ref, n_in, n_out, bias, conv1d):
    dtype, device = ref.weight.dtype, ref.weight.device
    if conv1d:
        return Conv1D(n_out, n_in).to(dtype=dtype, device=device)
    return nn.Linear(n_in, n_out, bias=bias, dtype=dtype, device=device)


def resize_mlps(model, spec):
    """Replace each layer's MLP projections with empty ones of the pruned width."""
    conv1d = spec["conv1d"]
    for layer, width in zip(_resolve(model, spec["layers"]), spec["widths"], strict=True):
        mlp = getattr(layer, spec["mlp"])
        for name in spec["in_projs"]:
            old = getattr(mlp, name)
            n_in = old.weight.shape[0] if conv1d else old.weight.shape[1]
            n_out = 2 * width if spec["fused_gate_up"] else width
            setattr(mlp, name, _projection(old, n_in, n_out, old.bias is not None, conv1d))
        old = getattr(mlp, spec["down"])
        n_out = old.weight.shape[1] if conv1d else old.weight.shape[0]
        bias = old.bias is not None or spec["down_bias"]
        setattr(mlp, spec["down"], _projection(old, width, n_out, bias, conv1d))


class FbnpruneCompactForCausalLM(__BASE_CLASS__):
    def __init__(self, config):
        super().__init__(config)
        resize_mlps(self, config.fbnprune_compact)
        _inherit_weight_renamings()


def _inherit_weight_renamings():
    """Custom classes skip the stock class's checkpoint key renamings; register them.

    transformers keys the registry by class name, which every compact family shares, so
    each construction registers its own family's renamings (an empty list when it has
    none): the model being loaded or saved is the one built last."""
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # transformers without conversion mappings
        return
    stock = get_checkpoint_conversion_mapping(__BASE_CLASS__.__name__)
    if stock is None:
        stock = get_checkpoint_conversion_mapping(__BASE_CLASS__.config_class.model_type)
    register_checkpoint_conversion_mapping(
        FbnpruneCompactForCausalLM.__name__, stock or [], overwrite=True
    )
