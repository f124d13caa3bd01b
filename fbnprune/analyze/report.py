"""``report.md``: the analysis as tables and figures, from ``analysis.json`` alone (so a
report can be rebuilt from the numbers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fbnprune.analyze.metric import secondary_key
from fbnprune.io import atomic_write_text


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}g}" if abs(value) >= 1000 else f"{value:.{digits}f}"


def _samples_caption(data: dict[str, Any], task: str, parts: tuple[str, ...]) -> str:
    fps = data["samples"][task]["fingerprints"]
    sizes = {p: len(data["samples"][task][p]) for p in parts}
    sets = ", ".join(f"{p} {sizes[p]} ids #{fps[p]}" for p in parts)
    return f"{task}: {sets}"


def _seeds(data: dict[str, Any]) -> str:
    s = data["seeds"]
    return (
        f"seeds: draw and ICA {s['draw_and_ica']}, random controls "
        f"{', '.join(map(str, s['random_controls']))}"
    )


def _setup(data: dict[str, Any]) -> list[str]:
    cfg, disc = data["config"], data["discover"]
    rows = []
    for task, ids in data["samples"].items():
        metric = data["metrics"].get(task)
        rows.append(
            [
                task,
                len(ids["template"]),
                len(ids["individual"]),
                len(ids["eval"]) or "-",
                f"{metric['kind']} ({metric['primary']})" if metric else "-",
            ]
        )
    return [
        f"# Functional-network analysis: {data['recipe']} ({data['model']})",
        "",
        f"Model `{data['model']}` ({data['model_type']}); sites: "
        f"{', '.join(data['sites'])}. Templates: group ICA with {cfg['n_templates']} "
        f"components over each task's template samples; individual networks: ICA with "
        f"{cfg['n_templates']} components on each other sample; a neuron belongs to a "
        f"network where |z| >= {disc['threshold']}; an individual network matches a template "
        f"when IoU > {cfg['iou_threshold']}. FastICA max_iter {disc['max_iter']}, tol "
        f"{disc['tol']}. {_seeds(data)}. Every sample id is in `analysis.json` "
        "(`samples`, and again in each table); `#` below is a hash of an id list.",
        "",
        _table(["task", "template samples", "individual samples", "eval docs", "metric"], rows),
        "",
    ]


def _units(data: dict[str, Any]) -> list[str]:
    cfg = data["config"]
    rows = []
    for site, sd in data["sites"].items():
        for task, u in sd["units"].items():
            ind = sd["recurrence"]["individual"][task]
            rows.append(
                [
                    site,
                    task,
                    u["samples"],
                    u["min_tokens"],
                    u["units"],
                    f"{u['merged_units']} ({u['samples_in_merged_units']} samples)",
                    u["reduced_units"],
                    u["skipped_samples"],
                    ind["not_converged"],
                ]
            )
    return [
        "## Individual ICA on short samples",
        "",
        f"A sample needs {cfg['min_tokens_per_component']} tokens per component "
        f"({cfg['min_tokens_per_component']} x {cfg['n_templates']} tokens) for its own ICA; "
        f"policy `{cfg['short_samples']}`: shorter samples are "
        + {
            "merge": "merged with the next short samples into one unit (a short remainder "
            "is skipped)",
            "reduce": "decomposed with floor(tokens / per-component) components (skipped below 2)",
            "skip": "left out",
        }[cfg["short_samples"]]
        + ". Counts below are per unit; FastICA fits that hit max_iter are counted, not "
        "dropped.",
        "",
        _table(
            [
                "site",
                "task",
                "samples",
                "min tokens",
                "units",
                "merged units",
                "reduced units",
                "skipped samples",
                "fits not converged",
            ],
            rows,
        ),
        "",
    ]


def _recurrence(data: dict[str, Any], site: str, figures: dict[tuple, str]) -> list[str]:
    rec = data["sites"][site]["recurrence"]
    tasks = list(rec["counts"])
    header = ["template", "size"] + [
        f"{u} ({rec['individual'][u]['units']} units, {rec['individual'][u]['networks']} nets)"
        for u in tasks
    ]
    rows = []
    for t in tasks:
        for j, size in enumerate(rec["templates"][t]["sizes"]):
            cells = []
            for u in tasks:
                c = rec["counts"][t][u]
                cells.append(
                    f"{c['networks'][j]} ({c['units'][j]}) [{c['networks_without_core'][j]}]"
                )
            rows.append([f"{t}:{j}", size, *cells])
    chance = max((c for t in tasks for u in tasks for c in rec["chance_iou"][t][u]), default=0)
    caps = "; ".join(_samples_caption(data, t, ("template", "individual")) for t in tasks)
    summary = [
        [
            t,
            sum(rec["templates"][t]["sizes"]),
            rec["templates"][t]["union"],
            rec["templates"][t]["core"],
            f"{rec['templates'][t]['mean_pairwise_iou']:.3f}",
            rec["individual"][t]["median_size"],
        ]
        for t in tasks
    ]
    out = [
        f"### {site} site",
        "",
        "Templates per task: their summed sizes, their union, the *core* (neurons in at least "
        "half of a task's templates) and the mean IoU between two templates of the task; "
        "median size of an individual network.",
        "",
        _table(
            [
                "task",
                "sum of sizes",
                "union",
                "core",
                "mean pairwise IoU",
                "individual median size",
            ],
            summary,
        ),
        "",
        f"Individual networks with IoU > {rec['threshold']} per template; in round brackets "
        "the sample units holding at least one, in square brackets the networks that still "
        "match once the template task's core is removed from both sets (a shared core makes "
        "every template match every network). Diagonal blocks are a task against its own "
        "samples; off-diagonal, the cross-task recurrence. Two random sets of these sizes "
        f"would have IoU <= {chance:.3g}. Samples: {caps}. {_seeds(data)}.",
        "",
        _table(header, rows),
        "",
    ]
    shared = data["sites"][site]["cross_task"]["shared"]
    k = data["config"]["n_templates"]
    out += [
        f"Shared templates ({site}): templates of the row task with a match (IoU > "
        f"{rec['threshold']}) among the column task's templates, of {k}; in brackets the "
        "mean best IoU (on the diagonal: the best other template of the same task).",
        "",
        _table(
            ["templates of", *tasks],
            [
                [
                    t,
                    *(
                        f"{shared[t][u]['matched']} ({shared[t][u]['mean_best_iou']:.3f})"
                        for u in tasks
                    ),
                ]
                for t in tasks
            ],
        ),
        "",
    ]
    for key in [("cross_task", site, "")] + [("maps", site, t) for t in tasks]:
        if key in figures:
            out += [f"![{key[0]} {site} {key[2]}]({figures[key]})", ""]
    return out


def _lesions(data: dict[str, Any], task: str, site: str) -> list[str]:
    les = data["sites"][site]["lesions"][task]
    metric = data["metrics"][task]
    key, sec = metric["primary"], secondary_key(metric)
    base = les["original"]
    rows = [
        [
            f"network {r['template']}",
            r["size"],
            f"{100 * r['fraction']:.2f}%",
            _num(r["scores"][key]),
            f"{r['delta']:+.3f}",
            _num(r["scores"][sec]),
        ]
        for r in les["networks"]
    ]
    table5 = [
        ["none (original)", 0, "0%", _num(base[key]), "", _num(base[sec])],
        [
            "all templates",
            les["all"]["size"],
            f"{100 * les['all']['fraction']:.2f}%",
            _num(les["all"]["scores"][key]),
            f"{les['all']['delta']:+.3f}",
            _num(les["all"]["scores"][sec]),
        ],
    ]
    for kind, label in (
        ("random_fraction", f"random, {100 * data['config']['random_fraction']:.0f}% of neurons"),
        ("random_same_size", "random, same size as all templates"),
    ):
        runs, summary = les[kind], les[f"{kind}_summary"]
        secs = [r["scores"][sec] for r in runs]
        table5.append(
            [
                label,
                summary["size"],
                f"{100 * summary['fraction']:.2f}%",
                f"{_num(summary['mean'])} ± {_num(summary['std'])}",
                f"{summary['mean'] - base[key]:+.3f}",
                _num(sum(secs) / len(secs)),
            ]
        )
    loud = les.get("top_variance_same_size")
    loud_note = ""
    if loud is not None:
        table5.append(
            [
                "highest-variance neurons, same size",
                loud["size"],
                f"{100 * loud['fraction']:.2f}%",
                _num(loud["scores"][key]),
                f"{loud['delta']:+.3f}",
                _num(loud["scores"][sec]),
            ]
        )
        loud_note = (
            " Last row: the neurons whose activations vary most over the template tokens; "
            f"{100 * les['union_in_top_variance']:.0f}% of the templates' union is among them."
        )
    note = f"acc stderr of the original: {base['acc_stderr']:.3f}. " if key == "acc" else ""
    caption = (
        f"{_samples_caption(data, task, ('template', 'eval'))}; seeds: ICA "
        f"{les['seeds']['ica']}, random controls "
        f"{', '.join(map(str, les['seeds']['random_controls']))}."
    )
    header = ["lesion (zeroed)", "neurons", "share", key, f"Δ {key}", sec]
    return [
        f"### {task}, {site} site",
        "",
        f"Each template network zeroed alone (Table 4). {note}{caption}",
        "",
        _table(header, rows),
        "",
        "All templates together against random sets (Table 5; random rows: mean ± std "
        f"over {len(les['seeds']['random_controls'])} seeds, {sec} averaged).{loud_note}",
        "",
        _table(header, table5),
        "",
    ]


def _preservation(data: dict[str, Any], task: str, site: str) -> list[str]:
    pres = data["sites"][site]["preservation"][task]
    metric = data["metrics"][task]
    key, sec = metric["primary"], secondary_key(metric)
    rows = [
        [
            r["k"],
            r["kept"],
            f"{100 * r['kept_fraction']:.2f}%",
            _num(r["zero"][key]),
            _num(r["mean"][key]),
            _num(r["zero"][sec]),
            _num(r["mean"][sec]),
            "yes" if r["converged"] else "no",
        ]
        for r in pres["rows"]
    ]
    skipped = (
        f" n_components {pres['skipped_components']} were left out: the "
        f"{pres['n_template_tokens']} template tokens (or the neurons) are too few."
        if pres["skipped_components"]
        else ""
    )
    return [
        f"### {task}, {site} site",
        "",
        f"Only the union of the networks found with k components is kept (Tables 8-10); "
        f"dropped neurons are zeroed or set to their mean over the template tokens. Original "
        f"{key}: {_num(metric['original'][key])}, {sec}: {_num(metric['original'][sec])}. "
        f"{_samples_caption(data, task, ('template', 'eval'))}; ICA seed "
        f"{pres['seeds']['ica']}.{skipped}",
        "",
        _table(
            [
                "k",
                "kept",
                "share",
                f"{key} (zero fill)",
                f"{key} (mean fill)",
                f"{sec} (zero fill)",
                f"{sec} (mean fill)",
                "ICA converged",
            ],
            rows,
        ),
        "",
    ]


def build_report(data: dict[str, Any]) -> str:
    figures = {(f["kind"], f["site"], f["task"]): f["file"] for f in data.get("figures", [])}
    sites = list(data["sites"])
    out = _setup(data) + _units(data)
    out += ["## 1. Templates and recurrence", ""]
    for site in sites:
        out += _recurrence(data, site, figures)
    if data["metrics"]:
        out += ["## 2. Lesions", ""]
        for task, metric in data["metrics"].items():
            direction = "higher" if metric["higher_is_better"] else "lower"
            out += [
                f"Metric for {task}: {metric['kind']}, `{metric['primary']}` ({direction} "
                f"is better) on {metric['original']['n_docs']} held-out documents.",
                "",
            ]
            for site in sites:
                out += _lesions(data, task, site)
            if ("lesions", "", task) in figures:
                out += [f"![lesions {task}]({figures[('lesions', '', task)]})", ""]
        out += ["## 3. Preservation curve", ""]
        for task in data["metrics"]:
            for site in sites:
                out += _preservation(data, task, site)
            if ("preservation", "", task) in figures:
                out += [f"![preservation {task}]({figures[('preservation', '', task)]})", ""]
    out += ["## Per-layer share of kept neurons", ""]
    out += [
        f"![layers {s}]({figures[('layers', s, '')]})"
        for s in sites
        if ("layers", s, "") in figures
    ] + [""]
    timings = data.get("timings", {})
    out += [
        "## Timings",
        "",
        _table(["phase", "seconds"], [[k, f"{v:.1f}"] for k, v in timings.items()]),
        "",
    ]
    v = data["versions"]
    out += [
        f"fbnprune {v['fbnprune']}, torch {v['torch']}, transformers {v['transformers']}, "
        f"scikit-learn {v['scikit-learn']}; {data['created']}.",
        "",
    ]
    return "\n".join(out)


def write_report(data: dict[str, Any], path: Path) -> None:
    atomic_write_text(path, build_report(data))
