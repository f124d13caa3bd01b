"""Export: turn a run's checkpoint into one folder that is ready to publish.

``export_run(RUN_DIR)`` writes, atomically: the checkpoint's safetensors weights (re-sharded
past ``max_shard_size``, otherwise copied byte for byte), config, generation config,
tokenizer, the compact modeling file where there is one, the recipe, the PrunePlan, the
parity report, the evaluation results when the run has them, an export report
(``fbnprune_export.json``) and a model card (``README.md``). Optional formats go beside them:
``int8/`` (optimum-quanto weight-only qint8) and ``onnx/model.onnx`` (``torch.onnx.export``
with ``dynamo=True``, checked in onnxruntime). ``optimum-onnx`` cannot be used: it requires
transformers<4.58.

An export whose inputs and options did not change is reused as it is (so a failed upload is
retried by running the same command), one made from other inputs or options is rebuilt, and
a folder that is not an export is never replaced (unless it is empty).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fbnprune import __version__
from fbnprune.check import ParityResult
from fbnprune.errors import FbnpruneError
from fbnprune.integrity import digest_mismatches
from fbnprune.io import atomic_directory, atomic_write_json
from fbnprune.rundir.layout import (
    CHECKPOINT_HEAL,
    CHECKPOINT_PREFIX,
    CHECKPOINT_RECIPE,
    EVAL_DIR,
    LAYOUTS,
    STAGING,
    RunLayout,
)

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("int8",)
DEFAULT_MAX_SHARD_SIZE = "5GB"
EXPORT_REPORT = "fbnprune_export.json"
EVAL_FILE = "fbnprune_eval.json"
EVAL_TABLE = "fbnprune_eval.md"
INT8_DIR = "int8"
QMAP_FILE = "quanto_qmap.json"
ONNX_FILE = "onnx/model.onnx"
WEIGHTS_INDEX = "model.safetensors.index.json"
ONNX_MIN_ATOL = 1e-3  # onnxruntime and PyTorch kernels differ by float rounding
RUN_ENTRIES = ("collect", "discover", EVAL_DIR, STAGING)  # never exported into
FALLBACK_TEXTS = (
    "The committee published its annual report on Tuesday, with figures for every region.",
    "def add(a, b):\n    return a + b\n",
    "Rain is expected across the north tonight, clearing by the morning.",
    "The striker scored twice in the second half to win the match.",
)


class ExportError(FbnpruneError, ValueError):
    """A run directory, option or output folder that cannot be exported as asked."""


@dataclass
class ExportResult:
    """What ``export_run`` wrote (or reused)."""

    out_dir: Path
    layout: str
    reused: bool
    files: dict[str, int]
    report: dict[str, Any]

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    def summary(self) -> str:
        from fbnprune.publish.card import human_bytes

        verb = "up to date, reused" if self.reused else "written"
        lines = [f"export ({self.layout}) {verb}: {self.out_dir}"]
        for name, size in self.files.items():
            lines.append(f"  {name:<40} {human_bytes(size):>12}")
        lines.append(f"  {'total':<40} {human_bytes(self.total_bytes):>12}")
        for name, fmt in self.report.get("formats", {}).items():
            lines.append(f"{name}: {fmt['path']} ({human_bytes(fmt['bytes'])}), max |d logits| "
                         f"{fmt['max_abs']:.3g}, mean {fmt['mean_abs']:.3g}")  # fmt: skip
            if "perplexity" in fmt:
                ppl = fmt["perplexity"]
                lines.append(f"  perplexity {ppl['reference']:.4f} -> {ppl['quantized']:.4f}, "
                             f"top-1 agreement {fmt['top1_agreement']:.1%}")  # fmt: skip
        return "\n".join(lines)


def export_run(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    layout: str | None = None,
    healed: bool = False,
    quantize: str | None = None,
    onnx: bool = False,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    repo_id: str | None = None,
) -> ExportResult:
    """Write a publishable folder from a run directory's checkpoint.

    Args:
        run_dir: an ``fbnprune run`` directory with ``checkpoint-padded/`` or
            ``checkpoint-compact/``.
        out_dir: the folder to write; default ``RUN_DIR/export-<layout>[-healed]``.
        layout: ``padded`` or ``compact``; default padded when the run saved it, else compact
            (with ``healed``: the layout that was healed).
        healed: export ``checkpoint-<layout>-healed/`` (the heal stage's distilled model).
        quantize: ``"int8"`` adds an optimum-quanto weight-only int8 copy in ``int8/``.
        onnx: add ``onnx/model.onnx`` (checked against PyTorch in onnxruntime).
        overwrite: rebuild even when ``out_dir`` is up to date (an export of other inputs or
            options is always rebuilt). Only an earlier export or an empty folder is ever
            replaced, never the working or home directory (``check_replaceable``).
        max_shard_size: largest safetensors file (``"5GB"``, ``"500MB"`` or bytes).
        repo_id: the Hub repository it is meant for (used in the card's loading code).
    """
    run_dir = Path(run_dir)
    run = RunLayout(run_dir)
    if not run.plan_file.is_file():
        raise ExportError(f"{run_dir} is not an fbnprune run directory (no plan.json); run "
                          "`fbnprune run RECIPE --out RUN_DIR` first")  # fmt: skip
    layout, source = _checkpoint(run_dir, layout, healed)
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ExportError(f"--quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}")
    limit = parse_size(max_shard_size)
    name = f"{layout}-healed" if healed else layout
    out = Path(out_dir) if out_dir is not None else run_dir / f"export-{name}"
    _check_out_dir(out, run_dir)
    options = {"layout": layout, "healed": healed, "quantize": quantize, "onnx": onnx,
               "max_shard_size": limit, "repo_id": repo_id}  # fmt: skip
    previous = _read_json(out / EXPORT_REPORT) if out.exists() else None
    if out.exists():  # may be replaced as a whole: only an earlier export or an empty folder
        if previous is None and not overwrite:
            raise ExportError(f"{out} exists and is not an fbnprune export; pass --overwrite to "
                              "replace it, or choose another --out")  # fmt: skip
        from fbnprune.rundir import RunDirError, check_replaceable

        try:
            check_replaceable(out, markers=(EXPORT_REPORT,), kind="an fbnprune export")
        except RunDirError as exc:
            raise ExportError(str(exc)) from None
    parity = _verified_parity(run_dir, source, healed=healed)
    fingerprint = _fingerprint(run_dir, source, options)
    if previous is not None and not overwrite:
        if previous.get("fingerprint") == fingerprint:
            logger.info("export: %s is up to date, reusing it", out)
            return ExportResult(out, layout, True, list_files(out), previous)
        logger.info("export: %s is an export of other inputs or options; replacing it", out)
    from fbnprune.publish.card import CardFacts, build_card, read_eval_results

    plan = run.read_plan()
    recipe_file = run.recipe_file
    if not recipe_file.is_file():
        recipe_file = source / CHECKPOINT_RECIPE
    recipe_text = recipe_file.read_text() if recipe_file.is_file() else ""
    with atomic_directory(out) as tmp:
        _copy_non_weights(source, tmp)
        weights = _write_weights(source, tmp, limit)
        results = run.eval_results_file
        for name, target in ((results, EVAL_FILE), (results.with_suffix(".md"), EVAL_TABLE)):
            if name.is_file():
                shutil.copy2(name, tmp / target)
        if recipe_text and not (tmp / CHECKPOINT_RECIPE).exists():
            (tmp / CHECKPOINT_RECIPE).write_text(recipe_text)
        formats: dict[str, dict[str, Any]] = {}
        if quantize or onnx:
            texts, origin = _evaluation_texts(recipe_text)
            atol = min(r.atol for r in ParityResult.from_dict(parity).reports if r.gating)
            formats = _extra_formats(tmp, layout, quantize=quantize, onnx=onnx, texts=texts,
                                     atol=atol, repo_id=repo_id)  # fmt: skip
            for fmt in formats.values():
                fmt["texts"] = origin
        export_bytes = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
        report = {
            "fingerprint": fingerprint,
            "fbnprune": __version__,
            "run": {"plan_model": plan.model, "recipe": plan.provenance.get("recipe"),
                    "recipe_fingerprint": plan.provenance.get("recipe_fingerprint")},
            "options": options,
            "weights": weights,
            "safetensors_bytes": export_bytes,
            "formats": formats,
        }  # fmt: skip
        atomic_write_json(tmp / EXPORT_REPORT, report)
        facts = CardFacts(
            plan=plan, layout=layout, recipe=_yaml(recipe_text), parity=parity,
            prune=_read_json(run.prune_file),
            scores=read_eval_results(run.eval_results_file, layout, healed=healed),
            export_bytes=export_bytes, formats=formats, repo_id=repo_id,
            heal=_read_json(source / CHECKPOINT_HEAL) if healed else None,
        )  # fmt: skip
        build_card(facts).save(tmp / "README.md")
    logger.info("export: wrote %s (%s layout)", out, layout)
    return ExportResult(out, layout, False, list_files(out), report)


# -- inputs and checks ------------------------------------------------------------------------
def _checkpoint(run_dir: Path, layout: str | None, healed: bool = False) -> tuple[str, Path]:
    if layout is not None and layout not in LAYOUTS:
        raise ExportError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    run = RunLayout(run_dir)
    if healed:
        done = [name for name in LAYOUTS if run.checkpoint_dir(name, healed=True).is_dir()]
        if layout is None and done:
            layout = done[0]
        if layout not in done:
            raise ExportError(f"{run_dir} has no checkpoint-{layout or '<layout>'}-healed/; run "
                              "the heal stage (`fbnprune heal RECIPE --out RUN_DIR`, with "
                              "heal.enabled: true if the budget is above heal.below_budget)")
        return layout, run.checkpoint_dir(layout, healed=True)
    available = [name for name in LAYOUTS if run.checkpoint_dir(name).is_dir()]
    if not available:
        raise ExportError(f"{run_dir} has no checkpoint-padded/ or checkpoint-compact/; run the "
                          "save stage first (`fbnprune run RECIPE --out RUN_DIR`)")  # fmt: skip
    if layout is None:
        layout = available[0]
    elif layout not in available:
        raise ExportError(f"{run_dir} has no checkpoint-{layout}/ (it has: "
                          f"{', '.join(available)}); add {layout!r} to the recipe's "
                          "save.layouts and re-run")  # fmt: skip
    return layout, run.checkpoint_dir(layout)


def _check_out_dir(out: Path, run_dir: Path) -> None:
    """Refuse output folders whose replacement would destroy the run or its stages."""
    out_r, run_r = out.resolve(), run_dir.resolve()
    if out_r == run_r or out_r in run_r.parents:
        raise ExportError(f"--out {out} would replace the run directory itself; choose a folder "
                          "outside it or inside it under a new name")  # fmt: skip
    if run_r in out_r.parents:
        top = out_r.relative_to(run_r).parts[0]
        if top.startswith(CHECKPOINT_PREFIX) or top in RUN_ENTRIES or (run_r / top).is_file():
            raise ExportError(f"--out {out} lies inside the run's own {top!r}; choose another "
                              "folder")  # fmt: skip


def _verified_parity(run_dir: Path, source: Path, *, healed: bool) -> dict:
    """The run's parity report, once its figures prove parity at the recipe's tolerance and
    ``source`` holds exactly the bytes that were checked; else ``ExportError`` saying why."""
    atol = _recipe_atol(run_dir)
    fix = (f"re-run `fbnprune run RECIPE --out {run_dir}`: it checks and saves the checkpoints "
           "again")  # fmt: skip
    run = RunLayout(run_dir)
    reports = [(run.relative(run.parity_file), run.parity_file)]
    if healed:
        reports.append((run.relative(run.heal_parity_file), run.heal_parity_file))
    results = {}
    for name, path in reports:
        if not path.is_file():
            raise ExportError(f"{run_dir} has no {name}: the checkpoint was never checked; {fix}")
        try:
            results[name] = ParityResult.parse(json.loads(path.read_text()))
        except ValueError as exc:  # JSONDecodeError is a ValueError
            raise ExportError(f"{path} is unreadable ({exc}); refusing to export what cannot be "
                              f"shown to be checked; {fix}") from None  # fmt: skip
        problems = results[name].problems(atol)
        if problems:
            raise ExportError(f"{path}: the figures do not show parity at atol {atol:g} "
                              f"({'; '.join(problems)}); refusing to export:\n"
                              f"{results[name].table()}")  # fmt: skip
    checked = results[reports[-1][0]].files.get(source.name)
    if not checked:
        raise ExportError(f"{reports[-1][1]} records no file digests of {source.name}/, so "
                          f"nothing shows that its files are the checked ones; {fix}")
    changed = digest_mismatches(source, checked)
    if changed:
        raise ExportError(f"{source} is not the checkpoint that was checked: "
                          f"{'; '.join(changed)}; {fix}")  # fmt: skip
    return results[reports[0][0]].to_dict()


def _recipe_atol(run_dir: Path) -> float:
    """The run recipe's ``check.atol`` (the default when the recipe is unreadable)."""
    from fbnprune.recipe import CheckConfig

    recipe_file = RunLayout(run_dir).recipe_file
    check = _yaml(recipe_file.read_text() if recipe_file.is_file() else "").get("check")
    try:
        return CheckConfig(**check).atol if isinstance(check, dict) else CheckConfig().atol
    except ValueError:
        return CheckConfig().atol


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _yaml(text: str) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(text) if text else {}
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _fingerprint(run_dir: Path, source: Path, options: dict[str, Any]) -> str:
    """Hash of the options and the inputs an export reads (weights by size and mtime)."""
    digest = hashlib.sha256(json.dumps([__version__, options], sort_keys=True).encode())
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(source)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    run = RunLayout(run_dir)
    for path in (run.plan_file, run.parity_file, run.heal_parity_file, run.prune_file,
                 run.recipe_file, run.eval_results_file):  # fmt: skip
        name = run.relative(path)
        digest.update(name.encode() + (path.read_bytes() if path.is_file() else b"<absent>"))
    return digest.hexdigest()[:16]


def list_files(folder: Path) -> dict[str, int]:
    """Relative path -> bytes of every file under ``folder``, sorted."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.stat().st_size
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


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


# -- weights ----------------------------------------------------------------------------------
def _copy_non_weights(source: Path, dest: Path) -> None:
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if not path.is_file() or path.suffix == ".safetensors" or rel.as_posix() in (
            WEIGHTS_INDEX, "README.md"
        ):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / rel)


def _write_weights(source: Path, dest: Path, limit: int) -> dict[str, Any]:
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
    logger.info("export: re-sharded %d file(s) into %d of at most %d bytes", len(shards),
                len(written), limit)  # fmt: skip
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


# -- optional formats -------------------------------------------------------------------------
def _require(module: str, extra: str, flag: str) -> None:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ExportError(f"{flag} needs the '{extra}' extra ({module} is not installed): "
                          f"pip install 'fbnprune[{extra}]'") from exc  # fmt: skip


def _evaluation_texts(recipe_text: str, n: int = 8) -> tuple[list[str], str]:
    """The run's held-out prompts (round-robin over tasks), or fixed fallback sentences."""
    try:
        from fbnprune.data.tasks import load_task
        from fbnprune.recipe import parse_recipe

        recipe = parse_recipe(_yaml(recipe_text))
        per_task = [load_task(t, seed=recipe.seed).prompts("heldout") for t in recipe.tasks]
        texts = [p[i] for i in range(max(map(len, per_task))) for p in per_task if i < len(p)]
        if texts:
            return texts[:n], "heldout"
    except Exception as exc:  # noqa: BLE001 - any failure to rebuild the data means "fallback"
        logger.warning("export: cannot rebuild the run's held-out text (%s); comparing formats "
                       "on fixed sentences", exc)  # fmt: skip
    return list(FALLBACK_TEXTS), "fallback"


def _extra_formats(
    folder: Path, layout: str, *, quantize: str | None, onnx: bool, texts: list[str],
    atol: float, repo_id: str | None,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Write the int8 and ONNX formats of the exported model and measure them against it."""
    if quantize:
        _require("optimum.quanto", "quantize", "--quantize int8")
    if onnx:
        for module in ("onnx", "onnxscript", "onnxruntime"):
            _require(module, "onnx", "--onnx")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fbnprune.check import real_token_logits
    from fbnprune.collect import token_batches

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, trust_remote_code=layout == "compact"
    ).eval()
    batches = token_batches(tokenizer, texts, max_length=128, batch_size=4)
    reference = real_token_logits(model, batches)
    out = {}
    if quantize:
        out["int8"] = _quantize_int8(model, folder, layout, batches, reference, repo_id)
    if onnx:
        out["onnx"] = _export_onnx(model, folder, batches, reference, max(atol, ONNX_MIN_ATOL))
    return out


def _nll(logits: Any, batches: list[tuple[Any, Any]]) -> float:
    """Mean next-token negative log-likelihood over real tokens (logits as real_token_logits)."""
    import torch

    total, count, start = 0.0, 0, 0
    for input_ids, attention in batches:
        mask = attention.bool()
        n = int(mask.sum())
        rows = logits[start:start + n]
        start += n
        targets = input_ids[mask]
        # position t predicts token t+1 of the same row: drop each row's last real token
        lengths = mask.sum(1).tolist()
        keep = torch.ones(n, dtype=torch.bool)
        ends = torch.tensor(lengths).cumsum(0) - 1
        keep[ends] = False
        nxt = torch.roll(targets, -1)
        total += float(torch.nn.functional.cross_entropy(rows[keep], nxt[keep], reduction="sum"))
        count += int(keep.sum())
    return total / max(count, 1)


def _compare(reference: Any, candidate: Any) -> dict[str, float]:
    delta = (candidate - reference).abs()
    return {"max_abs": float(delta.max()), "mean_abs": float(delta.mean()),
            "top1_agreement": float((candidate.argmax(-1) == reference.argmax(-1)).float().mean()),
            "n_tokens": int(reference.shape[0])}  # fmt: skip


def _int8_snippet(layout: str, repo_id: str | None) -> str:
    remote = ", trust_remote_code=True" if layout == "compact" else ""
    where = (f'snapshot_download("{repo_id}", allow_patterns="{INT8_DIR}/*") + "/{INT8_DIR}"'
             if repo_id else f'"path/to/this/folder/{INT8_DIR}"')  # fmt: skip
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
    _require("optimum.quanto", "quantize", "loading an int8 export")
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


def _quantize_int8(
    model: Any, folder: Path, layout: str, batches: list, reference: Any, repo_id: str | None
) -> dict[str, Any]:
    """Weight-only qint8 with optimum-quanto, saved in quanto's own form and reloaded."""
    import copy

    import torch
    from optimum.quanto import freeze, qint8, quantization_map, quantize
    from safetensors.torch import save_file

    from fbnprune.check import real_token_logits

    qmodel = copy.deepcopy(model)
    tied = bool(getattr(qmodel.config, "tie_word_embeddings", False))
    # a quantized lm_head would be untied from the embedding and stored twice
    exclude = ["lm_head"] if tied else None
    quantize(qmodel, weights=qint8, exclude=exclude)
    freeze(qmodel)
    target = folder / INT8_DIR
    target.mkdir()
    for path in folder.iterdir():  # config, generation config, tokenizer, modeling file
        if path.is_file() and not _export_only(path.name):
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
        raise ExportError("the saved int8 model does not reload to the quantized model "
                          f"(max |d| {float((reloaded - quantized).abs().max()):.3g})")  # fmt: skip
    result = {
        "path": INT8_DIR,
        "bytes": (target / "model.safetensors").stat().st_size,
        "reference_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
        "library": "optimum-quanto",
        "weights": "qint8",
        "excluded": exclude or [],
        **_compare(reference, quantized),
        "perplexity": {"reference": math.exp(_nll(reference, batches)),
                       "quantized": math.exp(_nll(quantized, batches))},
        "load_snippet": _int8_snippet(layout, repo_id),
    }  # fmt: skip
    logger.info("export: int8 %.2f MiB (from %.2f), max |d logits| %.3g, perplexity %.3f -> %.3f",
                result["bytes"] / 2**20, result["reference_bytes"] / 2**20, result["max_abs"],
                result["perplexity"]["reference"], result["perplexity"]["quantized"])  # fmt: skip
    return result


def _export_only(name: str) -> bool:
    """Files of the export that a format folder does not repeat (weights, card, reports)."""
    return (name.endswith(".safetensors") or name in (WEIGHTS_INDEX, "README.md")
            or name.startswith("fbnprune_"))  # fmt: skip


def _logits_only(model: Any) -> Any:
    """Wrap ``model`` so it returns only logits, without cache: what the ONNX graph computes."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                              use_cache=False).logits  # fmt: skip

    return LogitsOnly(model).eval()


def _export_onnx(
    model: Any, folder: Path, batches: list, reference: Any, atol: float
) -> dict[str, Any]:
    """``torch.onnx.export(dynamo=True)`` with dynamic batch and sequence; check in onnxruntime."""
    import numpy as np
    import onnxruntime
    import torch

    target = folder / ONNX_FILE
    target.parent.mkdir(parents=True)
    # a batch of 2+ so that the exporter does not specialise the batch dimension to 1
    example = (torch.full((2, 8), 3, dtype=torch.long), torch.ones(2, 8, dtype=torch.long))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    large = sum(p.numel() * p.element_size() for p in model.parameters()) > 2**30
    chatty = [logging.getLogger(n) for n in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [log.level for log in chatty]
    for log in chatty:  # one INFO line per deduplicated initializer otherwise
        log.setLevel(max(log.getEffectiveLevel(), logging.WARNING))
    try:
        program = torch.onnx.export(
            _logits_only(model), example, dynamo=True, input_names=["input_ids", "attention_mask"],
            output_names=["logits"], verbose=False,
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
        )  # fmt: skip
        program.save(str(target), external_data=large)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types
        raise ExportError(f"ONNX export failed ({type(exc).__name__}: {str(exc)[:500]}); "
                          "export without --onnx") from exc  # fmt: skip
    finally:
        for log, level in zip(chatty, levels, strict=True):
            log.setLevel(level)
    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    outputs = []
    for input_ids, attention in batches:
        logits = session.run(["logits"], {"input_ids": input_ids.numpy(),
                                          "attention_mask": attention.numpy()})[0]  # fmt: skip
        outputs.append(torch.from_numpy(np.asarray(logits))[attention.bool()])
    result = {
        "path": ONNX_FILE,
        "bytes": sum(p.stat().st_size for p in target.parent.iterdir() if p.is_file()),
        "runtime": f"onnxruntime {onnxruntime.__version__}",
        "atol": atol,
        **_compare(reference, torch.cat(outputs).float()),
    }
    if result["max_abs"] > atol:
        raise ExportError(f"onnxruntime logits differ from PyTorch by {result['max_abs']:.3g} "
                          f"(> {atol:g}); export without --onnx")  # fmt: skip
    logger.info("export: onnx %.2f MiB, onnxruntime vs torch max |d logits| %.3g",
                result["bytes"] / 2**20, result["max_abs"])  # fmt: skip
    return result
