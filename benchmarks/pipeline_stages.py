"""Benchmark the pipeline on a recipe: per-stage wall time and peak memory, and collection
throughput next to a plain forward pass measured in the same process.

Usage: python benchmarks/pipeline_stages.py recipes/demo.yaml [--out DIR] [--repeats 2]

Prints one table of stages (from a fresh run directory) and one of tokens/s:
plain forward of the whole model, forward of the decoder only (no LM head, what collect runs),
and collect into memory and into a memory-mapped file. Forward passes and collections are
interleaved and repeated so that machine noise hits all of them alike.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from fbnprune.adapters import get_adapter
from fbnprune.collect import collect_activations, iter_batches, pad_batch, tokenize
from fbnprune.pipeline import Pipeline, run_pipeline
from fbnprune.recipe import load_recipe
from fbnprune.rundir import RunDir


@torch.inference_mode()
def forward_tokens_per_second(model, forward, tokenizer, prompts, max_length, batch_size) -> float:
    ids = tokenize(tokenizer, prompts, max_length)
    pad_id = tokenizer.pad_token_id or 0
    batches = [pad_batch(ids, b, pad_id) for b in iter_batches([len(s) for s in ids], batch_size)]
    start = time.perf_counter()
    for input_ids, attention in batches:
        forward(input_ids=input_ids, attention_mask=attention, use_cache=False)
    return sum(int(a.sum()) for _, a in batches) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--out", type=Path, help="run directory (default: a temporary one)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    recipe = load_recipe(args.recipe)
    out = args.out or Path(tempfile.mkdtemp(prefix="fbnprune-bench-"))

    summary = run_pipeline(recipe, out, overwrite=True, progress=False)
    print(f"\nstages of {args.recipe} (fresh run directory {out}):")
    print(f"  {'stage':<24}{'wall s':>9}{'peak RSS MiB':>14}")
    total = 0.0
    for name, rec in summary.stages.items():
        total += rec.seconds
        print(f"  {name:<24}{rec.seconds:>9.1f}{rec.peak_rss_mib:>14.0f}")
    print(f"  {'total':<24}{total:>9.1f}")

    pipe = Pipeline(recipe, RunDir.open(out), progress=False)
    model, tokenizer = pipe.model, pipe.tokenizer
    task = recipe.tasks[0]
    prompts = pipe.tasks[task.name].prompts("calibration")
    batch_size = recipe.collect.batch_size
    backbone = get_adapter(model).get_backbone(model)
    rates: dict[str, list[float]] = {k: [] for k in
                                     ("forward (whole model)", "forward (decoder only)",
                                      "collect (memory)", "collect (memmap)")}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            rates["forward (whole model)"].append(
                forward_tokens_per_second(
                    model, model, tokenizer, prompts, task.max_length, batch_size
                )
            )
            rates["forward (decoder only)"].append(
                forward_tokens_per_second(
                    model, backbone, tokenizer, prompts, task.max_length, batch_size
                )
            )
            for storage in ("memory", "memmap"):
                acts = collect_activations(
                    model,
                    tokenizer,
                    prompts,
                    site=recipe.site,
                    max_length=task.max_length,
                    batch_size=batch_size,
                    progress=False,
                    out_file=Path(tmp) / "a.npy" if storage == "memmap" else None,
                )
                rates[f"collect ({storage})"].append(acts.tokens_per_second)
                del acts
    print(
        f"\nthroughput on {len(prompts)} samples of task {task.name!r}, batch {batch_size}, "
        f"{torch.get_num_threads()} threads (best of {args.repeats}):"
    )
    plain = max(rates["forward (whole model)"])
    for name, values in rates.items():
        print(f"  {name:<24}{max(values):>9.0f} tokens/s  {max(values) / plain:>5.2f}x")


if __name__ == "__main__":
    main()
