"""Discover's scope: one group ICA over all layers vs one ICA per layer (``discover.scope``),
in memory and on dask, at growing matrix sizes.

Usage: python benchmarks/discover_scope.py [--sizes 4096x8192,8192x16384] [--components 64]
       [--memory 1GiB] [--threads 1] [--budget 0.1] [--work DIR] [--json FILE]

The data are ``discover_scale.py``'s: a planted-source matrix of four "layers" (each of the
``--components`` heavy-tailed sources drives 2% of all units, spread over the layers, plus
unit Gaussian noise), as a float32 ``.npy`` read through a memmap (the in-memory engines) and
a float16 zarr store (the dask engines). Each fit runs in its own subprocess; ``peak`` is its
peak RSS (``VmHWM``, a memmap's resident file pages included) less its RSS before it opened
the data. Engines: ``group`` (``GroupICA``), ``layer`` (``LayerICA`` over ``GroupICA``),
``group-dask`` (``DaskGroupICA``), ``layer-dask`` (``LayerICA`` over ``DaskGroupICA``);
every layer fit gets ``--components`` components.

Agreement of a layer fit with the group fit of the same engine: ``union IoU``, the IoU of
the units in at least one network (|z| >= 3.6, what select's threshold union reads);
``kept IoU``, the IoU of the units kept at ``--budget`` (top units by max |z|, global
allocation, as select ranks them). ``truth``: IoU of a fit's union with the planted units;
``kept planted``: the share of the units kept at ``--budget`` that are planted members.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from discover_scale import peak_rss, planted  # this folder is on sys.path when run as a script

ENGINES = ("group", "layer", "group-dask", "layer-dask")


def child(engine: str, data: Path, k: int, memory: str, threads: int) -> None:
    """Fit one engine on the data in ``data``; save its scores and union, print figures."""
    import dask.array  # noqa: F401 (imported before the baseline, as the others are)
    import psutil
    import zarr  # noqa: F401

    from fbnprune.collect.store import ActivationStore
    from fbnprune.discover.dask_ica import DaskGroupICA
    from fbnprune.discover.group_ica import GroupICA
    from fbnprune.discover.layer_ica import LayerICA

    store = ActivationStore(data / "activations.zarr")
    baseline = psutil.Process().memory_info().rss
    start = time.perf_counter()
    if engine.endswith("dask"):
        X: object = store
        ica: GroupICA = DaskGroupICA(n_components=k, random_state=0, memory=memory, threads=threads)
    else:
        X = np.load(data / "matrix.npy", mmap_mode="r")
        ica = GroupICA(n_components=k, random_state=0)
    fit = LayerICA(estimator=ica, layer_widths=store.layer_widths) if "layer" in engine else ica
    fit.fit(X)
    seconds = time.perf_counter() - start
    peak = peak_rss()
    np.savez(data / f"{engine}.npz", scores=fit.neuron_scores(), union=fit.union())
    print(json.dumps({"seconds": seconds, "peak": peak - baseline}))


def run_child(engine: str, data: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", engine, "--data", str(data)]
    cmd += ["--components", str(args.components), "--memory", args.memory]
    cmd += ["--threads", str(args.threads)]
    here = Path(__file__).resolve().parent
    path = [str(here.parent), str(here), os.environ.get("PYTHONPATH", "")]
    threads = str(args.threads)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in path if p),
        "OMP_NUM_THREADS": threads,
        "OPENBLAS_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
    }
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        return {"seconds": float("nan"), "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def kept(scores: np.ndarray, budget: float) -> np.ndarray:
    """The top ``budget`` share of units by score (ties broken by index, as select does)."""
    n = max(1, round(budget * len(scores)))
    keep = np.zeros(len(scores), dtype=bool)
    keep[np.argsort(-scores, kind="stable")[:n]] = True
    return keep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="4096x8192,8192x16384", help="TOKENSxNEURONS,...")
    parser.add_argument("--components", type=int, default=64, help="sources = components")
    parser.add_argument("--memory", default="1GiB", help="the dask engines' budget")
    parser.add_argument("--threads", type=int, default=1, help="BLAS and dask threads")
    parser.add_argument("--budget", type=float, default=0.1, help="share of units kept")
    parser.add_argument("--work", type=Path, help="data folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.data, args.components, args.memory, args.threads)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="discover-scope-"))
    print(f"k={args.components}, threads={args.threads}, dask budget {args.memory}, {work}")
    results = []
    try:
        for size in args.sizes.split(","):
            n_tokens, n_neurons = (int(n) for n in size.lower().split("x"))
            data = work / size
            shutil.rmtree(data, ignore_errors=True)
            data.mkdir(parents=True)
            planted(data, n_tokens, n_neurons, args.components)
            truth = np.load(data / "truth.npy").any(axis=0)
            row: dict = {"tokens": n_tokens, "neurons": n_neurons}
            for engine in ENGINES:
                row[engine] = run_child(engine, data, args)
                print(f"  {size} {engine}: {row[engine]}", flush=True)
            fits = {e: np.load(data / f"{e}.npz") for e in ENGINES if "error" not in row[e]}
            for engine, fit in fits.items():
                row[engine]["truth"] = iou(fit["union"], truth)
                row[engine]["kept_planted"] = float(truth[kept(fit["scores"], args.budget)].mean())
                group = fits.get(engine.replace("layer", "group"))
                if "layer" in engine and group is not None:
                    row[engine]["union_iou"] = iou(fit["union"], group["union"])
                    row[engine]["kept_iou"] = iou(
                        kept(fit["scores"], args.budget), kept(group["scores"], args.budget)
                    )
            results.append(row)
            shutil.rmtree(data, ignore_errors=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(results, args.budget))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")


def table(results: list[dict], budget: float) -> str:
    head = ["tokens x neurons", "engine", "group s", "layer s", "group peak GiB"]
    head += ["layer peak GiB", "union IoU", f"kept IoU @{budget:.0%}", "group truth"]
    head += ["layer truth", "group kept planted", "layer kept planted"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results:
        for engine in ("", "-dask"):
            g, lay = row[f"group{engine}"], row[f"layer{engine}"]
            cells = [f"{row['tokens']} x {row['neurons']}", "dask" if engine else "memory"]
            cells += [f"{g['seconds']:.1f}", f"{lay['seconds']:.1f}"]
            cells += [f"{r['peak'] / 2**30:.2f}" if "peak" in r else "-" for r in (g, lay)]
            for key, r in [
                ("union_iou", lay),
                ("kept_iou", lay),
                ("truth", g),
                ("truth", lay),
                ("kept_planted", g),
                ("kept_planted", lay),
            ]:
                cells.append(f"{r[key]:.2f}" if key in r else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
