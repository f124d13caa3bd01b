"""Benchmark what a run's pruned model costs against the original, measured in one process.

Usage: python benchmarks/prune_speed.py RUN_DIR [--model NAME] [--repeats 5] [--threads N]
       [--prompt-tokens 128] [--new-tokens 32] [--batch-size 1] [--device cpu] [--json FILE]

Loads the original model (the plan's ``model``, or --model), slices two copies with the run
directory's ``plan.json`` (padded and compact layouts) and prints, per device, a table of
parameters, safetensors bytes, peak extra memory of a generate run, and prefill and decode
tokens/s with ratios against the original. The three models are measured interleaved, order
rotated each round, and the figures are medians of the repeats. Devices: CPU, plus CUDA when
one is present, unless --device is given.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from pathlib import Path

import torch

from fbnprune.cost import costs_markdown, measure_costs
from fbnprune.models.loading import load_model
from fbnprune.plan import PrunePlan
from fbnprune.pruning.slicing import SliceError, slice_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory holding plan.json")
    parser.add_argument("--model", help="model to load (default: the plan's model)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--device", action="append", help="repeatable (default: cpu [+ cuda])")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    plan = PrunePlan.load(args.run_dir / "plan.json")
    original, _ = load_model(args.model or plan.model)
    models = {"original": original}
    for layout in ("padded", "compact"):
        try:
            models[f"sliced-{layout}"] = slice_model(
                copy.deepcopy(original), plan, layout=layout
            ).eval()
        except SliceError as exc:  # e.g. mean fill on a model without a down-projection bias
            print(f"no {layout} slice: {exc}")
    devices = args.device or ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    print(f"{args.model or plan.model}: {plan.summary()}")
    report = {}
    for device in devices:
        costs = measure_costs(
            models,
            prompt_tokens=args.prompt_tokens,
            new_tokens=args.new_tokens,
            batch_size=args.batch_size,
            repeats=args.repeats,
            warmup=args.warmup,
            device=device,
            threads=args.threads,
        )
        first = next(iter(costs.values()))
        print(
            f"\n{device}: batch {args.batch_size} x {args.prompt_tokens} prompt tokens, "
            f"{args.new_tokens} new tokens (greedy, KV cache), {first.threads} threads, "
            f"median of {args.repeats} interleaved repeats (slowest-fastest in brackets)\n"
        )
        print(costs_markdown(costs))
        report[device] = {name: cost.to_dict() for name, cost in costs.items()}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
