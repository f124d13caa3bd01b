"""Collect with and without packing (``collect.packing``) on short samples: time, tokens/s,
positions computed, and how far the two matrices are apart.

Usage: python benchmarks/collect_packing.py [--model smollm2-135m] [--samples 64]
       [--max-words 20] [--max-length 256] [--batch-size 8] [--onload full|sequential]
       [--json FILE]

The BBC News articles of the demo's template, each cut to ``--max-words`` words (short
samples), collected by the same loaded model twice, unpacked then packed, into memory
(float32, ``site: hidden``). ``positions``: input positions the forward passes computed
(rows x width, summed over batches), of which ``tokens`` are real; ``collect``: seconds of the
collection itself. The matrices are compared row for row: max |difference|, the same scaled
by max(|value|, 1) (relative where values exceed 1), values that differ at all, and whether
their rows come from the same samples in the same order. For scale, with ``--batch-size``
above 1 the unpacked collection is also run one sample per pass: the same samples in other
batch shapes, so its difference is float32 rounding alone.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fbnprune.collect.activations import Activations


def prompts(n: int, words: int) -> list[str]:
    from fbnprune.data.corpora import bbc_news

    return [f"Article: {' '.join(text.split()[:words])}\nTopic:" for _, text, _ in bbc_news()[:n]]


def main() -> None:
    import torch

    from fbnprune.collect.activations import collect_activations, model_batches, model_of, tokenize
    from fbnprune.models.loading import load_model, load_tokenizer
    from fbnprune.models.onload import LayerwiseModel, checkpoint_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--max-words", type=int, default=20)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--onload", choices=("full", "sequential"), default="full")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    texts = prompts(args.samples, args.max_words)
    if args.onload == "full":
        model, tokenizer = load_model(args.model, dtype=torch.float32)
        source: object = model
    else:
        tokenizer = load_tokenizer(args.model)
        source = LayerwiseModel.from_checkpoint(checkpoint_dir(args.model), dtype=torch.float32)
    ids = tokenize(tokenizer, texts, args.max_length)
    modes = [("unpacked", args.batch_size, False), ("packed", args.batch_size, True)]
    if args.batch_size > 1:  # float32 rounding alone: the same samples in other batch shapes
        modes.append(("unpacked, batch size 1", 1, False))
    rows, results = {}, {}
    for name, batch_size, packing in modes:
        pack_to = args.max_length if packing else None
        batches = model_batches(model_of(source), tokenizer, ids, batch_size, pack_to)  # type: ignore[arg-type]
        start = time.perf_counter()
        acts = collect_activations(
            source,  # type: ignore[arg-type]
            tokenizer,
            texts,
            max_length=args.max_length,
            batch_size=batch_size,
            packing=packing,
            progress=False,
        )
        elapsed = time.perf_counter() - start
        results[name] = acts
        rows[name] = {
            "collect_s": elapsed,
            "tokens_per_s": acts.n_tokens / elapsed,
            "forward_passes": len(batches),
            "positions": sum(b.inputs["input_ids"].numel() for b in batches),
            "tokens": acts.n_tokens,
        }
        print(
            f"{name:>22}: {len(batches):3d} passes, {rows[name]['positions']:6d} positions for "
            f"{acts.n_tokens} tokens, collect {elapsed:6.1f} s "
            f"({acts.n_tokens / elapsed:6.0f} tokens/s)"
        )
    base = results["unpacked"]
    summary = {
        "model": args.model,
        "onload": args.onload,
        "samples": args.samples,
        "max_words": args.max_words,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "tokens x units": list(base.matrix.shape),
        "max_abs_value": float(np.abs(base.matrix).max()),
        "modes": rows,
        "against_unpacked": {n: difference(base, results[n]) for n in results if n != "unpacked"},
    }
    for name, diff in summary["against_unpacked"].items():
        print(
            f"{name:>22} vs unpacked: max |difference| {diff['max_abs']:.3g}, scaled "
            f"{diff['max_scaled']:.3g} (values up to {summary['max_abs_value']:.3g}); "
            f"{diff['differing']} of {base.matrix.size} values differ; same rows in the same "
            f"order: {diff['same_rows_same_order']}"
        )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")


def difference(a: Activations, b: Activations) -> dict[str, float | int | bool]:
    """How far ``b``'s matrix is from ``a``'s: max |difference|, the same scaled by
    max(|value|, 1), values that differ at all, and whether the rows' samples agree."""
    x, y = a.matrix, b.matrix
    return {
        "max_abs": float(np.abs(x - y).max()),
        "max_scaled": float((np.abs(x - y) / np.maximum(np.abs(x), 1.0)).max()),
        "differing": int(np.count_nonzero(x != y)),
        "same_rows_same_order": bool(np.array_equal(a.sample_index, b.sample_index)),
    }


if __name__ == "__main__":
    main()
