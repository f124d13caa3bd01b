"""The whole pipeline on a tiny model: run directory, parity, reuse, resume, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import REPO, tiny_recipe, write_recipe
from transformers import AutoModelForCausalLM

from fbnprune.cli import main
from fbnprune.collect.stage import collect
from fbnprune.pipeline import run_pipeline
from fbnprune.recipe import parse_recipe
from fbnprune.rundir import RunDir, RunDirError
from fbnprune.rundir.context import RunContext


def test_run_produces_plan_parity_and_loadable_checkpoints(tiny_llama_dir, tmp_path):
    recipe = parse_recipe(tiny_recipe(tiny_llama_dir))
    summary = run_pipeline(recipe, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    for name in ("run.json", "recipe.yaml", "plan.json", "prune.json", "parity.json"):
        assert (run / name).is_file(), name
    assert not (run / ".staging").exists()
    ledger = json.loads((run / "run.json").read_text())["stages"]
    # results follow the BLAS summation order: every stage records its thread counts
    assert all(rec["threads"]["torch"] == torch.get_num_threads() for rec in ledger.values())

    plan = summary.plan
    assert plan.n_kept == round(0.25 * plan.n_units)
    assert all(k >= 0.05 * w for k, w in zip(plan.kept_per_layer(), plan.layer_widths, strict=True))
    assert plan.provenance["selector"] == "ica" and "threshold_union_units" in plan.provenance
    exact, serialisation, in_float32 = summary.parity.reports
    assert summary.parity.passed and exact.dtype == "float64" and exact.gating
    assert [c.name for c in exact.comparisons] == ["sliced-padded", "sliced-compact"]
    assert all(c.max_abs < 1e-9 for c in exact.comparisons)  # exact up to float64 rounding
    assert [c.name for c in serialisation.comparisons] == ["reloaded-padded", "reloaded-compact"]
    assert all(c.max_abs == 0.0 for c in serialisation.comparisons)
    assert not in_float32.gating and exact.n_tokens > 0

    padded = AutoModelForCausalLM.from_pretrained(run / "checkpoint-padded")
    assert padded.config.intermediate_size == max(plan.kept_per_layer())
    compact = AutoModelForCausalLM.from_pretrained(
        run / "checkpoint-compact", trust_remote_code=True
    )
    assert compact.config.fbnprune_compact["widths"] == plan.kept_per_layer()
    for name in ("fbnprune_plan.json", "fbnprune_recipe.yaml", "tokenizer.json"):
        assert (run / "checkpoint-padded" / name).is_file()
    sizes = json.loads((run / "prune.json").read_text())["sizes"]
    assert sizes["compact"]["parameters"] <= sizes["padded"]["parameters"]
    assert sizes["padded"]["parameters"] < sizes["original"]["parameters"]

    # a second run reuses every stage
    again = run_pipeline(recipe, run, until="save", progress=False)
    assert again.executed == []


def test_changed_budget_recomputes_only_select_and_later(tiny_llama_dir, tmp_path):
    run_pipeline(parse_recipe(tiny_recipe(tiny_llama_dir)), tmp_path / "run", progress=False)
    changed = parse_recipe(tiny_recipe(tiny_llama_dir, select={"budget": 0.5}))
    summary = run_pipeline(changed, tmp_path / "run", until="save", progress=False)
    assert summary.executed == ["select", "prune", "check", "save"]


def test_interrupted_stage_resumes_cleanly(tiny_llama_dir, tmp_path, monkeypatch):
    recipe = parse_recipe(tiny_recipe(tiny_llama_dir))

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("fbnprune.discover.group_ica.GroupICA.fit", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(recipe, tmp_path / "run", progress=False)
    assert not list((tmp_path / "run").rglob("*.tmp*"))
    assert not (tmp_path / "run" / "plan.json").exists()
    monkeypatch.undo()
    summary = run_pipeline(recipe, tmp_path / "run", until="save", progress=False)
    assert "collect:news" not in summary.executed and "discover:news" in summary.executed


def test_collect_records_only_real_tokens(tiny_llama_dir, tmp_path):
    recipe = parse_recipe(tiny_recipe(tiny_llama_dir))
    run_pipeline(recipe, tmp_path / "run", until="collect", progress=False)
    ctx = RunContext(recipe, RunDir.open(tmp_path / "run"), progress=False)
    acts = collect(ctx, "news")
    assert ctx.run.executed == []  # reused
    prompts = ctx.tasks["news"].prompts("calibration")
    lengths = [
        len(ids) for ids in ctx.tokenizer(prompts, truncation=True, max_length=32)["input_ids"]
    ]
    assert acts.n_tokens == sum(lengths)
    # rows equal an unbatched forward pass of each sample alone (padding did not leak in)
    model, tok = ctx.model, ctx.tokenizer
    ids = torch.tensor([tok(prompts[1], truncation=True, max_length=32)["input_ids"]])
    seen = []
    down = model.model.layers[1].mlp.down_proj
    handle = down.register_forward_pre_hook(lambda m, a: seen.append(a[0][0].detach()))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    rows = acts.matrix[acts.sample_index == 1][:, 48:96]
    np.testing.assert_allclose(rows, seen[0].numpy(), atol=1e-5)


def test_existing_non_run_directory_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    with pytest.raises(RunDirError, match="--overwrite"):
        RunDir.open(tmp_path / "out")
    with pytest.raises(RunDirError, match="not an fbnprune run directory"):
        RunDir.open(tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model": "no-such-model-xyz"}, "no-such-model-xyz"),
        ({"select": {"budget": 0.0}}, "budget must be in"),
        ({"select": {"budget": 1.5}}, "budget must be in"),
        ({"select": {"budgte": 0.1}}, "select.budgte: unknown key"),
        ({"discover": {"n_components": "many"}}, "discover.n_components"),
        ({"tasks": [{"name": "x", "source": "builtin:nope"}]}, "nope"),
        ({"discover": {"n_components": 4000}}, "needs more than 4000 tokens"),
    ],
)
def test_bad_input_gives_a_clear_error_and_exit_code(
    tiny_llama_dir, tmp_path, capsys, overrides, message
):
    data = tiny_recipe(**{"model": tiny_llama_dir, **overrides})
    path = write_recipe(tmp_path / "recipe.yaml", data)
    code = main(["-q", "run", str(path), "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "plan.json").exists()


def test_empty_corpus_and_too_short_corpus(tiny_llama_dir, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "short.txt").write_text("one doc\n\ntwo docs\n")
    for name in ("empty.txt", "short.txt"):
        tasks = [{"name": "t", "source": f"file:{tmp_path / name}"}]
        path = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(tiny_llama_dir, tasks=tasks))
        assert main(["-q", "validate", str(path), "--data"]) == 2
        assert name in capsys.readouterr().err


def test_validate_accepts_the_shipped_recipes(capsys):

    recipes = sorted(str(p) for p in REPO.glob("recipes/*.yaml"))
    assert len(recipes) >= 3
    assert main(["validate", *recipes]) == 0
    assert capsys.readouterr().out.count(": ok") == len(recipes)


def test_help_explains_every_subcommand(capsys):
    for command in ("run", "collect", "discover", "select", "prune", "check", "save", "validate"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: fbnprune" in capsys.readouterr().out


def test_stage_subcommand_stops_after_its_stage(tiny_llama_dir, tmp_path, capsys):
    path = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(tiny_llama_dir))
    assert main(["-q", "select", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert (tmp_path / "run" / "plan.json").is_file()
    assert not (tmp_path / "run" / "parity.json").exists()
    assert "plan: " in capsys.readouterr().out
