"""A Llama at real 7B widths (hidden 4,096, MLP 11,008), random weights, sharded safetensors:
the whole run, ``fbnprune save`` with ``collect.onload`` and ``save.onload`` both ``sequential``
(collect layer by layer from the shards into a float16 zarr store; discover on dask with a
256 MiB budget; select; prune sized on the meta model; check and save one decoder block at
a time: each MLP in float64 against the masked MLP, then the saved tensors bit for bit),
runs in a child whose peak RSS stays below the model alone, the check adding at most 1.75 GiB
to what the process holds before it (a floor that differs between machines). The same
recipe with the whole model in memory (``collect.onload: full``; it fits on a test machine)
makes the same plan, exactly, and ``slice_model`` + ``save_checkpoint`` write the same
tensors as the streamed run's padded checkpoint, bit for bit.

Measured: see the README, "Large models" (the figures this test prints with ``-s``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SPECIAL, VOCAB, tiny_tokenizer
from transformers import AutoConfig, AutoModelForCausalLM

from fbnprune.rundir.layout import PARITY_FILE, PLAN_FILE, RUN_FILE, checkpoint_name

GiB = 2**30
# The run's peak stays below the model alone (3.02 GiB of float32 shards), and the check, the
# largest stage, adds at most this much to what the process already holds when select runs
# (imports and libraries: about 0.75 GiB here, since every stage starts by giving freed memory
# back; 1.0 GiB before that): one float64 MLP is 1.0 GiB at these widths, plus its slices and
# the replayed inputs (measured 1.78 GiB above select; check's own peak 2.53 GiB, as before).
CHECK_ABOVE_FLOOR = 2.0 * GiB

# run a command in a child and print that child's peak RSS (ru_maxrss: KiB on Linux)
MEASURE = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[1:]).returncode\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n"
    "sys.exit(code)\n"
)


def llama_dir(path: Path, *, hidden: int, mlp: int, layers: int, heads: int) -> Path:
    config = AutoConfig.for_model(
        "llama",
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        **SPECIAL,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path, max_shard_size="1GB")
    tiny_tokenizer().save_pretrained(path)
    return path


def recipe(model: Path, onload: str) -> dict:
    return {
        "name": "real-width",
        "model": str(model),
        "tasks": [
            {
                "name": "news",
                "source": "builtin:bbc_news",
                "template": "{text}",
                "calibration_samples": 16,
                "heldout_samples": 2,
                "max_length": 64,
            }
        ],
        "collect": {"batch_size": 8, "storage": "zarr", "onload": onload},
        "discover": {"n_components": 16, "engine": "dask", "memory": "256MiB"},
        "select": {"budget": 0.25, "min_per_layer": 0.05},
        "save": {"layouts": ["padded", "compact"], "onload": onload},
        "heal": {"enabled": False},
    }


# the plan sliced and saved with the whole model in memory
IN_MEMORY = (
    "import sys; from pathlib import Path; from fbnprune.plan import PrunePlan\n"
    "from transformers import AutoModelForCausalLM\n"
    "from fbnprune.save.checkpoint import save_checkpoint\n"
    "from fbnprune.pruning.slicing import slice_model\n"
    "model = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
    "save_checkpoint(slice_model(model, PrunePlan.load(sys.argv[2])), None, Path(sys.argv[3]))\n"
)


def measured(*command: str) -> tuple[int, float, list[str]]:
    """Peak RSS (bytes), wall time and output lines of ``command`` run in a child (1
    thread)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, *command],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    wall = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    return int(lines[-1]), wall, lines[:-1]


def run_until(tmp: Path, model: Path, onload: str, stage: str) -> tuple[Path, int, float]:
    """The run directory, the peak RSS (bytes) and the wall time of ``fbnprune <stage>`` in a
    child."""
    file = tmp / f"{onload}.yaml"
    file.write_text(yaml.safe_dump(recipe(model, onload)))
    out = tmp / f"run-{onload}"
    peak, wall, _ = measured(
        sys.executable, "-m", "fbnprune", stage, str(file), "--out", str(out), "--no-progress"
    )
    return out, peak, wall


def stage_peaks(run: Path) -> dict[str, float]:
    """Each stage's sampled peak RSS (bytes) from run.json."""
    stages = json.loads((run / RUN_FILE).read_text())["stages"]
    return {name: info["peak_rss_mib"] * 2**20 for name, info in stages.items()}


def stage_seconds(run: Path) -> str:
    """Each stage's wall time and peak RSS from run.json, e.g. ``collect 20 s 1.2 GiB``."""
    stages = json.loads((run / RUN_FILE).read_text())["stages"]
    return ", ".join(
        f"{name} {info['seconds']:.0f} s {info['peak_rss_mib'] / 1024:.2f} GiB"
        for name, info in stages.items()
    )


def worst(report: dict) -> float:
    """The largest max |delta| of a parity report's comparisons."""
    return max(c["max_abs"] for c in report["comparisons"])


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two checkpoints hold the same tensors, bit for bit (read one at a time)."""
    from safetensors import safe_open

    def where(directory: Path) -> dict[str, Path]:
        out = {}
        for file in directory.glob("*.safetensors"):
            with safe_open(file, framework="pt") as f:
                out.update(dict.fromkeys(f.keys(), file))
        return out

    left, right = where(a), where(b)
    if sorted(left) != sorted(right):
        return False
    for key, file in left.items():
        with safe_open(file, framework="pt") as f, safe_open(right[key], framework="pt") as g:
            if not torch.equal(f.get_tensor(key), g.get_tensor(key)):
                return False
    return True


@pytest.mark.slow
def test_real_width_llama_runs_under_a_memory_cap(tmp_path):
    model = llama_dir(tmp_path / "llama-7b-width", hidden=4096, mlp=11008, layers=4, heads=32)
    model_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    assert len(list(model.glob("*.safetensors"))) > 1  # sharded
    # collect -> discover -> select -> prune -> check -> save, one decoder block at a time
    run, peak, wall = run_until(tmp_path, model, "sequential", "save")
    plan = json.loads((run / PLAN_FILE).read_text())
    tokens = sum(plan["provenance"]["calibration_tokens"].values())
    matrix_bytes = tokens * sum(plan["layer_widths"]) * 4  # the float32 matrix
    parity = json.loads((run / PARITY_FILE).read_text())
    exact, saved = parity["reports"]
    print(
        f"real width: model {model_bytes / GiB:.2f} GiB, matrix {tokens} x "
        f"{sum(plan['layer_widths'])} = {matrix_bytes / GiB:.2f} GiB float32; the whole run "
        f"layer by layer: peak RSS {peak / GiB:.2f} GiB, {wall:.0f} s "
        f"({stage_seconds(run)}); check: float64 max |delta| {worst(exact):.2e}, saved "
        f"tensors max |delta| {worst(saved):.1e}"
    )
    peaks = stage_peaks(run)
    assert peak < model_bytes  # the whole run holds less than the model alone
    assert peaks["check"] - peaks["select"] < CHECK_ABOVE_FLOOR
    assert parity["passed"] and exact["dtype"] == "float64" and worst(saved) == 0.0
    for layout in ("padded", "compact"):
        assert (run / checkpoint_name(layout) / "config.json").is_file()
    # the same recipe with the whole model in memory (it fits here): the same plan, the same
    # sliced checkpoint
    full_run, full_peak, full_wall = run_until(tmp_path, model, "full", "select")
    full = json.loads((full_run / PLAN_FILE).read_text())
    print(f"whole model: select peak RSS {full_peak / GiB:.2f} GiB, {full_wall:.0f} s")
    assert plan["kept"] == full["kept"] and plan["fill_values"] == full["fill_values"]
    assert [len(k) for k in plan["kept"]] == plan["provenance"]["kept_per_layer"]
    mem_peak, mem_wall, _ = measured(
        sys.executable, "-c", IN_MEMORY, str(model), str(run / PLAN_FILE), str(tmp_path / "mem")
    )
    print(f"whole model: slice + save peak RSS {mem_peak / GiB:.2f} GiB, {mem_wall:.0f} s")
    assert same_tensors(run / checkpoint_name("padded"), tmp_path / "mem")
