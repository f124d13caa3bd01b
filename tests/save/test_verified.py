"""No code fbnprune did not write and check runs: a checkpoint folder dropped into a run, or a
checked one edited afterwards, is refused before it loads; a foreign ``auto_map`` of the input
model is never written into a checkpoint (issue 29, S1 and M2)."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import tiny_model, tiny_recipe, tiny_tokenizer

from fbnprune.cli import main
from fbnprune.pipeline import run_pipeline
from fbnprune.recipe import parse_recipe
from fbnprune.save.checkpoint import COMPACT_AUTO_MAP, MODELING_FILE, save_checkpoint
from fbnprune.save.verified import UnverifiedCheckpointError, own_code, verify_checkpoint

# a module that leaves a mark if anything imports it
EVIL = "import pathlib\npathlib.Path({mark!r}).write_text('ran')\n"


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("verified")
    recipe = parse_recipe(tiny_recipe(tiny_llama_dir, select={"selector": "magnitude"}))
    run_pipeline(recipe, root / "run", until="save", progress=False)
    return root / "run"


def copy_run(saved_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    return run


def test_the_run_s_own_checkpoints_verify(saved_run):
    assert verify_checkpoint(saved_run, saved_run / "checkpoint-compact") is True
    assert verify_checkpoint(saved_run, saved_run / "checkpoint-padded") is False


def test_a_dropped_in_checkpoint_never_runs_its_code(saved_run, tmp_path, capsys):
    run = copy_run(saved_run, tmp_path)
    mark = tmp_path / "mark"
    foreign = run / "checkpoint-x"
    shutil.copytree(run / "checkpoint-padded", foreign)
    config = json.loads((foreign / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
    (foreign / "config.json").write_text(json.dumps(config))
    (foreign / "modeling_evil.py").write_text(EVIL.format(mark=str(mark)))
    with pytest.raises(UnverifiedCheckpointError, match="not a checkpoint this run checked"):
        verify_checkpoint(run, foreign)
    code = main(["-q", "evaluate", str(run), "--models", "checkpoint", "--limit", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "checkpoint-x" in err and "Traceback" not in err
    assert not mark.exists()


def test_an_edited_modeling_file_is_refused(saved_run, tmp_path):
    run = copy_run(saved_run, tmp_path)
    mark = tmp_path / "mark"
    modeling = run / "checkpoint-compact" / MODELING_FILE
    modeling.write_text(modeling.read_text() + EVIL.format(mark=str(mark)))
    with pytest.raises(UnverifiedCheckpointError, match=f"{MODELING_FILE}: changed"):
        verify_checkpoint(run, run / "checkpoint-compact")
    with pytest.raises(UnverifiedCheckpointError, match="is not the modeling file"):
        own_code(run / "checkpoint-compact")  # even where its digests were recorded so
    assert not mark.exists()


def test_code_beside_the_weights_or_a_foreign_auto_map_is_refused(saved_run, tmp_path):
    run = copy_run(saved_run, tmp_path)
    padded = run / "checkpoint-padded"
    (padded / "helper.py").write_text("x = 1\n")
    with pytest.raises(UnverifiedCheckpointError, match="helper.py"):
        own_code(padded)
    (padded / "helper.py").unlink()
    config = json.loads((padded / "config.json").read_text())
    config["auto_map"] = COMPACT_AUTO_MAP  # ours, but without its file
    (padded / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnverifiedCheckpointError, match="code fbnprune did not write"):
        own_code(padded)
    (run / "parity.json").unlink()
    with pytest.raises(UnverifiedCheckpointError, match="parity.json is missing"):
        verify_checkpoint(run, run / "checkpoint-compact")


def test_a_foreign_auto_map_of_the_input_is_not_written(tmp_path):
    model = tiny_model("llama")
    foreign = {"AutoModelForCausalLM": "modeling_theirs.TheirModel"}
    model.config.auto_map = foreign
    save_checkpoint(model, tiny_tokenizer(), tmp_path / "out")
    assert "auto_map" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert own_code(tmp_path / "out") is False
    assert model.config.auto_map == foreign  # the model in memory is left as it was
