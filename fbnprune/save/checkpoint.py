"""Save: write a sliced model as a safetensors checkpoint that loads with stock transformers.

``padded`` checkpoints load with plain ``AutoModelForCausalLM.from_pretrained``. ``compact``
checkpoints ship ``modeling_fbnprune.py`` and an ``auto_map`` entry, and load with
``trust_remote_code=True``. Directories are written atomically.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

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
            config.auto_map = COMPACT_AUTO_MAP
        try:
            model.save_pretrained(tmp)
        finally:
            if compact:
                del config.auto_map
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return directory


COMPACT_AUTO_MAP = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{COMPACT_CLASS}"}


def write_modeling_file(directory: Path, base: type) -> None:
    """The compact checkpoint's modeling file, on the stock class ``base``."""
    template = importlib.resources.files("fbnprune") / "templates" / MODELING_FILE
    source = template.read_text().replace("__BASE_CLASS__", base.__name__)
    (directory / MODELING_FILE).write_text(source)


def stock_class(model: nn.Module) -> type:
    """The transformers class a (possibly remote-code) model derives from."""
    import transformers

    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers.") and hasattr(transformers, cls.__name__):
            return cls
    raise TypeError(f"{type(model).__name__} has no stock transformers base class")
