"""Benchmark the pipeline on a recipe: per-stage wall time and peak memory, and collection
throughput next to a plain forward pass measured in the same process.

Usage: python benchmarks/pipeline_stages.py RECIPE [--out DIR] [--repeats 4] [--samples 32]

Prints one table of stages (a fresh run directory, or the times recorded in --out when it
holds an earlier run) and one of tokens/s:
plain forward of the whole model, forward of the decoder only (no LM head, what collect runs),
and collect into memory and into a memory-mapped file. Forward passes and collections are
interleaved and repeated so that machine noise hits all of them alike.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fbnprune.collect.activations import collect_activations, token_batches
from fbnprune.models.adapters import get_adapter
from fbnprune.pipeline import run_pipeline
from fbnprune.recipe import load_recipe
from fbnprune.rundir import RunDir
from fbnprune.rundir.context import RunContext


@torch.inference_mode()
def forward_tokens_per_second(forward, tokenizer, prompts, max_length, batch_size) -> float:
    batches = token_batches(tokenizer, prompts, max_length, batch_size)
    start = time.perf_counter()
    for input_ids, attention in batches:
        forward(input_ids=input_ids, attention_mask=attention, use_cache=False)
    return sum(int(a.sum()) for _, a in batches) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--out", type=Path, help="run directory (default: a fresh temporary one)")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--samples", type=int, default=32, help="prompts per throughput pass")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    recipe = load_recipe(args.recipe)
    out = args.out or Path(tempfile.mkdtemp(prefix="fbnprune-bench-"))

    summary = run_pipeline(recipe, out, progress=False)
    print(f"\nstages of {args.recipe} (fresh run directory {out}):")
    print(f"  {'stage':<24}{'wall s':>9}{'peak RSS MiB':>14}")
    total = 0.0
    for name, rec in summary.stages.items():
        total += rec.seconds
        print(f"  {name:<24}{rec.seconds:>9.1f}{rec.peak_rss_mib:>14.0f}")
    print(f"  {'total':<24}{total:>9.1f}")

    ctx = RunContext(recipe, RunDir.open(out), progress=False)
    model, tokenizer = ctx.model, ctx.tokenizer
    task = recipe.tasks[0]
    prompts = ctx.tasks[task.name].prompts("calibration")[: args.samples]
    batch, length = recipe.collect.batch_size, task.max_length
    backbone = get_adapter(model).get_backbone(model)
    tmp = Path(tempfile.mkdtemp(prefix="fbnprune-bench-collect-"))

    def collect_rate(out_file: Path | None) -> float:
        acts = collect_activations(
            model,
            tokenizer,
            prompts,
            site=recipe.site,
            max_length=length,
            batch_size=batch,
            progress=False,
            out_file=out_file,
        )
        return acts.tokens_per_second

    methods = {
        "forward (whole model)": lambda: forward_tokens_per_second(
            model, tokenizer, prompts, length, batch
        ),
        "forward (decoder only)": lambda: forward_tokens_per_second(
            backbone, tokenizer, prompts, length, batch
        ),
        "collect (memory)": lambda: collect_rate(None),
        "collect (memmap)": lambda: collect_rate(tmp / "activations.npy"),
    }
    names = list(methods)
    rates: dict[str, list[float]] = {name: [] for name in names}
    methods[names[0]]()  # warm-up
    for repeat in range(args.repeats):  # rotate the order so drift hits every method alike
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            rates[name].append(methods[name]())
    shutil.rmtree(tmp)
    print(
        f"\nthroughput on {len(prompts)} samples of task {task.name!r}, batch {batch}, "
        f"{torch.get_num_threads()} threads (median of {args.repeats}, order rotated):"
    )
    plain = statistics.median(rates[names[0]])
    for name, values in rates.items():
        rate = statistics.median(values)
        runs = ", ".join(f"{v:.0f}" for v in values)
        print(f"  {name:<24}{rate:>9.0f} tokens/s  {rate / plain:>5.2f}x   (runs: {runs})")


if __name__ == "__main__":
    main()
