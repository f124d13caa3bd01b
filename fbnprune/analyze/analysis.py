"""``Analysis``: what ``fbnprune analyze`` found, as the report and the figures read it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fbnprune.analyze.networks import NetworkSet


@dataclass
class Analysis:
    """What an analysis found: ``data`` is ``analysis.json``; ``templates`` keeps the
    template networks (site -> task -> networks) and ``layer_widths`` (site -> widths) for
    the figures."""

    out_dir: Path
    data: dict[str, Any]
    templates: dict[str, dict[str, NetworkSet]] = field(default_factory=dict)
    layer_widths: dict[str, list[int]] = field(default_factory=dict)
