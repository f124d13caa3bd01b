"""Benchmark what a run's pruned model costs against the original, measured in one process.

Usage: python benchmarks/prune_speed.py RUN_DIR [--model NAME] [--repeats 5] [--threads N]
       [--prompt-tokens 128] [--new-tokens 32] [--batch-size 1] [--device cpu] [--json FILE]
       [--components]

Loads the original model (the plan's ``model``, or --model), slices two copies with the run
directory's ``plan.json`` (padded and compact layouts) and prints, per device, a table of
parameters, safetensors bytes, peak extra memory of a generate run, and prefill and decode
tokens/s with ratios against the original. The three models are measured interleaved, order
rotated each round, and the figures are medians of the repeats. Devices: CPU, plus CUDA when
one is present, unless --device is given. ``--components`` adds, on the CPU, each model's
share of the prefill and decode time per part (embedding, attention, MLP, LM head, other;
``fbnprune.cost.component_seconds``, the median over the repeats), and the parameters per
component.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
from pathlib import Path

import torch

from fbnprune.cost import TIMED_PARTS, component_seconds, costs_markdown, measure_costs, prompt_ids
from fbnprune.models.loading import load_model
from fbnprune.models.size import component_sizes
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
    parser.add_argument(
        "--components", action="store_true", help="time and parameters per component (CPU)"
    )
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
    if args.components:
        report["components"] = component_report(models, args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


def component_report(models: dict, args: argparse.Namespace) -> dict:
    """Print and return, per model, the parameters per component and the share of the
    prefill and decode time per part (medians over ``args.repeats`` greedy runs)."""
    vocab = min(m.get_input_embeddings().num_embeddings for m in models.values())
    ids = prompt_ids(vocab, prompt_tokens=args.prompt_tokens, batch_size=args.batch_size)
    parts = [*TIMED_PARTS, "other"]
    report = {}
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"\nwhere the time goes (cpu, {torch.get_num_threads()} threads, median of "
        f"{args.repeats}): share of prefill / decode time per part, and M parameters\n"
    )
    print("| model | " + " | ".join(parts) + " | prefill ms | decode ms/token |")
    print("|---" * (len(parts) + 3) + "|")
    for name, model in models.items():
        model.cpu()
        component_seconds(model, ids, args.new_tokens)  # warm-up
        runs = [component_seconds(model, ids, args.new_tokens) for _ in range(args.repeats)]
        median = {
            phase: {p: statistics.median(r[phase][p] for r in runs) for p in [*parts, "total"]}
            for phase in ("prefill", "decode")
        }
        sizes = component_sizes(model)
        params = {
            "embedding": sizes["embedding"].parameters,
            "lm_head": sizes["lm_head"].parameters if "lm_head" in sizes else 0,
            "attention": sizes["attention"].parameters,
            "mlp": sizes["mlp"].parameters,
            "other": sizes["norms and other"].parameters,
        }
        tied = "lm_head" not in sizes
        cells = [
            f"{median['prefill'][p] / median['prefill']['total']:.0%} / "
            f"{median['decode'][p] / median['decode']['total']:.0%} "
            + ("(tied)" if p == "lm_head" and tied else f"({params[p] / 1e6:.1f} M)")
            for p in parts
        ]
        prefill_ms = 1e3 * median["prefill"]["total"]
        decode_ms = 1e3 * median["decode"]["total"] / (args.new_tokens - 1)
        print(f"| {name} | " + " | ".join(cells) + f" | {prefill_ms:.1f} | {decode_ms:.2f} |")
        report[name] = {"seconds": median, "parameters": params}
    return report


if __name__ == "__main__":
    main()
