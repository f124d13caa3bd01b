"""Collect with the whole model in memory vs layer by layer from its safetensors files
(``collect.onload: full | sequential``): the same activations? At what time and memory?

Usage: python benchmarks/collect_onload.py [--model smollm2-135m] [--samples 64]
       [--max-length 256] [--batch-size 8] [--dtype float32] [--work DIR] [--json FILE]

Each mode runs in its own subprocess over the same BBC News articles (the demo's template,
first ``--samples`` articles, ``--max-length`` tokens), writing the float32 tokens x units
matrix to a ``.npy`` file (``collect.storage: memmap``); the two matrices are then compared:
the max |difference| and how many values differ at all. ``peak``: the child's peak RSS
(``VmHWM``); ``load``: seconds to get the model ready (full: ``load_model``; sequential:
the meta-device model with its embeddings); ``collect``: seconds of the collection itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODES = ("full", "sequential")


def peak_rss() -> int:
    """This process's peak RSS in bytes (``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def prompts(n: int) -> list[str]:
    from fbnprune.data.corpora import bbc_news

    return [f"Article: {' '.join(text.split()[:120])}\nTopic:" for _, text, _ in bbc_news()[:n]]


def child(args: argparse.Namespace) -> None:
    """One mode: collect into ``args.out``; print its figures as JSON."""
    import torch

    from fbnprune.collect.activations import collect_activations
    from fbnprune.models.loading import load_model, load_tokenizer
    from fbnprune.models.onload import LayerwiseModel, checkpoint_dir

    dtype = getattr(torch, args.dtype)
    texts = prompts(args.samples)
    start = time.perf_counter()
    if args.child == "full":
        model, tokenizer = load_model(args.model, dtype=dtype)
        source: object = model
    else:
        tokenizer = load_tokenizer(args.model)
        source = LayerwiseModel.from_checkpoint(checkpoint_dir(args.model), dtype=dtype)
    loaded = time.perf_counter()
    acts = collect_activations(
        source,
        tokenizer,
        texts,
        max_length=args.max_length,  # type: ignore[arg-type]
        batch_size=args.batch_size,
        out_file=Path(args.out),
        progress=False,
    )
    done = time.perf_counter()
    print(
        json.dumps(
            {
                "mode": args.child,
                "load": loaded - start,
                "collect": done - loaded,
                "peak": peak_rss(),
                "shape": list(acts.matrix.shape),
            }
        )
    )


def max_difference(a: np.ndarray, b: np.ndarray, rows: int = 1024) -> tuple[float, int]:
    """max |a - b| and the number of differing values, a block of rows at a time."""
    worst, differ = 0.0, 0
    for start in range(0, a.shape[0], rows):
        x, y = a[start : start + rows], b[start : start + rows]
        worst = max(worst, float(np.abs(x - y).max(initial=0.0)))
        differ += int(np.count_nonzero(x != y))
    return worst, differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--work", type=Path, default=None, help="folder for the matrices")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    work = Path(args.work or tempfile.mkdtemp(prefix="collect-onload-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = {}
    for mode in MODES:
        out = work / f"{mode}.npy"
        cmd = [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--out",
            str(out),
            "--model",
            args.model,
            "--samples",
            str(args.samples),
            "--max-length",
            str(args.max_length),
            "--batch-size",
            str(args.batch_size),
            "--dtype",
            args.dtype,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ, check=True)
        rows[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    a = np.load(work / "full.npy", mmap_mode="r")
    b = np.load(work / "sequential.npy", mmap_mode="r")
    worst, differ = max_difference(a, b)
    result = {
        "model": args.model,
        "dtype": args.dtype,
        "tokens x units": list(a.shape),
        "max_abs_difference": worst,
        "values_differing": differ,
        "modes": rows,
    }
    for mode, row in rows.items():
        print(
            f"{mode:>10}: load {row['load']:6.1f} s  collect {row['collect']:6.1f} s  "
            f"peak {row['peak'] / 2**30:5.2f} GiB"
        )
    print(
        f"matrix {a.shape[0]} x {a.shape[1]}: max |full - sequential| = {worst:g} "
        f"({differ} of {a.size} values differ)"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
