"""Healing's training loop with and without activation checkpointing: peak memory, time, and
whether the trained weights are the same, bit for bit.

    python benchmarks/heal_memory.py runs/demo --steps 4
    python benchmarks/heal_memory.py runs/gemma3-headlines --layout compact --steps 3

Each setting trains in its own process (so neither sees the other's memory) through
``heal_model`` itself, on the run's first ``--steps`` batches of the teacher's targets
(``heal/teacher.safetensors``), from its checked ``checkpoint-<layout>/``, with the run's
``heal`` settings (no validation, no time cap). Peaks are the process's RSS sampled every
10 ms during training, after the student and targets are loaded; the floor before loading
is printed beside them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path


def train(run: Path, layout: str, steps: int, recompute: bool) -> dict[str, float | str]:
    """``heal_model`` for ``steps`` steps in this process, on the run's first ``steps``
    batches of targets: peak RSS (MiB) while it trains, seconds, a digest of the weights."""
    import psutil
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from fbnprune.heal.distill import load_targets
    from fbnprune.heal.train import heal_model
    from fbnprune.recipe import load_recipe

    proc, peak = psutil.Process(), [0]
    floor = proc.memory_info().rss
    file = run / "heal" / "teacher.safetensors"
    with safe_open(str(file), framework="pt") as f:
        key = (f.metadata() or {})["key"]
    targets = load_targets(file, key)
    assert targets is not None
    settings = {"steps": steps, "max_minutes": None, "activation_checkpointing": recompute}
    cfg = load_recipe(run / "recipe.yaml").heal.model_copy(update=settings)
    student = AutoModelForCausalLM.from_pretrained(
        run / f"checkpoint-{layout}", trust_remote_code=layout == "compact"
    )

    def sample() -> None:
        while True:
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.01)

    threading.Thread(target=sample, daemon=True).start()
    started = time.perf_counter()
    healed, _ = heal_model(
        student, None, None, [], cfg, targets=(targets[0][:steps], []), progress=False
    )
    seconds = time.perf_counter() - started
    digest = hashlib.sha256()
    for name, value in sorted(healed.state_dict().items()):
        digest.update(name.encode() + value.detach().contiguous().numpy().tobytes())
    return {
        "floor_mib": floor / 2**20,
        "peak_mib": max(peak[0], proc.memory_info().rss) / 2**20,
        "seconds": seconds,
        "weights": digest.hexdigest()[:16],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run directory with heal/teacher.safetensors")
    parser.add_argument("--layout", default="compact", help="the checkpoint trained")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--one", choices=["plain", "recompute"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(train(args.run, args.layout, args.steps, args.one == "recompute")))
        return
    rows = {}
    for setting in ("plain", "recompute"):
        command = [sys.executable, __file__, str(args.run), "--layout", args.layout]
        command += ["--steps", str(args.steps), "--one", setting]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows[setting] = json.loads(out.strip().splitlines()[-1])
    print(f"{args.run}, checkpoint-{args.layout}, {args.steps} steps")
    print("| activation checkpointing | floor (MiB) | peak RSS (MiB) | seconds | weights |")
    print("|---|---|---|---|---|")
    for setting, row in rows.items():
        print(
            f"| {'on' if setting == 'recompute' else 'off'} | {row['floor_mib']:,.0f} | "
            f"{row['peak_mib']:,.0f} | {row['seconds']:.1f} | {row['weights']} |"
        )
    same = rows["plain"]["weights"] == rows["recompute"]["weights"]
    print(f"the same weights, bit for bit: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
