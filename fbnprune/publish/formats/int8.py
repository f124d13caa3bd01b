"""int8: optimum-quanto weight-only qint8, saved in quanto's own form and reloaded."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

from fbnprune.publish.errors import ExportError
from fbnprune.publish.formats.common import compare, export_only, nll, require

logger = logging.getLogger(__name__)

INT8_DIR = "int8"
QMAP_FILE = "quanto_qmap.json"


def int8_snippet(layout: str, repo_id: str | None) -> str:
    remote = ", trust_remote_code=True" if layout == "compact" else ""
    where = (
        f'snapshot_download("{repo_id}", allow_patterns="{INT8_DIR}/*") + "/{INT8_DIR}"'
        if repo_id
        else f'"path/to/this/folder/{INT8_DIR}"'
    )
    lines = [
        "import json",
        "",
        "from accelerate import init_empty_weights",
        *(["from huggingface_hub import snapshot_download"] if repo_id else []),
        "from optimum.quanto import requantize",
        "from safetensors.torch import load_file",
        "from transformers import AutoConfig, AutoModelForCausalLM",
        "",
        f"path = {where}",
        f"config = AutoConfig.from_pretrained(path{remote})",
        "with init_empty_weights():",
        f"    model = AutoModelForCausalLM.from_config(config{remote})",
        f'with open(f"{{path}}/{QMAP_FILE}") as f:',
        '    requantize(model, load_file(f"{path}/model.safetensors"), json.load(f))',
        "model.tie_weights()",
        "model.eval()",
    ]
    return "\n".join(lines) + "\n"


def load_int8(path: str | Path) -> Any:
    """Load an ``int8/`` folder written by ``export_run`` (both layouts)."""
    require("optimum.quanto", "quantize", "loading an int8 export")
    from accelerate import init_empty_weights
    from optimum.quanto import requantize
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    remote = (path / "modeling_fbnprune.py").is_file()
    config = AutoConfig.from_pretrained(path, trust_remote_code=remote)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=remote)
    qmap = json.loads((path / QMAP_FILE).read_text())
    requantize(model, load_file(path / "model.safetensors"), qmap)
    model.tie_weights()
    return model.eval()


def quantize_int8(
    model: Any, folder: Path, layout: str, batches: list, reference: Any, repo_id: str | None
) -> dict[str, Any]:
    """Weight-only qint8 with optimum-quanto, saved in quanto's own form and reloaded."""
    import copy

    import torch
    from optimum.quanto import freeze, qint8, quantization_map, quantize
    from safetensors.torch import save_file

    from fbnprune.check.compare import real_token_logits

    qmodel = copy.deepcopy(model)
    tied = bool(getattr(qmodel.config, "tie_word_embeddings", False))
    # a quantized lm_head would be untied from the embedding and stored twice
    exclude = ["lm_head"] if tied else None
    quantize(qmodel, weights=qint8, exclude=exclude)
    freeze(qmodel)
    target = folder / INT8_DIR
    target.mkdir()
    for path in folder.iterdir():  # config, generation config, tokenizer, modeling file
        if path.is_file() and not export_only(path.name):
            shutil.copy2(path, target / path.name)
    state = qmodel.state_dict()
    out_emb, in_emb = qmodel.get_output_embeddings(), qmodel.get_input_embeddings()
    if tied and out_emb is not None and out_emb.weight is in_emb.weight:
        name = next(n for n, m in qmodel.named_modules() if m is out_emb)
        state.pop(f"{name}.weight", None)  # tied: stored once, re-tied on load
    save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    (target / QMAP_FILE).write_text(json.dumps(quantization_map(qmodel), indent=1) + "\n")

    quantized = real_token_logits(qmodel, batches)
    reloaded = real_token_logits(load_int8(target), batches)
    if not torch.equal(reloaded, quantized):
        raise ExportError(
            "the saved int8 model does not reload to the quantized model "
            f"(max |d| {float((reloaded - quantized).abs().max()):.3g})"
        )
    result: dict[str, Any] = {
        "path": INT8_DIR,
        "bytes": (target / "model.safetensors").stat().st_size,
        "reference_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
        "library": "optimum-quanto",
        "weights": "qint8",
        "excluded": exclude or [],
        **compare(reference, quantized),
        "perplexity": {
            "reference": math.exp(nll(reference, batches)),
            "quantized": math.exp(nll(quantized, batches)),
        },
        "load_snippet": int8_snippet(layout, repo_id),
    }
    logger.info(
        "export: int8 %.2f MiB (from %.2f), max |d logits| %.3g, perplexity %.3f -> %.3f",
        result["bytes"] / 2**20,
        result["reference_bytes"] / 2**20,
        result["max_abs"],
        result["perplexity"]["reference"],
        result["perplexity"]["quantized"],
    )
    return result
