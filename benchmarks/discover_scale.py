"""Discover at growing matrix sizes: sklearn's FastICA on the full matrix, today's in-memory
GroupICA, and the out-of-core dask path, in one run.

Usage: python benchmarks/discover_scale.py [--sizes 4096x8192,8192x16384,16384x32768]
       [--components 64] [--memory 1GiB] [--threads 1] [--timeout 240] [--engines
       sklearn,memory,dask] [--work DIR] [--json FILE]

The default run takes about 9 minutes on 2 CPU cores and needs ~3 GiB of disk and ~7 GiB of
memory (the in-memory path at the largest size); larger sizes (e.g. 65536x45056) need
proportionally more for the in-memory engines: leave them out with --engines dask.

Each size is a synthetic planted-source matrix (tokens x neurons): ``--components``
heavy-tailed independent sources, each driving a sparse random network (2% of the neurons,
weights 2-3), plus unit Gaussian noise. It is written block by block (never whole in this
process) both as a float32 ``.npy`` (what ``collect.storage: memmap`` writes, read by
sklearn and GroupICA through a memmap, as the pipeline does) and as a float16 zarr activation
store (``collect.storage: zarr``, read by the dask path).

Every engine runs in its own subprocess, so peak memories do not mix: ``peak`` is the
child's peak RSS (``VmHWM``) less its RSS before it opened the data (imports excluded).
sklearn gets ``--timeout`` seconds; a run past it shows as ``>T``, and its ratio as a lower
bound (larger sizes then skip sklearn and show the same bound: they are slower still).
IoU: mean IoU of the thresholded networks (|z| >= 3.6) matched to the in-memory GroupICA's
by the Hungarian algorithm on |corr| of the maps; ``truth``: the same against the planted
networks. Targets (issue 13): dask >= 20x faster than sklearn's full FastICA at IoU
>= 0.8; dask's peak <= 1.5x ``--memory``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ENGINES = ("sklearn", "memory", "dask")
THRESHOLD = 3.6


def planted(
    path: Path, n_tokens: int, n_neurons: int, k: int, seed: int = 0, block: int = 2048
) -> None:
    """Write the planted-source matrix as ``matrix.npy`` (float32) and ``activations.zarr``
    (float16), and the true networks as ``truth.npy``."""
    from fbnprune.collect.store import StoreWriter

    rng = np.random.default_rng(seed)
    size = max(8, int(0.02 * n_neurons))
    mixing = np.zeros((k, n_neurons), dtype=np.float32)
    for c in range(k):
        members = rng.choice(n_neurons, size, replace=False)
        mixing[c, members] = rng.uniform(2.0, 3.0, size)
    np.save(path / "truth.npy", mixing > 0)
    matrix = np.lib.format.open_memmap(
        path / "matrix.npy", mode="w+", dtype=np.float32, shape=(n_tokens, n_neurons)
    )
    widths = [n_neurons // 4] * 3 + [n_neurons - 3 * (n_neurons // 4)]  # four "layers"
    with StoreWriter(
        path / "activations.zarr", n_tokens=n_tokens, layer_widths=widths, site="hidden"
    ) as store:
        for start in range(0, n_tokens, block):
            rows = min(block, n_tokens - start)
            sources = rng.laplace(size=(rows, k)).astype(np.float32) ** 3 / np.float32(720**0.5)
            values = sources @ mixing + rng.standard_normal((rows, n_neurons), dtype=np.float32)
            matrix[start : start + rows] = values
            store.append(values, start // block)
        store.commit()
    matrix.flush()
    del matrix


def child(engine: str, data: Path, k: int, memory: str, threads: int) -> None:
    """Fit one engine on the data in ``data``; print its figures as JSON."""
    import dask.array  # noqa: F401 (imported before the baseline, as the others are)
    import psutil
    import zarr  # noqa: F401

    from fbnprune.collect.store import ActivationStore
    from fbnprune.discover.dask_ica import DaskGroupICA
    from fbnprune.discover.group_ica import GroupICA, ica_maps  # noqa: F401 (imports before the baseline)

    if engine == "sklearn":
        from sklearn.decomposition import FastICA
    baseline = psutil.Process().memory_info().rss
    start = time.perf_counter()
    if engine == "sklearn":
        X = np.load(data / "matrix.npy", mmap_mode="r")
        ica = FastICA(
            n_components=k, whiten="unit-variance", max_iter=400, tol=1e-4, random_state=0
        ).fit(X)
        maps = ica.mixing_.T.astype(np.float64)
        z = (maps - maps.mean(axis=1, keepdims=True)) / maps.std(axis=1, keepdims=True)
        networks = np.abs(z) >= THRESHOLD
    elif engine == "memory":
        X = np.load(data / "matrix.npy", mmap_mode="r")
        fit = GroupICA(n_components=k, random_state=0).fit(X)
        maps, networks = fit.maps_, fit.networks_
    else:
        fit = DaskGroupICA(n_components=k, random_state=0, memory=memory, threads=threads).fit(
            ActivationStore(data / "activations.zarr")
        )
        maps, networks = fit.maps_, fit.networks_
    seconds = time.perf_counter() - start
    peak = peak_rss()
    np.savez(data / f"{engine}.npz", maps=maps, networks=networks)
    extra = {"cached": fit.cached_, "block_rows": fit.block_rows_} if engine == "dask" else {}
    print(json.dumps({"seconds": seconds, "peak": peak - baseline, "rss_peak": peak, **extra}))


def peak_rss() -> int:
    """This process's peak RSS in bytes: ``VmHWM`` (the high-water mark of its own memory map,
    new at exec). Not ``ru_maxrss``: Linux carries the parent's RSS at fork into the child's
    ``ru_maxrss``, so a parent holding the data it wrote would inflate every child's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # elsewhere: an upper bound


def run_child(engine: str, data: Path, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        engine,
        "--data",
        str(data),
        "--components",
        str(args.components),
        "--memory",
        args.memory,
        "--threads",
        str(args.threads),
    ]
    root = str(Path(__file__).resolve().parents[1])  # this checkout's fbnprune
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = {
        **os.environ,
        "PYTHONPATH": path,
        "OMP_NUM_THREADS": str(args.threads),
        "OPENBLAS_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
    }
    timeout = args.timeout if engine == "sklearn" else None
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"seconds": float("inf"), "timeout": timeout}
    if done.returncode != 0:
        return {"seconds": float("nan"), "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def matched_iou(
    reference: np.ndarray, ref_nets: np.ndarray, maps: np.ndarray, nets: np.ndarray
) -> float:
    from scipy.optimize import linear_sum_assignment

    k = len(reference)
    corr = np.nan_to_num(np.abs(np.corrcoef(reference, maps)[:k, k:]))
    rows, cols = linear_sum_assignment(-corr)
    return float(np.mean([iou(ref_nets[i], nets[j]) for i, j in zip(rows, cols, strict=True)]))


def truth_iou(nets: np.ndarray, truth: np.ndarray) -> float:
    from scipy.optimize import linear_sum_assignment

    scores = np.array([[iou(n, t) for t in truth] for n in nets])
    rows, cols = linear_sum_assignment(-scores)
    return float(scores[rows, cols].mean())


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def fmt_seconds(row: dict) -> str:
    if "timeout" in row:
        return f">{row['timeout']:.0f}"
    if "error" in row:
        return "error"
    return f"{row['seconds']:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", default="4096x8192,8192x16384,16384x32768", help="comma-separated TOKENSxNEURONS"
    )
    parser.add_argument("--components", type=int, default=64, help="sources = ICA components")
    parser.add_argument("--memory", default="1GiB", help="the dask path's budget")
    parser.add_argument("--threads", type=int, default=1, help="BLAS and dask threads")
    parser.add_argument(
        "--timeout",
        type=float,
        default=240,
        help="sklearn's limit, seconds; once past it, larger sizes skip it "
        "and show the same lower bound",
    )
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--work", type=Path, help="data folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.data, args.components, args.memory, args.threads)
        return

    from dask.utils import parse_bytes

    budget = parse_bytes(args.memory)
    engines = args.engines.split(",")
    work = args.work or Path(tempfile.mkdtemp(prefix="discover-scale-"))
    results = []
    sklearn_timed_out = False
    print(
        f"k={args.components} components, threads={args.threads}, dask budget {args.memory}, "
        f"sklearn timeout {args.timeout:.0f} s, data in {work}",
        flush=True,
    )
    try:
        for size in args.sizes.split(","):
            n_tokens, n_neurons = (int(n) for n in size.lower().split("x"))
            data = work / size
            shutil.rmtree(data, ignore_errors=True)
            data.mkdir(parents=True)
            start = time.perf_counter()
            planted(data, n_tokens, n_neurons, args.components)
            print(f"{size}: data written in {time.perf_counter() - start:.0f} s", flush=True)
            truth = np.load(data / "truth.npy")
            row = {
                "tokens": n_tokens,
                "neurons": n_neurons,
                "float32_bytes": n_tokens * n_neurons * 4,
            }
            for engine in engines:
                if engine == "sklearn" and sklearn_timed_out:  # larger is slower still
                    row[engine] = {
                        "seconds": float("inf"),
                        "timeout": args.timeout,
                        "skipped": True,
                    }
                    continue
                row[engine] = run_child(engine, data, args)
                sklearn_timed_out |= engine == "sklearn" and "timeout" in row[engine]
                print(f"  {engine}: {row[engine]}", flush=True)
            fits = {e: np.load(data / f"{e}.npz") for e in engines if (data / f"{e}.npz").exists()}
            reference = fits.get("memory")
            for engine, fit in fits.items():
                row[engine]["truth_iou"] = truth_iou(fit["networks"], truth)
                if reference is not None:
                    row[engine]["iou"] = matched_iou(
                        reference["maps"], reference["networks"], fit["maps"], fit["networks"]
                    )
            results.append(row)
            (data / "matrix.npy").unlink(missing_ok=True)
            shutil.rmtree(data / "activations.zarr", ignore_errors=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(results, engines, budget))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")


def table(results: list[dict], engines: list[str], budget: int) -> str:
    head = ["tokens x neurons", "f32 GiB"]
    for e in engines:
        head += [f"{e} s", f"{e} peak GiB", f"{e} IoU", f"{e} truth"]
    head += ["sklearn/dask", "memory/dask", "dask peak/budget"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results:
        cells = [f"{row['tokens']} x {row['neurons']}", f"{row['float32_bytes'] / 2**30:.2f}"]
        for e in engines:
            r = row[e]
            peak = r.get("peak")
            cells += [
                fmt_seconds(r),
                f"{peak / 2**30:.2f}" if peak is not None else "-",
                f"{r['iou']:.2f}" if "iou" in r else "-",
                f"{r['truth_iou']:.2f}" if "truth_iou" in r else "-",
            ]
        dask = row.get("dask", {}).get("seconds", float("nan"))
        for other in ("sklearn", "memory"):
            r = row.get(other, {})
            if "timeout" in r:
                cells.append(f">{r['timeout'] / dask:.2f}x")
            elif other in row and np.isfinite(r.get("seconds", np.nan)):
                cells.append(f"{r['seconds'] / dask:.2f}x")
            else:
                cells.append("-")
        peak = row.get("dask", {}).get("peak")
        cells.append(f"{peak / budget:.2f}" if peak is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
