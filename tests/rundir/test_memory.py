"""The memory report: each stage's peak against what the run's files say it must hold."""

from __future__ import annotations

import json

from conftest import tiny_recipe

from fbnprune.pipeline import run_pipeline
from fbnprune.recipe import parse_recipe
from fbnprune.rundir.memory import memory_report, memory_table

MiB = 2**20


def test_run_json_records_each_stage_against_what_it_holds(tiny_llama_dir, tmp_path):
    run = tmp_path / "run"
    run_pipeline(parse_recipe(tiny_recipe(tiny_llama_dir)), run, until="save", progress=False)
    recorded = json.loads((run / "run.json").read_text())["memory"]
    assert recorded == memory_report(run)
    model = json.loads((run / "prune.json").read_text())["sizes"]["original"]["bytes"] / MiB
    meta = json.loads((run / "collect" / "news" / "meta.json").read_text())
    matrix = meta["n_tokens"] * sum(meta["layer_widths"]) * 4 / MiB
    assert recorded["check"]["parts_mib"] == {"model": model}
    assert recorded["collect:news"]["holds_mib"] == model + matrix
    assert recorded["discover:news"]["parts_mib"] == {"matrix": matrix}
    for row in recorded.values():
        assert row["peak_mib"] > 0 and row["ratio"] == row["peak_mib"] / row["holds_mib"]
    table = memory_table(recorded)
    assert "| check |" in table and "x |" in table


def test_what_a_run_lacks_is_not_made_up(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(
        json.dumps({"stages": {"check": {"peak_rss_mib": 100.0}, "other": {"peak_rss_mib": 5}}})
    )
    report = memory_report(run)
    assert report["check"] == {
        "peak_mib": 100.0,
        "holds_mib": None,
        "parts_mib": {"model": None},
        "ratio": None,
    }
    assert report["other"]["holds_mib"] is None and "n/a" in memory_table(report)
