"""A Llama at real 7B widths (hidden 4,096, MLP 11,008), random weights, sharded safetensors:
collect (layer by layer from the shards, into a float16 zarr store) -> discover (dask, a
256 MiB budget) -> select runs in a subprocess whose peak RSS stays below a cap smaller than
the model alone, and so do slicing and saving the plan one layer at a time from the shards
(``scale.stream_save``) and checking the result one layer at a time against the masked
original (``scale.layer_check``, float32, atol 1e-3). The same run with the whole model in
memory (``collect.onload: full``; it fits on a test machine) makes the same plan, exactly,
and ``slice_model`` + ``save_checkpoint`` write the same tensors, bit for bit.

Measured (2 cores shared with another job, 1 thread): model 3.02 GiB, matrix 1,024 x 44,032
(0.17 GiB float32). Layer by layer: collect -> select 1.58-1.67 GiB peak RSS in 34-55 s,
slice + save 1.53-1.64 GiB in 17 s, per-layer check 1.63 GiB in 15 s (max |delta| 4.8e-6);
whole model: 3.9-4.3 GiB for each. The test takes about 3 minutes.
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

from fbnprune.rundir.layout import PLAN_FILE

GiB = 2**30
CAP = 2.0 * GiB  # the 4-layer model alone is 3.0 GiB (float32)

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
        "heal": {"enabled": False},
    }


# the plan sliced and saved: streamed from the shards, or with the whole model in memory
STREAMED = (
    "import sys; from pathlib import Path; from fbnprune.plan import PrunePlan\n"
    "from fbnprune.scale.stream_save import save_sliced_layerwise\n"
    "save_sliced_layerwise(sys.argv[1], PrunePlan.load(sys.argv[2]), Path(sys.argv[3]))\n"
)
IN_MEMORY = (
    "import sys; from pathlib import Path; from fbnprune.plan import PrunePlan\n"
    "from transformers import AutoModelForCausalLM\n"
    "from fbnprune.save import save_checkpoint; from fbnprune.slicing import slice_model\n"
    "model = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
    "save_checkpoint(slice_model(model, PrunePlan.load(sys.argv[2])), None, Path(sys.argv[3]))\n"
)

# the streamed checkpoint checked one layer at a time against the masked original (float32)
LAYER_CHECK = (
    "import sys, torch; from fbnprune.plan import PrunePlan\n"
    "from transformers import AutoTokenizer\n"
    "from fbnprune.scale.layer_check import layerwise_parity\n"
    "texts = ['the quick brown fox jumps over the lazy dog', 'a stitch in time saves nine']\n"
    "parity = layerwise_parity(sys.argv[1], sys.argv[3], PrunePlan.load(sys.argv[2]),\n"
    "    AutoTokenizer.from_pretrained(sys.argv[1]), texts, atol=1e-3, dtype=torch.float32)\n"
    "print(parity.worst, parity.passed)\n"
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


def run_until_select(tmp: Path, model: Path, onload: str) -> tuple[dict, int, float]:
    """The plan, the peak RSS (bytes) and the wall time of ``fbnprune select`` in a child."""
    file = tmp / f"{onload}.yaml"
    file.write_text(yaml.safe_dump(recipe(model, onload)))
    out = tmp / f"run-{onload}"
    peak, wall, _ = measured(
        sys.executable, "-m", "fbnprune", "select", str(file), "--out", str(out), "--no-progress"
    )
    return json.loads((out / PLAN_FILE).read_text()), peak, wall


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
    plan, peak, wall = run_until_select(tmp_path, model, "sequential")
    tokens = sum(plan["provenance"]["calibration_tokens"].values())
    matrix_bytes = tokens * sum(plan["layer_widths"]) * 4  # the float32 matrix
    print(
        f"real width: model {model_bytes / GiB:.2f} GiB, matrix {tokens} x "
        f"{sum(plan['layer_widths'])} = {matrix_bytes / GiB:.2f} GiB float32; layer by layer: "
        f"peak RSS {peak / GiB:.2f} GiB (cap {CAP / GiB:.1f} GiB), {wall:.0f} s"
    )
    assert model_bytes + matrix_bytes > CAP  # the cap is below model + matrix
    assert peak < CAP
    # the plan sliced and saved one layer at a time, from the shards: under the cap too
    plan_file = tmp_path / "run-sequential" / PLAN_FILE
    save_peak, save_wall, _ = measured(
        sys.executable, "-c", STREAMED, str(model), str(plan_file), str(tmp_path / "streamed")
    )
    print(f"streamed slice + save: peak RSS {save_peak / GiB:.2f} GiB, {save_wall:.0f} s")
    assert save_peak < CAP
    # ... and checked one layer at a time against the masked original
    check_peak, check_wall, out = measured(
        sys.executable, "-c", LAYER_CHECK, str(model), str(plan_file), str(tmp_path / "streamed")
    )
    worst, passed = out[-1].split()
    print(
        f"per-layer check (float32): max |delta| {float(worst):.2e}, peak RSS "
        f"{check_peak / GiB:.2f} GiB, {check_wall:.0f} s"
    )
    assert passed == "True" and check_peak < CAP
    # the same run with the whole model in memory (it fits here): the same plan, the same
    # sliced checkpoint
    full, full_peak, full_wall = run_until_select(tmp_path, model, "full")
    print(f"whole model: select peak RSS {full_peak / GiB:.2f} GiB, {full_wall:.0f} s")
    assert plan["kept"] == full["kept"] and plan["fill_values"] == full["fill_values"]
    assert [len(k) for k in plan["kept"]] == plan["provenance"]["kept_per_layer"]
    mem_peak, mem_wall, _ = measured(
        sys.executable, "-c", IN_MEMORY, str(model), str(plan_file), str(tmp_path / "in-memory")
    )
    print(f"whole model: slice + save peak RSS {mem_peak / GiB:.2f} GiB, {mem_wall:.0f} s")
    assert same_tensors(tmp_path / "streamed", tmp_path / "in-memory")
