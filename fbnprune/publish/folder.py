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

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fbnprune.io import atomic_directory, atomic_write_json
from fbnprune.parity import ParityResult
from fbnprune.publish.errors import ExportError
from fbnprune.publish.inputs import (
    check_out_dir,
    checked_verdict,
    export_fingerprint,
    read_json,
    read_yaml,
    source_checkpoint,
    verified_parity,
)
from fbnprune.publish.weights import copy_non_weights, list_files, parse_size, write_weights
from fbnprune.rundir.layout import (
    CHECKPOINT_HEAL,
    CHECKPOINT_RECIPE,
    PLAN_FILE,
    RESULTS_TABLE,
    RunLayout,
)
from fbnprune.version import __version__

__all__ = ["ExportError", "ExportResult", "export_run", "list_files", "parse_size"]

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("int8",)
DEFAULT_MAX_SHARD_SIZE = "5GB"
EXPORT_REPORT = "fbnprune_export.json"
EVAL_FILE = "fbnprune_eval.json"
EVAL_TABLE = "fbnprune_eval.md"
VERDICT_FILE, VERDICT_TABLE = "fbnprune_verdict.json", "fbnprune_verdict.md"


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
            lines.append(
                f"{name}: {fmt['path']} ({human_bytes(fmt['bytes'])}), max |d logits| "
                f"{fmt['max_abs']:.3g}, mean {fmt['mean_abs']:.3g}"
            )
            if "perplexity" in fmt:
                ppl = fmt["perplexity"]
                lines.append(
                    f"  perplexity {ppl['reference']:.4f} -> {ppl['quantized']:.4f}, "
                    f"top-1 agreement {fmt['top1_agreement']:.1%}"
                )
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
    force: bool = False,
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
        force: export a model the run's verdict flagged (a constant answerer, or below the
            majority label's rate), which is refused otherwise.
    """
    run_dir = Path(run_dir)
    run = RunLayout(run_dir)
    if not run.plan_file.is_file():
        raise ExportError(
            f"{run_dir} is not an fbnprune run directory (no {PLAN_FILE}); run "
            "`fbnprune run RECIPE --out RUN_DIR` first"
        )
    layout, source = source_checkpoint(run_dir, layout, healed)
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ExportError(f"--quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}")
    limit = parse_size(max_shard_size)
    name = f"{layout}-healed" if healed else layout
    out = Path(out_dir) if out_dir is not None else run.export_dir(name)
    check_out_dir(out, run_dir)
    options = {
        "layout": layout,
        "healed": healed,
        "quantize": quantize,
        "onnx": onnx,
        "max_shard_size": limit,
        "repo_id": repo_id,
    }
    previous = read_json(out / EXPORT_REPORT) if out.exists() else None
    if out.exists():  # may be replaced as a whole: only an earlier export or an empty folder
        if previous is None and not overwrite:
            raise ExportError(
                f"{out} exists and is not an fbnprune export; pass --overwrite to "
                "replace it, or choose another --out"
            )
        from fbnprune.rundir import RunDirError, check_replaceable

        try:
            check_replaceable(out, markers=(EXPORT_REPORT,), kind="an fbnprune export")
        except RunDirError as exc:
            raise ExportError(str(exc)) from None
    parity = verified_parity(run_dir, source, healed=healed)
    verdict = checked_verdict(run_dir, healed=healed, force=force)
    fingerprint = export_fingerprint(run_dir, source, options)
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
        copy_non_weights(source, tmp)
        weights = write_weights(source, tmp, limit)
        results = run.eval_results_file
        for file, target in ((results, EVAL_FILE), (results.with_name(RESULTS_TABLE), EVAL_TABLE)):
            if file.is_file():
                shutil.copy2(file, tmp / target)
        for file, target in ((run.verdict_file, VERDICT_FILE), (run.verdict_table, VERDICT_TABLE)):
            if file.is_file():
                shutil.copy2(file, tmp / target)
        if recipe_text and not (tmp / CHECKPOINT_RECIPE).exists():
            (tmp / CHECKPOINT_RECIPE).write_text(recipe_text)
        formats: dict[str, dict[str, Any]] = {}
        if quantize or onnx:
            from fbnprune.publish.formats import evaluation_texts, extra_formats

            texts, origin = evaluation_texts(recipe_text)
            atol = min(r.atol for r in ParityResult.from_dict(parity).reports if r.gating)
            formats = extra_formats(
                tmp, layout, quantize=quantize, onnx=onnx, texts=texts, atol=atol, repo_id=repo_id
            )
            for fmt in formats.values():
                fmt["texts"] = origin
        export_bytes = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
        report = {
            "fingerprint": fingerprint,
            "fbnprune": __version__,
            "run": {
                "plan_model": plan.model,
                "recipe": plan.provenance.get("recipe"),
                "recipe_fingerprint": plan.provenance.get("recipe_fingerprint"),
            },
            "options": options,
            "weights": weights,
            "safetensors_bytes": export_bytes,
            "formats": formats,
        }
        atomic_write_json(tmp / EXPORT_REPORT, report)
        facts = CardFacts(
            plan=plan,
            layout=layout,
            recipe=read_yaml(recipe_text),
            parity=parity,
            prune=read_json(run.prune_file),
            scores=read_eval_results(run.eval_results_file, layout, healed=healed),
            export_bytes=export_bytes,
            formats=formats,
            repo_id=repo_id,
            heal=read_json(source / CHECKPOINT_HEAL) if healed else None,
            verdict=verdict,
            verdict_model="healed" if healed else "unhealed",
        )
        build_card(facts).save(tmp / "README.md")
    logger.info("export: wrote %s (%s layout)", out, layout)
    return ExportResult(out, layout, False, list_files(out), report)
