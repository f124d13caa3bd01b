"""Save: write a sliced model as a safetensors checkpoint that loads with stock transformers.

``padded`` checkpoints load with plain ``AutoModelForCausalLM.from_pretrained``. ``compact``
checkpoints ship ``modeling_fbnprune.py`` and an ``auto_map`` entry, and load with
``trust_remote_code=True``. Directories are written atomically.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from fbnprune.io import atomic_directory
from fbnprune.pruning.slicing import COMPACT_KEY

MODELING_FILE = "modeling_fbnprune.py"
COMPACT_CLASS = "FbnpruneCompactForCausalLM"


def checkpoint_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in Path(directory).glob("*.safetensors"))


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    directory: Path,
    *,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Save ``model`` (padded or compact, as sliced) and its tokenizer to ``directory``.

    Args:
        model: a sliced (or original) causal LM.
        tokenizer: saved beside the weights when given.
        directory: the checkpoint directory; replaced atomically.
        extra_files: name -> text of further files to write (plan, recipe, reports).
    """
    directory = Path(directory)
    config = model.config
    compact = getattr(config, COMPACT_KEY, None) is not None
    with atomic_directory(directory) as tmp:
        if compact:
            write_modeling_file(tmp, stock_class(model))
        previous = own_auto_map(config, compact)
        try:
            model.save_pretrained(tmp)
        finally:
            config.__dict__.pop("auto_map", None)
            if previous is not None:
                config.auto_map = previous
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return directory


COMPACT_AUTO_MAP = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{COMPACT_CLASS}"}


def modeling_source(base: type) -> str:
    """The compact checkpoint's modeling file, on the stock class ``base``."""
    template = importlib.resources.files("fbnprune") / "templates" / MODELING_FILE
    return template.read_text().replace("__BASE_CLASS__", base.__name__)


def write_modeling_file(directory: Path, base: type) -> None:
    """Write ``modeling_source(base)`` into ``directory``."""
    (directory / MODELING_FILE).write_text(modeling_source(base))


def own_auto_map(config: PretrainedConfig, compact: bool) -> dict[str, str] | None:
    """Set ``config.auto_map`` to what fbnprune ships (the compact layout's, or none: a
    foreign one names code the checkpoint does not carry); return what it was."""
    previous = config.__dict__.pop("auto_map", None)
    if compact:
        config.auto_map = COMPACT_AUTO_MAP
    return previous


def stock_class(model: nn.Module) -> type:
    """The transformers class a (possibly remote-code) model derives from."""
    import transformers

    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers.") and hasattr(transformers, cls.__name__):
            return cls
    raise TypeError(f"{type(model).__name__} has no stock transformers base class")
