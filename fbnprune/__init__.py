"""fbnprune: keep the functional networks of MLP neurons a task needs, slice the rest away.

The face of the package::

    from fbnprune import Recipe, run, prune, PrunePlan

    summary = run("recipes/demo.yaml", "runs/demo")        # what ``fbnprune run`` does
    sliced, plan = prune(model, tokenizer, {"qa": prompts}, budget=0.25)  # in memory

Names are imported on first use, so ``import fbnprune`` (and the CLI) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fbnprune.moved import install
from fbnprune.version import __version__

install()  # old module paths (fbnprune.mask, fbnprune.stages.pipeline, ...) keep working

__all__ = ["FbnpruneError", "PrunePlan", "Recipe", "__version__", "load_recipe", "prune", "run"]

if TYPE_CHECKING:
    from fbnprune.api import prune, run
    from fbnprune.errors import FbnpruneError
    from fbnprune.plan import PrunePlan
    from fbnprune.recipe import Recipe, load_recipe

_LAZY = {
    "run": "fbnprune.api",
    "prune": "fbnprune.api",
    "FbnpruneError": "fbnprune.errors",
    "PrunePlan": "fbnprune.plan",
    "Recipe": "fbnprune.recipe",
    "load_recipe": "fbnprune.recipe",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'fbnprune' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
