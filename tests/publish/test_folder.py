"""Export: a publishable folder that reloads to the run's sliced model; card; int8; ONNX."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import random_batch, tiny_model, tiny_tokenizer
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from fbnprune.evaluate.harness import TaskInfo
from fbnprune.evaluate.results import build_results, write_results
from fbnprune.pipeline import run_pipeline
from fbnprune.plan import PrunePlan
from fbnprune.pruning.slicing import slice_model
from fbnprune.publish.card import CardFacts, base_model_info, build_card, read_eval_results
from fbnprune.publish.folder import ExportError, export_run, list_files, parse_size
from fbnprune.publish.formats.int8 import load_int8
from fbnprune.recipe import parse_recipe
from fbnprune.rundir import RunLayout

ATOL = 1e-4  # the parity tolerance the tiny runs record
DOCS = [f"document {i}: the quick brown fox {i} jumps over {i % 3} lazy dogs." for i in range(12)]
# what evaluate measured (model -> task -> metric), written by fbnprune.evaluate.results
SCORES = {
    "original": {"topics": {"acc": 0.75, "acc_stderr": 0.056, "acc_norm": 0.2}},
    "masked": {"topics": {"acc": 0.69, "acc_stderr": 0.06, "acc_norm": 0.21}},
    "sliced-padded": {"topics": {"acc": 0.69, "acc_stderr": 0.06, "acc_norm": 0.21}},
    "checkpoint-compact": {"topics": {"acc": 0.68, "acc_stderr": 0.061, "acc_norm": 0.21}},
}
TASKS = {"topics": TaskInfo("topics", "acc", True, {"acc": True, "acc_norm": True}, n_docs=60)}
EVAL = build_results(SCORES, TASKS, models={m: {"parameters": 1} for m in SCORES})


def make_run(
    root: Path,
    *,
    layouts: tuple[str, ...] = ("padded", "compact"),
    evaluation: dict | None = EVAL,
) -> tuple[Path, dict[str, torch.nn.Module]]:
    """A run directory made by the pipeline (up to save) from a tiny llama, with the
    evaluation results ``evaluation`` written as ``fbnprune evaluate`` writes them.

    Returns the run directory and the sliced model of each layout (the export's reference).
    """
    model_dir = root / "tiny-llama"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    (root / "docs.txt").write_text("\n\n".join(DOCS))
    recipe = parse_recipe(
        {
            "name": "tiny-export",
            "model": str(model_dir),
            "seed": 0,
            "tasks": [
                {
                    "name": "topics",
                    "source": f"file:{root / 'docs.txt'}",
                    "calibration_samples": 8,
                    "heldout_samples": 4,
                    "max_length": 32,
                }
            ],
            "discover": {"n_components": 4},
            "select": {"budget": 0.3, "min_per_layer": 0.02},
            "prune": {"fill": "mean"},
            "save": {"layouts": list(layouts)},
            "check": {"atol": ATOL},
            "heal": {"enabled": False},
        }
    )
    summary = run_pipeline(recipe, root / "run", until="save", progress=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    sliced = {
        name: slice_model(copy.deepcopy(model), summary.plan, layout=name).eval()
        for name in layouts
    }
    if evaluation is not None:
        write_results(evaluation, RunLayout(summary.run_dir).eval_dir)
    return summary.run_dir, sliced


def logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.inference_mode():
        return model(**batch).logits[batch["attention_mask"].bool()]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.nn.Module]]:
    return make_run(tmp_path_factory.mktemp("export"))


@pytest.mark.parametrize("layout", ["padded", "compact"])
def test_export_reloads_to_the_sliced_model(run, layout, tmp_path):
    run_dir, sliced = run
    result = export_run(run_dir, tmp_path / "out", layout=layout)
    files = set(result.files)
    expected = {
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "fbnprune_plan.json",
        "fbnprune_recipe.yaml",
        "fbnprune_parity.json",
        "fbnprune_eval.json",
        "fbnprune_export.json",
    }
    assert expected <= files
    assert ("modeling_fbnprune.py" in files) == (layout == "compact")
    reloaded = AutoModelForCausalLM.from_pretrained(
        result.out_dir, trust_remote_code=layout == "compact"
    ).eval()
    if layout == "padded":  # stock class, stock loader
        assert type(reloaded).__module__.startswith("transformers.models.llama")
    batch = random_batch()
    torch.testing.assert_close(
        logits(reloaded, batch), logits(sliced[layout], batch), atol=ATOL, rtol=0
    )
    # the published weights are the run's weights, byte for byte
    source = run_dir / f"checkpoint-{layout}" / "model.safetensors"
    assert (result.out_dir / "model.safetensors").read_bytes() == source.read_bytes()
    assert result.report["weights"]["mode"] == "copied"


def test_resharding_past_the_threshold_keeps_every_tensor(run, tmp_path):
    run_dir, sliced = run
    result = export_run(run_dir, tmp_path / "out", max_shard_size="40KB")
    shards = sorted(n for n in result.files if n.endswith(".safetensors"))
    assert len(shards) > 1 and "model.safetensors" not in shards
    assert "model.safetensors.index.json" in result.files
    assert all(result.files[s] <= 40_000 + 4096 for s in shards)  # the limit counts tensor data
    assert result.report["weights"]["mode"] == "resharded"
    reloaded = AutoModelForCausalLM.from_pretrained(result.out_dir).eval()
    batch = random_batch()
    torch.testing.assert_close(
        logits(reloaded, batch), logits(sliced["padded"], batch), atol=ATOL, rtol=0
    )


def test_default_layout_reuse_and_overwrite(run, tmp_path):
    run_dir, _ = run
    first = export_run(run_dir, tmp_path / "out")
    assert first.layout == "padded" and not first.reused
    again = export_run(run_dir, tmp_path / "out")
    assert again.reused and again.files == first.files
    other = export_run(run_dir, tmp_path / "out", layout="compact")  # other options: rebuilt
    assert other.layout == "compact" and not other.reused and "modeling_fbnprune.py" in other.files
    assert not export_run(run_dir, tmp_path / "out", layout="compact", overwrite=True).reused
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an fbnprune export"):
        export_run(run_dir, tmp_path / "other")


def test_compact_only_run_defaults_to_compact(tmp_path):
    run_dir, _ = make_run(tmp_path, layouts=("compact",), evaluation=None)
    result = export_run(run_dir)
    assert result.layout == "compact" and result.out_dir == run_dir / "export-compact"
    assert "fbnprune_eval.json" not in result.files
    card = (result.out_dir / "README.md").read_text()
    assert "No evaluation results" in card
    with pytest.raises(ExportError, match="no checkpoint-padded"):
        export_run(run_dir, tmp_path / "x", layout="padded")


def test_card_metadata_and_prose(run, tmp_path):
    run_dir, _ = run
    result = export_run(run_dir, tmp_path / "out", layout="compact", repo_id="me/tiny-pruned")
    card = ModelCard.load(result.out_dir / "README.md")
    data = card.data
    assert {"pruned", "fbnprune", "functional-networks"} <= set(data.tags)
    assert data.pipeline_tag == "text-generation" and data.library_name == "transformers"
    assert data.license == "other"  # tiny-llama: unknown base model
    plan = PrunePlan.load(run_dir / "plan.json")
    scores = {r.metric_name: r.metric_value for r in data.eval_results}
    assert scores == {"acc (pruned)": 0.68, f"acc (original {plan.model})": 0.75}  # compact's
    assert {r.task_name for r in data.eval_results} == {"topics"}
    index = data.to_dict()["model-index"]
    assert index[0]["name"] == "tiny-pruned"
    text = card.text
    assert f"| 0-2 | {' '.join(map(str, plan.kept_per_layer()))} |" in text
    assert 'from_pretrained("me/tiny-pruned", trust_remote_code=True)' in text
    parity = json.loads((run_dir / "parity.json").read_text())
    for report in parity["reports"]:  # as the check stage wrote them: float64 and float32
        for comparison in report["comparisons"]:
            row = f"| {comparison['name']} | {report['dtype']} | {comparison['max_abs']:.2e} |"
            assert row in text
    for needed in (
        "`ica`",
        "30.0% of units",
        "could not be determined",
        "## Limitations",
        "| topics | acc | 60 | 0.7500 ± 0.056 | 0.6800 ± 0.061 | -0.0700 |",
        "variant `checkpoint-compact`",
        "Provenance",
    ):
        assert needed in text, needed


def test_base_model_license_is_carried(tmp_path):
    assert base_model_info("smollm2-135m").license == "apache-2.0"
    gemma = base_model_info("gemma3-270m")
    assert gemma.license == "gemma" and gemma.hub_id == "google/gemma-3-270m"
    local = tmp_path / "base"
    local.mkdir()
    (local / "README.md").write_text("---\nlicense: mit\n---\n# a base model\n")
    info = base_model_info(str(local))
    assert info.license == "mit" and info.hub_id is None and info.license_note is None
    unknown = base_model_info("someone/unknown-model")
    assert unknown.license == "other" and unknown.hub_id == "someone/unknown-model"
    assert "could not be determined" in unknown.license_note


def test_packaged_base_model_card(run):
    run_dir, _ = run
    plan = RunLayout(run_dir).read_plan()
    plan.model = "smollm2-135m"  # the card of a plan made for a packaged model
    data = build_card(CardFacts(plan=plan, layout="padded", recipe={})).data
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data.license == "apache-2.0"


def test_eval_reader_reads_what_evaluate_writes_and_skips_the_rest(tmp_path):
    path = tmp_path / "results.json"
    assert read_eval_results(path) == []  # absent
    path.write_text("{not json")
    assert read_eval_results(path) == []
    broken = {"tasks": {"b": "garbage", "c": {"metric": "f1", "models": "garbage"}}}
    path.write_text(json.dumps(broken))
    assert read_eval_results(path) == []
    path.write_text(json.dumps(EVAL))
    padded, compact = read_eval_results(path, "padded")[0], read_eval_results(path, "compact")[0]
    assert (padded.pruned, padded.variant, compact.pruned, compact.variant) == (
        0.69,
        "sliced-padded",
        0.68,
        "checkpoint-compact",
    )
    assert padded.n_docs == 60 and padded.original_stderr == 0.056
    assert padded.extra == {"masked": 0.69, "checkpoint-compact": 0.68}


def test_refuses_what_it_cannot_export(run, tmp_path):
    run_dir, _ = run
    with pytest.raises(ExportError, match="not an fbnprune run directory"):
        export_run(tmp_path)
    with pytest.raises(ExportError, match="replace the run directory"):
        export_run(run_dir, run_dir, overwrite=True)
    with pytest.raises(ExportError, match="replace the run directory"):
        export_run(run_dir, run_dir.parent, overwrite=True)
    with pytest.raises(ExportError, match="inside the run's own 'checkpoint-padded'"):
        export_run(run_dir, run_dir / "checkpoint-padded" / "x")
    with pytest.raises(ExportError, match="--quantize"):
        export_run(run_dir, tmp_path / "q", quantize="int4")
    with pytest.raises(ExportError, match="cannot read size"):
        export_run(run_dir, tmp_path / "q", max_shard_size="lots")
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20
    assert (run_dir / "checkpoint-padded" / "model.safetensors").is_file()


def test_refuses_a_failed_parity_check(tmp_path):
    run_dir, _ = make_run(tmp_path, layouts=("padded",), evaluation=None)
    parity = json.loads((run_dir / "parity.json").read_text())
    parity["passed"], parity["reports"][0]["comparisons"][0]["passed"] = False, False
    parity["reports"][0]["comparisons"][0]["max_abs"] = 0.5
    (run_dir / "parity.json").write_text(json.dumps(parity))
    with pytest.raises(ExportError, match="do not show parity"):
        export_run(run_dir)
    assert not (run_dir / "export-padded").exists()


@pytest.fixture()
def fresh_run(tmp_path):
    run_dir, _ = make_run(tmp_path, layouts=("padded",), evaluation=None)
    return run_dir


def test_parity_is_judged_from_its_figures_not_its_flag(fresh_run):
    parity = json.loads((fresh_run / "parity.json").read_text())
    parity["reports"][0]["comparisons"][0]["max_abs"] = 5.0  # "passed": true stays
    (fresh_run / "parity.json").write_text(json.dumps(parity))
    with pytest.raises(ExportError, match=r"max\|d\| 5\.000e\+00 > 0\.0001"):
        export_run(fresh_run)
    parity["reports"][0]["comparisons"][0]["max_abs"] = float("nan")
    (fresh_run / "parity.json").write_text(json.dumps(parity))
    with pytest.raises(ExportError, match="do not show parity"):
        export_run(fresh_run)
    assert not (fresh_run / "export-padded").exists()


def test_a_garbage_parity_report_is_refused_not_replaced(fresh_run):
    (fresh_run / "parity.json").write_text('{"passed": true, "reports": [{"oops": 1}]}')
    with pytest.raises(ExportError, match="parity.json is unreadable"):
        export_run(fresh_run)
    (fresh_run / "parity.json").unlink()  # the checkpoint's own copy is no substitute
    with pytest.raises(ExportError, match="has no parity.json"):
        export_run(fresh_run)
    assert not (fresh_run / "export-padded").exists()


@pytest.mark.parametrize("swap", ["random", "other model", "added file"])
def test_export_refuses_a_checkpoint_that_is_not_the_checked_one(fresh_run, swap):
    from safetensors.torch import load_file, save_file

    weights = fresh_run / "checkpoint-padded" / "model.safetensors"
    if swap == "random":  # same names and shapes, other values
        tensors = {k: torch.randn_like(v) for k, v in load_file(weights).items()}
        save_file(tensors, weights, metadata={"format": "pt"})
    elif swap == "other model":  # another architecture's weights under the same name
        save_file({"transformer.h.0.mlp.c_fc.weight": torch.ones(8, 4)}, weights)
    else:
        (fresh_run / "checkpoint-padded" / "extra.py").write_text("print('hi')\n")
    with pytest.raises(ExportError, match="is not the checkpoint that was checked"):
        export_run(fresh_run)
    assert not (fresh_run / "export-padded").exists()


def test_export_refuses_a_run_checked_before_digests_were_recorded(fresh_run):
    parity = json.loads((fresh_run / "parity.json").read_text())
    del parity["files"]
    (fresh_run / "parity.json").write_text(json.dumps(parity))
    with pytest.raises(ExportError, match="records no file digests"):
        export_run(fresh_run)


def test_missing_extra_gives_a_clear_error_and_writes_nothing(run, tmp_path, monkeypatch):
    import sys

    run_dir, _ = run
    monkeypatch.setitem(sys.modules, "optimum.quanto", None)  # import fails
    with pytest.raises(ExportError, match=r"pip install 'fbnprune\[quantize\]'"):
        export_run(run_dir, tmp_path / "out", quantize="int8")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ExportError, match=r"pip install 'fbnprune\[onnx\]'"):
        export_run(run_dir, tmp_path / "out", onnx=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout", ["padded", "compact"])
def test_int8_export_size_parity_and_reload(run, layout, tmp_path):
    pytest.importorskip(
        "optimum.quanto", reason="--quantize needs the 'quantize' extra (optimum-quanto)"
    )
    run_dir, sliced = run
    result = export_run(run_dir, tmp_path / "out", layout=layout, quantize="int8")
    q = result.report["formats"]["int8"]
    assert {
        "int8/model.safetensors",
        "int8/quanto_qmap.json",
        "int8/config.json",
        "int8/tokenizer.json",
    } <= set(result.files)
    assert q["bytes"] < 0.7 * q["reference_bytes"]
    assert q["texts"] == "heldout"
    assert 0 < q["max_abs"] < 0.05 and q["top1_agreement"] > 0.95
    ppl = q["perplexity"]
    assert abs(ppl["quantized"] / ppl["reference"] - 1) < 0.01
    int8 = load_int8(result.out_dir / "int8")
    batch = random_batch()
    delta = (logits(int8, batch) - logits(sliced[layout], batch)).abs().max()
    assert 0 < delta < 0.05
    card = (result.out_dir / "README.md").read_text()
    assert "### int8" in card and "requantize" in card
    assert ("trust_remote_code=True)" in q["load_snippet"]) == (layout == "compact")


def test_onnx_export_matches_in_onnxruntime(run, tmp_path):
    """Compact only (~10 s an export): its remote-code class is the harder case to trace."""
    for module in ("onnx", "onnxscript"):
        pytest.importorskip(module, reason="--onnx needs the 'onnx' extra")
    ort = pytest.importorskip("onnxruntime", reason="--onnx needs the 'onnx' extra")
    run_dir, sliced = run
    layout = "compact"
    result = export_run(run_dir, tmp_path / "out", layout=layout, onnx=True)
    o = result.report["formats"]["onnx"]
    assert o["max_abs"] < 1e-4 and "onnx/model.onnx" in result.files
    # a batch size and length the export never saw: the dimensions are dynamic
    batch = random_batch(seed=5, batch=3, length=13)
    session = ort.InferenceSession(
        str(result.out_dir / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    out = session.run(["logits"], {k: v.numpy() for k, v in batch.items()})[0]
    got = torch.from_numpy(out)[batch["attention_mask"].bool()]
    torch.testing.assert_close(got, logits(sliced[layout], batch), atol=1e-4, rtol=0)


def test_cli_export(run, tmp_path, capsys):
    from fbnprune.cli import main

    run_dir, _ = run
    assert main(["export", str(run_dir), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "export (padded) written" in printed and "model.safetensors" in printed
    assert list_files(tmp_path / "out")["README.md"] > 0
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(run_dir), "--dry-run"])
    assert exit_info.value.code == 2
    assert "only make(s) sense with --push-to-hub" in capsys.readouterr().err


def test_cli_export_errors_are_one_line(run, tmp_path, capsys):
    from fbnprune.cli import main

    assert main(["export", str(tmp_path)]) == 2
    assert "fbnprune export: error:" in capsys.readouterr().err
