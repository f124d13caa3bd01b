"""The short hashes fbnprune keys things by: ``digest`` of bytes, ``fingerprint`` of JSON-able
parts (a stage's key, a task's documents). Imports nothing of fbnprune, so every layer can."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def digest(blob: bytes, length: int = 16) -> str:
    """The first ``length`` hex digits of ``blob``'s sha256: the one short hash of fbnprune."""
    return hashlib.sha256(blob).hexdigest()[:length]


def fingerprint(*parts: Any) -> str:
    """The short hash of ``parts`` as sorted-key JSON: a stage's key, from its inputs."""
    return digest(json.dumps(parts, sort_keys=True).encode())
