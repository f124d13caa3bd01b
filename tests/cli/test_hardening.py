"""Hardening (issue 11): --overwrite never deletes what is not a run, one process per run
directory, recipe files read strictly, user errors as one message (--debug: traceback).

No model is loaded: every refusal here happens before the model would be."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, tiny_recipe, write_recipe

from fbnprune.analyze import AnalyzeError
from fbnprune.analyze.study import check_out_dir
from fbnprune.cli import main
from fbnprune.publish.folder import ExportError, export_run
from fbnprune.recipe import RecipeError, load_recipe
from fbnprune.rundir import (
    LOCK_FILE,
    LOCK_HOLDER,
    RUN_FILE,
    RunDir,
    RunDirError,
    RunDirLockedError,
    check_replaceable,
)

ROOT = REPO


def make_run_dir(path: Path) -> Path:
    """A folder that looks like an earlier fbnprune run: run.json and a stale output."""
    path.mkdir(parents=True, exist_ok=True)
    (path / RUN_FILE).write_text(json.dumps({"stages": {}}))
    (path / "plan.json").write_text("{}")
    return path


def unloaded_recipe(path: Path, model: str | Path = "no-such-model-xyz") -> Path:
    """A valid recipe file (the model is never loaded by these tests)."""
    return write_recipe(path, tiny_recipe(model))


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


# --- --overwrite ----------------------------------------------------------------------------
def test_overwrite_refuses_the_working_directory(tmp_path, monkeypatch):
    work = make_run_dir(tmp_path / "work")  # even a run directory: it is where we stand
    monkeypatch.chdir(work)
    with pytest.raises(RunDirError, match="it is the working directory; choose another --out"):
        RunDir.open(Path("."), overwrite=True)
    assert (work / RUN_FILE).is_file() and (work / "plan.json").is_file()


def test_overwrite_refuses_a_parent_of_the_working_directory(tmp_path, monkeypatch):
    top = make_run_dir(tmp_path / "top")
    (top / "inner").mkdir()
    monkeypatch.chdir(top / "inner")
    with pytest.raises(RunDirError, match="a parent of the working directory"):
        RunDir.open(Path(".."), overwrite=True)
    with pytest.raises(RunDirError, match="a parent of the working directory"):
        RunDir.open(top, overwrite=True)
    assert (top / "plan.json").is_file() and (top / "inner").is_dir()


def test_overwrite_refuses_home_and_root(tmp_path, monkeypatch):
    home = make_run_dir(tmp_path / "home")
    monkeypatch.setenv("HOME", str(home))  # a stand-in home: the real one is never touched
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(RunDirError, match="it is the home directory"):
        RunDir.open(home, overwrite=True)
    assert (home / "plan.json").is_file()
    with pytest.raises(RunDirError, match="the filesystem root"):
        check_replaceable(Path("/"))  # changes nothing on disk, whatever it decides


def test_overwrite_refuses_a_folder_holding_the_recipe_or_the_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = make_run_dir(tmp_path / "run")
    recipe = unloaded_recipe(run / "my-recipe.yaml")
    code = main(["-q", "run", str(recipe), "--out", str(run), "--overwrite", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "the recipe or the model" in err and str(recipe.resolve()) in err
    assert "Traceback" not in err
    assert recipe.is_file() and (run / "plan.json").is_file()

    model = run / "checkpoint-padded"  # a local model directory inside the run
    model.mkdir()
    (model / "config.json").write_text("{}")
    recipe = unloaded_recipe(tmp_path / "recipe.yaml", model=model)
    code = main(["-q", "run", str(recipe), "--out", str(run), "--overwrite", "--no-progress"])
    assert code == 2 and str(model.resolve()) in capsys.readouterr().err
    assert (model / "config.json").is_file()
    gguf = run / "model.gguf"  # and a .gguf file, through the library call as well
    gguf.write_bytes(b"GGUF")
    with pytest.raises(RunDirError, match="the recipe or the model"):
        RunDir.open(run, overwrite=True, protected=(str(gguf), "HuggingFaceTB/SmolLM2-135M"))
    assert gguf.is_file() and not (run / LOCK_FILE).exists()


def test_out_inside_the_model_folder_is_refused(tmp_path, capsys):
    """A run inside the model's folder changes the model's fingerprint: every re-run would
    recompute every stage, silently (issue 29, R4)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    recipe = unloaded_recipe(tmp_path / "recipe.yaml", model=model)
    for out in (model / "runs" / "demo", model):
        code = main(["-q", "run", str(recipe), "--out", str(out), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and "inside" in err and "choose an --out outside it" in err, err
        assert "Traceback" not in err
    assert sorted(p.name for p in model.iterdir()) == ["config.json"]  # nothing written
    with pytest.raises(RunDirError, match="model's folder"):
        RunDir.open(model / "run", protected=(str(model),))


def test_an_out_name_too_long_for_the_file_system_is_one_message(tmp_path, capsys):
    recipe = unloaded_recipe(tmp_path / "recipe.yaml")
    out = tmp_path / ("x" * 256)
    code = main(["-q", "run", str(recipe), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "choose a shorter --out" in err and "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["recipe.yaml"]  # nothing written


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(RunDirError, match="not an fbnprune run directory"):
        RunDir.open(out)
    refused = r"not empty and not an fbnprune run directory \(no run.json\); --overwrite only"
    with pytest.raises(RunDirError, match=refused):
        RunDir.open(out, overwrite=True)
    recipe = unloaded_recipe(tmp_path / "recipe.yaml")
    assert main(["-q", "run", str(recipe), "--out", str(out), "--overwrite"]) == 2
    assert "not an fbnprune run directory" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]  # no lock file left there


def test_overwrite_replaces_an_earlier_run_or_an_empty_folder_while_locked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = make_run_dir(tmp_path / "run")
    (run / "collect").mkdir()
    (run / "collect" / "activations.npy").write_bytes(b"x")
    with RunDir(run).lock(command="test"):
        opened = RunDir.open(run, overwrite=True)
        assert opened.path == run
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE, LOCK_HOLDER]  # lock kept
        RunDir.open(run)  # a folder holding only the lock counts as empty
    (tmp_path / "empty").mkdir()
    RunDir.open(tmp_path / "empty", overwrite=True)
    RunDir.open(tmp_path / "new" / "run", overwrite=True)
    assert (tmp_path / "new" / "run").is_dir()


def test_export_and_analyze_outputs_use_the_same_guard(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "precious.txt").write_text("keep me")
    monkeypatch.chdir(work)
    with pytest.raises(AnalyzeError, match="it is the working directory"):
        check_out_dir(Path("."), True)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "file").write_text("x")
    with pytest.raises(AnalyzeError, match="not empty and not an fbnprune analysis"):
        check_out_dir(busy, True)
    done = tmp_path / "analysis"
    done.mkdir()
    (done / "analysis.json").write_text("{}")
    check_out_dir(done, True)  # an earlier analysis is replaceable

    run_dir = tmp_path / "run"  # enough of a run for export to reach its output folder
    (run_dir / "checkpoint-padded").mkdir(parents=True)
    (run_dir / "plan.json").write_text("{}")
    with pytest.raises(ExportError, match="it is the working directory"):
        export_run(run_dir, ".", overwrite=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an fbnprune export"):
        export_run(run_dir, other, overwrite=True)
    assert (work / "precious.txt").is_file() and (other / "notes.txt").is_file()
    assert (busy / "file").is_file()


# --- one run at a time ----------------------------------------------------------------------
SECOND = """
import sys
from fbnprune.rundir import RunDir, RunDirLockedError
try:
    with RunDir(sys.argv[1]).lock(command="second"):
        print("acquired")
except RunDirLockedError as exc:
    print(exc)
    sys.exit(3)
"""


def test_a_second_process_is_refused_while_the_first_holds_the_lock(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    with RunDir(run).lock(command="fbnprune run first.yaml --out run") as held:
        assert held.path == run and (run / LOCK_FILE).exists()
        holder = json.loads((run / LOCK_HOLDER).read_text())
        assert holder["pid"] == os.getpid()
        second = subprocess.run(
            [sys.executable, "-c", SECOND, str(run)],
            capture_output=True,
            text=True,
            timeout=120,
            env=env(),
        )
        assert second.returncode == 3, second.stderr
        assert "is in use by another fbnprune process" in second.stdout
        assert f"pid {os.getpid()}: fbnprune run first.yaml --out run" in second.stdout
        assert "choose another --out" in second.stdout
        with pytest.raises(RunDirLockedError), RunDir(run).lock():  # and one in this process
            pass
    assert not (run / LOCK_HOLDER).exists()
    after = subprocess.run(
        [sys.executable, "-c", SECOND, str(run)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env(),
    )
    assert after.returncode == 0 and "acquired" in after.stdout, after.stderr


def test_the_cli_refuses_a_second_run_into_the_same_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = unloaded_recipe(tmp_path / "recipe.yaml")
    run = make_run_dir(tmp_path / "run")
    before = sorted(p.name for p in run.iterdir())
    with RunDir(run).lock(command="fbnprune run recipe.yaml --out run"):
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "fbnprune",
                "-q",
                "run",
                str(recipe),
                "--out",
                str(run),
                "--overwrite",
                "--no-progress",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env=env(),
        )
    assert second.returncode == 2, second.stderr
    assert f"is in use by another fbnprune process (pid {os.getpid()}" in second.stderr
    assert "Traceback" not in second.stderr
    after = sorted(p.name for p in run.iterdir() if p.name not in (LOCK_FILE, LOCK_HOLDER))
    assert after == before  # --overwrite deleted nothing


# --- recipe files ---------------------------------------------------------------------------
def test_duplicate_yaml_keys_are_refused(tmp_path):
    path = tmp_path / "recipe.yaml"
    text = unloaded_recipe(path).read_text()
    path.write_text(text + "prune:\n  ridge: 0.2\n  ridge: 0.4\n")  # a section it lacks
    lines = path.read_text().splitlines()
    second = lines.index("  ridge: 0.4") + 1
    with pytest.raises(
        RecipeError,
        match=f"duplicate key 'ridge' at line {second} \\(first given at line {second - 1}\\)",
    ):
        load_recipe(path)
    path.write_text(text + "model: other\n")
    with pytest.raises(RecipeError, match="duplicate key 'model'"):
        load_recipe(path)
    path.write_text(text + "base: &b {x: 1}\nover:\n  <<: *b\n  x: 2\n")  # merge keys still work
    with pytest.raises(RecipeError, match="base: unknown key"):
        load_recipe(path)


def test_a_directory_is_not_a_recipe(tmp_path, capsys):
    folder = tmp_path / "recipes"
    unloaded_recipe(folder / "demo.yaml")
    with pytest.raises(
        RecipeError,
        match="is a directory, not a recipe file; pass one of the recipes in it: demo.yaml",
    ):
        load_recipe(folder)
    assert main(["validate", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "is a directory, not a recipe file" in err and "not found" not in err


def test_a_non_utf8_recipe_names_the_byte_offset(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    data = unloaded_recipe(path).read_bytes() + b"name: caf\xe9\n"
    path.write_bytes(data)
    offset = data.index(b"\xe9")
    with pytest.raises(RecipeError, match=f"not UTF-8 text: byte 0xe9 at offset {offset}"):
        load_recipe(path)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"offset {offset}" in err and "UnicodeDecodeError" not in err


# --- user errors: one message, --debug for the traceback ------------------------------------
def test_debug_shows_the_traceback(tmp_path, capsys):
    folder = tmp_path / "recipes"
    folder.mkdir()
    assert main(["validate", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "is a directory, not a recipe file" in err
    for argv in (["--debug", "validate", str(folder)], ["validate", str(folder), "--debug"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and "RecipeError" in err
        assert err.rstrip().endswith("is a directory, not a recipe file")


def test_no_progress_silences_the_libraries_bars_too(tiny_llama_dir, tmp_path, capfd):
    """transformers prints "Loading weights" bars of its own; --no-progress means none."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_llama_dir))
    out = str(tmp_path / "run")
    assert main(["-q", "collect", str(recipe), "--out", out, "--no-progress"]) == 0
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "it/s]" not in err, err
