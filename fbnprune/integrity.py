"""Integrity of files on disk: digests of checked checkpoints, fingerprints of model folders,
and truncated safetensors files.

A checkpoint is checked (logits compared with the slice in memory) once, at the check or heal
stage; ``file_digests`` records the sha256 of every file it consists of, and
``digest_mismatches`` later proves that export and resume read those same bytes.
``folder_fingerprint`` keys stage reuse on a model folder's content, not on its name.
``safetensors_problem`` finds a truncated or corrupt ``.safetensors`` file from its header
alone, without reading the tensors.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

# files up to this size are hashed whole for a fingerprint; larger ones by size, modification
# time and their first and last MiB (a model's shards are GBs; reading them at every start
# would cost more than the stage it guards)
_WHOLE_HASH_BYTES = 64 * 2**20
_SAMPLE_BYTES = 2**20
# the files of a checkpoint that decide what it computes; the fbnprune_*.json copies of run
# files beside them are not part of what was checked
_SKIPPED_PREFIX = "fbnprune_"


def sha256_file(path: Path, chunk: int = 2**22) -> str:
    """Hex sha256 of a whole file."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_digests(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file of a checkpoint folder (not its ``fbnprune_*``
    reports, which are copies of run files)."""
    folder = Path(folder)
    return {
        str(path.relative_to(folder)): sha256_file(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.name.startswith(_SKIPPED_PREFIX)
    }


def digest_mismatches(folder: Path, expected: dict[str, str]) -> list[str]:
    """What differs between ``folder`` and the digests recorded when it was checked: one line
    per missing, changed or added file; empty when the folder holds exactly those bytes."""
    actual = file_digests(folder)
    problems = [f"{name}: missing" for name in expected if name not in actual]
    problems += [
        f"{name}: changed since it was checked"
        for name, digest in expected.items()
        if name in actual and actual[name] != digest
    ]
    problems += [f"{name}: added after the check" for name in actual if name not in expected]
    return problems


def folder_fingerprint(folder: Path) -> str:
    """A short hash of a model folder's content: every file's name and size, small files
    (config, index, tokenizer) whole, large ones (weight shards) by modification time and
    their first and last MiB."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}:{stat.st_size}".encode())
        if stat.st_size <= _WHOLE_HASH_BYTES:
            digest.update(sha256_file(path).encode())
            continue
        digest.update(str(stat.st_mtime_ns).encode())
        with path.open("rb") as handle:
            digest.update(handle.read(_SAMPLE_BYTES))
            handle.seek(stat.st_size - _SAMPLE_BYTES)
            digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()[:16]


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file (truncated, corrupt header), or None.

    Reads only the header: an 8-byte length, then JSON that gives every tensor's byte range;
    the file must be as long as the furthest range ends.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"{size} bytes, too short for a safetensors header"
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            return f"truncated: its header alone needs {header_len + 8} bytes, the file has {size}"
        try:
            header = json.loads(handle.read(header_len))
        except ValueError:
            return "corrupt: its header is not JSON"
    if not isinstance(header, dict):
        return "corrupt: its header is not a JSON object"
    ends = [
        entry["data_offsets"][1]
        for name, entry in header.items()
        if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry
    ]
    needed = 8 + header_len + max(ends, default=0)
    if size < needed:
        return f"truncated: {size} of {needed} bytes"
    return None


def incomplete_weights(folder: Path) -> dict[str, str]:
    """File name -> problem, for every ``.safetensors`` file in ``folder`` that is incomplete."""
    problems = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem is not None:
            problems[path.name] = problem
    return problems
