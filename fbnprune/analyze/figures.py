"""Figures of an analysis (PNG, drawn with matplotlib's ``Figure`` API: no pyplot, no GUI).

- ``maps-SITE-TASK.png``: the template networks as layers x neurons maps (the seed paper's
  Figure 2): one dot per member neuron, coloured by its z-score.
- ``layers-SITE.png``: per-layer share of neurons kept: the union of each task's templates,
  and for measured tasks the union at every k of the preservation curve.
- ``cross-task-iou-SITE.png``: IoU between the templates of all tasks.
- ``preservation-TASK.png``: the task metric, and its less noisy companion (gold answer
  log-probability or perplexity), against the share of neurons kept (Figure 3).
- ``lesions-TASK.png``: the metric change when each network, all of them, random sets or
  the highest-variance neurons are zeroed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter, PercentFormatter

from fbnprune.analyze.metric import secondary_key
from fbnprune.analyze.plans import split_layers

if TYPE_CHECKING:
    from fbnprune.analyze.analysis import Analysis

DPI = 110


def _save(fig: Figure, directory: Path, name: str) -> str:
    fig.savefig(directory / name, dpi=DPI, bbox_inches="tight")
    return name


def network_maps(templates: Any, widths: list[int], title: str) -> Figure:
    k = len(templates.members)
    cols = min(k, 5)
    rows = math.ceil(k / cols)
    fig = Figure(figsize=(3.2 * cols, 2.4 * rows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    member_z = np.abs(templates.z[templates.members])
    limit = float(np.percentile(member_z, 95)) if member_z.size else 1.0  # outliers saturate
    layer_of = np.repeat(np.arange(len(widths)), widths)
    unit_of = np.concatenate([np.arange(w) for w in widths])
    scatter = None
    for j, ax in enumerate(axes):
        if j >= k:
            ax.set_axis_off()
            continue
        member = templates.members[j]
        scatter = ax.scatter(
            unit_of[member],
            layer_of[member],
            c=templates.z[j][member],
            s=3,
            cmap="coolwarm",
            vmin=-limit,
            vmax=limit,
            linewidths=0,
        )
        ax.set_xlim(-0.5, max(widths) - 0.5)
        ax.set_ylim(len(widths) - 0.5, -0.5)
        ax.set_title(f"network {j} ({int(member.sum())} neurons)", fontsize=8)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=6)
        if j % cols == 0:
            ax.set_ylabel("layer", fontsize=7)
        if j >= k - cols:
            ax.set_xlabel("neuron", fontsize=7)
    if scatter is not None:
        fig.colorbar(scatter, ax=list(axes[:k]), shrink=0.6, label="z")
    fig.suptitle(title, fontsize=10)
    return fig


def layer_shares(result: Analysis, site: str) -> Figure:
    widths = result.layer_widths[site]
    measured = list(result.data["sites"][site]["preservation"])
    fig = Figure(figsize=(5 * (1 + len(measured)), 3.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, 1 + len(measured), squeeze=False)).ravel()
    layers = np.arange(len(widths))
    for task, nets in result.templates[site].items():
        share = [p.mean() for p in split_layers(nets.union(), widths)]
        axes[0].plot(layers, share, marker=".", label=task)
    axes[0].set_title(f"union of the templates ({site})", fontsize=9)
    for ax, task in zip(axes[1:], measured, strict=True):
        for row in result.data["sites"][site]["preservation"][task]["rows"]:
            ax.plot(layers, row["kept_per_layer"], marker=".", label=f"k={row['k']}")
        ax.set_title(f"{task}: union of networks per k ({site})", fontsize=9)
    for ax in axes:
        ax.set_xlabel("layer")
        ax.set_ylabel("share of neurons kept")
        ax.legend(fontsize=7)
    return fig


def iou_heatmap(cross: dict[str, Any], site: str) -> Figure:
    iou = np.asarray(cross["iou"])
    labels = cross["order"]
    tasks = list(dict.fromkeys(label.rsplit(":", 1)[0] for label in labels))
    size = max(4.0, 0.22 * len(labels) + 2)
    fig = Figure(figsize=(size + 1, size), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(iou, cmap="viridis", vmin=0, vmax=max(float(iou.max()), 1e-6))
    edges = [
        i
        for i in range(1, len(labels))
        if labels[i].rsplit(":", 1)[0] != labels[i - 1].rsplit(":", 1)[0]
    ]
    for e in edges:
        ax.axhline(e - 0.5, color="white", lw=1)
        ax.axvline(e - 0.5, color="white", lw=1)
    ticks = [
        np.mean([i for i, lab in enumerate(labels) if lab.rsplit(":", 1)[0] == t]) for t in tasks
    ]
    ax.set_xticks(ticks, tasks)
    ax.set_yticks(ticks, tasks)
    ax.set_title(f"IoU between templates ({site})", fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.8, label="IoU")
    return fig


def preservation_curve(data: dict[str, Any], task: str) -> Figure:
    """Two panels: the primary metric (the paper's) and the secondary one (gold answer
    log-probability or perplexity), which is less noisy on a few dozen documents."""
    metric = data["metrics"][task]
    keys = [metric["primary"], secondary_key(metric)]
    fig = Figure(figsize=(11, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    colors = {"hidden": "tab:blue", "output": "tab:red"}
    for ax, key in zip(axes, keys, strict=True):
        for site, site_data in data["sites"].items():
            rows = site_data["preservation"].get(task, {}).get("rows", [])
            if not rows:
                continue
            x = [max(r["kept_fraction"], 1e-6) for r in rows]
            for fill, style, marker in (("zero", "--", "x"), ("mean", "-", "o")):
                ax.plot(
                    x,
                    [r[fill][key] for r in rows],
                    style,
                    marker=marker,
                    color=colors.get(site),
                    label=f"{site}, {fill} fill",
                )
            for r, xi in zip(rows, x, strict=True):
                ax.annotate(
                    f"k={r['k']}",
                    (xi, r["mean"][key]),
                    fontsize=6,
                    textcoords="offset points",
                    xytext=(3, 3),
                )
        ax.axhline(metric["original"][key], color="black", lw=1, label="original")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(PercentFormatter(1.0))
        ax.xaxis.set_minor_formatter(NullFormatter())
        if key == "ppl":
            ax.set_yscale("log")
        ax.set_xlabel("share of neurons kept (union of networks)")
        ax.set_ylabel(key)
        ax.legend(fontsize=7)
    fig.suptitle(f"{task}: preservation curve", fontsize=10)
    return fig


def lesion_bars(data: dict[str, Any], task: str) -> Figure:
    key = data["metrics"][task]["primary"]
    sites = [s for s, d in data["sites"].items() if task in d["lesions"]]
    fig = Figure(figsize=(7, 2.8 * len(sites)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(sites), 1, squeeze=False)).ravel()
    for ax, site in zip(axes, sites, strict=True):
        les = data["sites"][site]["lesions"][task]
        base = les["original"][key]
        labels = [f"net {r['template']}" for r in les["networks"]] + [
            "all",
            "random frac.",
            "random same size",
        ]
        values = [r["delta"] for r in les["networks"]] + [
            les["all"]["delta"],
            les["random_fraction_summary"]["mean"] - base,
            les["random_same_size_summary"]["mean"] - base,
        ]
        errors = [0.0] * (len(values) - 2) + [
            les["random_fraction_summary"]["std"],
            les["random_same_size_summary"]["std"],
        ]
        colors = ["tab:blue"] * len(les["networks"]) + ["tab:red", "tab:gray", "tab:gray"]
        if "top_variance_same_size" in les:
            labels.append("top variance same size")
            values.append(les["top_variance_same_size"]["delta"])
            errors.append(0.0)
            colors.append("tab:orange")
        ax.bar(range(len(values)), values, yerr=errors, color=colors, capsize=3)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(values)), labels, rotation=45, fontsize=7, ha="right")
        ax.set_ylabel(f"change in {key}")
        ax.set_title(f"{task}: lesions ({site}); original {key} = {base:.3g}", fontsize=9)
    return fig


def write_figures(result: Analysis, directory: Path) -> list[dict[str, str]]:
    """Draw every figure into ``directory``; return ``[{file, caption}]`` for the report."""
    data, out = result.data, []
    for site, templates in result.templates.items():
        for task, nets in templates.items():
            name = _save(
                network_maps(
                    nets, result.layer_widths[site], f"{task}: template networks ({site} site)"
                ),
                directory,
                f"maps-{site}-{task}.png",
            )
            out.append(
                {
                    "file": name,
                    "kind": "maps",
                    "site": site,
                    "task": task,
                    "caption": f"Template networks of {task}, {site} site: layer x neuron "
                    "of every member, coloured by z.",
                }
            )
        out.append(
            {
                "file": _save(layer_shares(result, site), directory, f"layers-{site}.png"),
                "kind": "layers",
                "site": site,
                "task": "",
                "caption": f"Per-layer share of neurons kept, {site} site.",
            }
        )
        out.append(
            {
                "file": _save(
                    iou_heatmap(data["sites"][site]["cross_task"], site),
                    directory,
                    f"cross-task-iou-{site}.png",
                ),
                "kind": "cross_task",
                "site": site,
                "task": "",
                "caption": f"IoU between all tasks' templates, {site} site.",
            }
        )
    for task in data["metrics"]:
        out.append(
            {
                "file": _save(
                    preservation_curve(data, task), directory, f"preservation-{task}.png"
                ),
                "kind": "preservation",
                "site": "",
                "task": task,
                "caption": f"{task}: metric against neurons kept.",
            }
        )
        out.append(
            {
                "file": _save(lesion_bars(data, task), directory, f"lesions-{task}.png"),
                "kind": "lesions",
                "site": "",
                "task": task,
                "caption": f"{task}: change of the metric under lesions.",
            }
        )
    return out
