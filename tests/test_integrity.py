"""Hardening (issue 11), second part: reuse follows content (model files, plan), checked
bytes are verified on resume, faults of the machine (full disk, read-only folder) and bad
input that only the data reveals give one clear message."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_model, tiny_recipe, tiny_tokenizer, write_recipe
from safetensors.torch import load_file, save_file

from fbnprune import integrity
from fbnprune.cli import disk_fault, main
from fbnprune.pipeline import run_pipeline
from fbnprune.plan import PrunePlan
from fbnprune.recipe import RecipeError, load_recipe, parse_recipe


@pytest.fixture()
def model_dir(tmp_path) -> Path:
    """A tiny llama of our own (the tests change its files)."""
    path = tmp_path / "model"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture()
def finished_run(model_dir, tmp_path):
    recipe = parse_recipe(tiny_recipe(str(model_dir), save={"layouts": ["padded"]}))
    run_pipeline(recipe, tmp_path / "run", progress=False)
    return recipe, tmp_path / "run"


# --- integrity helpers ----------------------------------------------------------------------
def test_safetensors_problem_finds_truncation_from_the_header(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(64, 64), "b": torch.zeros(8)}, path)
    assert integrity.safetensors_problem(path) is None
    data = path.read_bytes()
    for cut, why in ((len(data) - 1, "truncated"), (20, "truncated: its header"), (5, "too short")):
        path.write_bytes(data[:cut])
        assert why in integrity.safetensors_problem(path)
    path.write_bytes((10).to_bytes(8, "little") + b"not json!!")
    assert integrity.safetensors_problem(path) == "corrupt: its header is not JSON"


def test_digest_mismatches_name_changed_missing_and_added_files(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"1")
    (tmp_path / "b.bin").write_bytes(b"2")
    (tmp_path / "fbnprune_plan.json").write_text("{}")  # a copy of a run file: not checked
    recorded = integrity.file_digests(tmp_path)
    assert sorted(recorded) == ["a.bin", "b.bin"]
    assert integrity.digest_mismatches(tmp_path, recorded) == []
    (tmp_path / "a.bin").write_bytes(b"x")
    (tmp_path / "b.bin").unlink()
    (tmp_path / "c.py").write_text("")
    assert integrity.digest_mismatches(tmp_path, recorded) == [
        "b.bin: missing",
        "a.bin: changed since it was checked",
        "c.py: added after the check",
    ]


# --- reuse follows content ------------------------------------------------------------------
def test_new_weights_at_the_same_model_path_rerun_every_stage(finished_run, model_dir):
    recipe, run = finished_run
    tiny_model("llama", seed=7).save_pretrained(model_dir)  # same path, other weights
    summary = run_pipeline(recipe, run, until="save", progress=False)
    assert summary.executed[:2] == ["collect:news", "discover:news"]
    assert "save" in summary.executed
    saved = load_file(run / "checkpoint-padded" / "model.safetensors")
    new = tiny_model("llama", seed=7).state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"  # attention is not pruned: copied as is
    assert torch.equal(saved[name], new[name])


def test_an_edited_plan_is_pruned_checked_and_saved_again(finished_run):
    recipe, run = finished_run
    plan = json.loads((run / "plan.json").read_text())
    plan["kept"][0] = plan["kept"][0][:3]  # a valid-looking edit: layer 0 keeps 3 units
    plan["fill_values"] = plan.get("fill_values")
    (run / "plan.json").write_text(json.dumps(plan))
    summary = run_pipeline(recipe, run, until="save", progress=False)
    assert summary.executed == ["prune", "check", "save"]  # select is kept: the edit is honoured
    shipped = PrunePlan.load(run / "checkpoint-padded" / "fbnprune_plan.json")
    assert shipped.kept_per_layer()[0] == 3
    assert json.loads((run / "prune.json").read_text())["kept_per_layer"][0] == 3
    assert summary.parity.passed


def test_a_changed_checkpoint_is_checked_and_saved_again_on_resume(finished_run, caplog):
    recipe, run = finished_run
    weights = run / "checkpoint-padded" / "model.safetensors"
    tensors = {k: torch.randn_like(v) for k, v in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    summary = run_pipeline(recipe, run, until="save", progress=False)
    assert summary.executed == ["check", "save"]
    assert "differ from the checked ones" in caplog.text
    files = json.loads((run / "parity.json").read_text())["files"]["checkpoint-padded"]
    assert integrity.digest_mismatches(run / "checkpoint-padded", files) == []


# --- faults of the machine ------------------------------------------------------------------
@pytest.mark.parametrize(
    "code, words",
    [(errno.ENOSPC, "no space left on the device"), (errno.EROFS, "the file system is read-only")],
)
def test_a_full_disk_or_read_only_folder_is_one_message(
    model_dir, tmp_path, monkeypatch, capsys, code, words
):
    recipe = write_recipe(
        tmp_path / "recipe.yaml", tiny_recipe(str(model_dir), save={"layouts": ["padded"]})
    )
    from fbnprune.save import checkpoint as save

    real = save.save_checkpoint

    def fill_up(model, tokenizer, directory, **kwargs):  # the disk fills while writing
        real(model, tokenizer, directory, **kwargs)
        raise OSError(code, "injected", str(Path(directory) / "model.safetensors"))

    monkeypatch.setattr("fbnprune.save.checked.save_checkpoint", fill_up)
    code_out = main(["-q", "run", str(recipe), "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code_out == 2 and "Traceback" not in err
    assert f"fbnprune run: error: {words} at " in err and "model.safetensors" in err
    assert "the same command resumes" in err
    assert not (tmp_path / "run" / ".staging").exists()  # no tens of MB left behind
    assert not list((tmp_path / "run").glob("checkpoint-*"))
    monkeypatch.undo()
    assert main(["-q", "run", str(recipe), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert (tmp_path / "run" / "checkpoint-padded" / "model.safetensors").is_file()


def test_disk_faults_raised_by_rust_code_are_recognised():
    class SafetensorError(Exception):
        pass

    text = (
        "Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
        '"No space left on device" })'
    )
    assert disk_fault(SafetensorError(text)).startswith("no space left on the device")
    assert disk_fault(ValueError("something else")) is None


def test_ctrl_c_during_start_up_imports_exits_130_without_a_traceback(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr("fbnprune.cli.build_parser", interrupted)
    assert main(["info"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err


# --- what validation catches ------------------------------------------------------------------
def test_validate_data_refuses_more_components_than_tokens(model_dir, tmp_path, capsys, caplog):
    data = tiny_recipe(str(model_dir), discover={"n_components": 400})
    data["tasks"][0].update(calibration_samples=2, max_length=32)  # <= 64 tokens
    assert main(["validate", "--data", str(write_recipe(tmp_path / "recipe.yaml", data))]) == 2
    err = capsys.readouterr().err
    assert "discover.n_components=400 needs more than 400 calibration tokens" in err
    data["discover"]["n_components"] = 20  # feasible, but under 4 tokens per component
    assert main(["validate", "--data", str(write_recipe(tmp_path / "recipe.yaml", data))]) == 0
    assert "calibration tokens for 20 ICA components" in caplog.text
    out = capsys.readouterr().out
    assert "calibration tokens" in out and "2119 left for evaluation" in out  # 2125 - 2 - 4


def test_validate_data_says_when_nothing_is_left_to_evaluate(model_dir, tmp_path, capsys, caplog):
    docs = tmp_path / "docs.txt"
    docs.write_text("\n\n".join(f"document number {i} with a few words" for i in range(6)))
    data = tiny_recipe(str(model_dir), discover={"n_components": 2})
    data["tasks"][0].update(source=f"file:{docs}", calibration_samples=4, heldout_samples=2)
    assert main(["validate", "--data", str(write_recipe(tmp_path / "recipe.yaml", data))]) == 0
    assert "0 left for evaluation" in capsys.readouterr().out
    assert "none is left for the verdict and evaluate" in caplog.text


@pytest.mark.parametrize(
    "select, words",
    [
        ({"budget": 0.05, "min_per_layer": 0.2}, "min_per_layer (0.2) is above the budget (0.05)"),
        ({"budget": 0.5, "max_per_layer": 0.3}, "max_per_layer (0.3) is below the budget (0.5)"),
        ({"budget": True}, "budget: expected a number or text, got the boolean True"),
    ],
)
def test_recipes_that_cannot_be_met_are_refused_at_once(tmp_path, select, words):
    data = tiny_recipe("some-model", select=select)
    with pytest.raises(RecipeError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(write_recipe(tmp_path / "recipe.yaml", data))


def test_booleans_still_work_where_a_boolean_is_meant(tmp_path):
    data = {**tiny_recipe("some-model", heal={"enabled": True}), "prune": {"sequential": True}}
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", data))
    assert recipe.prune.sequential is True and recipe.heal.enabled is True


def test_relative_file_sources_resolve_against_the_recipe_folder(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "project"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "docs.txt").write_text("\n\n".join(f"document {i} text" for i in range(9)))
    data = tiny_recipe("some-model")
    data["tasks"][0].update(source="file:data/docs.txt", calibration_samples=4, heldout_samples=2)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)  # elsewhere: data/docs.txt does not exist here
    recipe = load_recipe(path)
    assert recipe.tasks[0].source == f"file:{folder / 'data' / 'docs.txt'}"
    data["tasks"][0]["source"] = "file:data/absent.txt"
    path.write_text(yaml.safe_dump(data))
    assert main(["validate", "--data", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"file not found: {folder / 'data' / 'absent.txt'}" in err
    assert "resolved against the recipe's folder" in err


def test_an_invalid_hub_id_is_refused_before_the_export_is_written(finished_run, capsys):
    _, run = finished_run
    code = main(["export", str(run), "--push-to-hub", "not a repo id!", "--dry-run"])
    assert code == 2 and "invalid repository id" in capsys.readouterr().err
    assert not (run / "export-padded").exists()
    shutil.rmtree(run)
