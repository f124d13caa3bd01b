"""The export's weights: copied byte for byte, or re-sharded and verified tensor by tensor."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

from fbnprune.publish.errors import ExportError

logger = logging.getLogger(__name__)

WEIGHTS_INDEX = "model.safetensors.index.json"


def copy_non_weights(source: Path, dest: Path) -> None:
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if (
            not path.is_file()
            or path.suffix == ".safetensors"
            or rel.as_posix() in (WEIGHTS_INDEX, "README.md")
        ):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / rel)


def write_weights(source: Path, dest: Path, limit: int) -> dict[str, Any]:
    """Copy the safetensors files when each fits ``limit``, else re-shard and verify them."""
    shards = sorted(source.glob("*.safetensors"))
    if not shards:
        raise ExportError(f"{source} holds no .safetensors weights")
    if all(s.stat().st_size <= limit for s in shards):
        for path in [*shards, source / WEIGHTS_INDEX]:
            if path.is_file():
                shutil.copy2(path, dest / path.name)
        return {"mode": "copied", "files": [s.name for s in shards]}

    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import load_file

    state: dict = {}
    for shard in shards:
        state.update(load_file(shard))
    save_torch_state_dict(state, dest, max_shard_size=limit, metadata={"format": "pt"})
    del state
    written = sorted(p.name for p in dest.glob("*.safetensors"))
    _verify_same_tensors(shards, sorted(dest.glob("*.safetensors")))
    logger.info(
        "export: re-sharded %d file(s) into %d of at most %d bytes",
        len(shards),
        len(written),
        limit,
    )
    return {"mode": "resharded", "files": written}


def _verify_same_tensors(before: list[Path], after: list[Path]) -> None:
    """Every tensor of ``before`` is in ``after`` with equal dtype, shape and values."""
    import torch
    from safetensors import safe_open

    located = {}
    for file in after:
        with safe_open(file, framework="pt") as handle:
            located.update(dict.fromkeys(handle.keys(), file))
    names: set[str] = set()
    for file in before:
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                names.add(key)
                if key not in located:
                    raise ExportError(f"re-sharding lost tensor {key}")
                with safe_open(located[key], framework="pt") as other:
                    a, b = handle.get_tensor(key), other.get_tensor(key)
                if a.dtype != b.dtype or not torch.equal(a, b):
                    raise ExportError(f"re-sharding changed tensor {key}")
    if set(located) != names:
        raise ExportError(f"re-sharding added tensors: {sorted(set(located) - names)[:5]}")


def list_files(folder: Path) -> dict[str, int]:
    """Relative path -> bytes of every file under ``folder``, sorted."""
    folder = Path(folder)
    return {
        p.relative_to(folder).as_posix(): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """Bytes of ``size``: an int, or a string such as ``"5GB"``, ``"500MB"``, ``"2GiB"``."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
        if not match:
            raise ExportError(f"cannot read size {size!r}; use e.g. 5GB, 500MB or a byte count")
        value = int(float(match[1]) * _UNITS[(match[2] or "").upper()])
    if value <= 0:
        raise ExportError(f"size must be positive, got {size!r}")
    return value
