"""The whole-model cuts through the pipeline. ``prune.vocabulary: task``: the plan records
the kept tokens, the check proves the cut (logits at kept ids, tokenization), and the saved
and healed checkpoints, with their trimmed tokenizers, load with stock classes.
``select.drop_layers`` and ``select.attention_heads``: the blocks of least skip KL go, the
heads that write least go, masked == sliced, stock reload."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import BBC_CHOICES, NEWS_TASK, tiny_bpe_model, tiny_bpe_tokenizer, tiny_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer

from fbnprune.pipeline import run_pipeline
from fbnprune.plan import PrunePlan
from fbnprune.publish.folder import export_run
from fbnprune.recipe import RecipeError, parse_recipe

TASK = {
    **NEWS_TASK,
    "template": "Article: {text}\nTopic:",
    "max_words": 12,
    "choices": BBC_CHOICES,
    "wordings": [
        {
            "name": "alt",
            "template": "Story: {text}\nSection:",
            "choices": {k: v.upper() for k, v in BBC_CHOICES.items()},
        }
    ],
    "calibration_samples": 8,
    "max_length": 96,
}


@pytest.fixture(scope="module")
def bpe_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("models") / "tiny-bpe-llama"
    tokenizer = tiny_bpe_tokenizer("byte_level")
    tiny_bpe_model("llama", len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_a_task_vocabulary_is_cut_checked_healed_and_loadable(bpe_model_dir, tmp_path) -> None:
    heal = {"enabled": True, "steps": 4, "batch_size": 4, "max_length": 64, "eval_every": 2}
    recipe = parse_recipe(
        tiny_recipe(
            bpe_model_dir,
            tasks=[TASK],
            select={"selector": "magnitude"},
            prune={"vocabulary": "task"},
            heal=heal,
        )
    )
    run = tmp_path / "run"
    summary = run_pipeline(recipe, run, progress=False)
    plan = PrunePlan.load(run / "plan.json")
    vocab = plan.kept_vocabulary()
    assert vocab is not None and 256 < vocab.size < 512
    assert plan.provenance["vocabulary"]["kept"] == vocab.size
    original = AutoTokenizer.from_pretrained(bpe_model_dir)
    for answer in list(BBC_CHOICES.values()) + [v.upper() for v in BBC_CHOICES.values()]:
        ids = original(answer, add_special_tokens=False)["input_ids"]
        assert set(ids) <= set(vocab.kept)  # every wording's answers stay

    parity = json.loads((run / "parity.json").read_text())
    assert parity["passed"]
    assert parity["reports"][0]["comparisons"][0]["max_abs"] == 0.0  # float64, kept ids
    calibration = parity["tokenization"]["calibration"]
    assert calibration["identical"] == calibration["texts"] == 8
    assert parity["tokenization"]["heldout"]["round_trip"] == 4
    prune = json.loads((run / "prune.json").read_text())
    assert prune["vocabulary"] == {"original": 512, "kept": vocab.size}

    for name in ("checkpoint-padded", "checkpoint-compact", "checkpoint-compact-healed"):
        folder = summary.checkpoints[name.removeprefix("checkpoint-")]
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code="compact" in name)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert model.config.vocab_size == len(tokenizer) == vocab.size
        ids = tokenizer("Article: markets rose\nTopic:", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            assert model(input_ids=ids).logits.shape[-1] == vocab.size
    heal_parity = json.loads((run / "heal" / "parity.json").read_text())
    assert heal_parity["passed"]
    assert summary.verdict is not None  # scored with the checkpoints' own tokenizers
    assert list(summary.verdict["models"]) == ["original", "unhealed", "healed"]


def test_whole_model_cuts_need_the_model_in_memory() -> None:
    data = tiny_recipe(prune={"vocabulary": "task"}, save={"onload": "sequential"})
    with pytest.raises(RecipeError, match="save.onload: full"):
        parse_recipe(data)
    data = tiny_recipe(select={"drop_layers": 1}, save={"onload": "sequential"})
    with pytest.raises(RecipeError, match="cut decoder blocks"):
        parse_recipe(data)
    data = tiny_recipe(select={"attention_heads": 2}, save={"onload": "sequential"})
    with pytest.raises(RecipeError, match="cut decoder blocks"):
        parse_recipe(data)


def test_every_cut_together(bpe_model_dir, tmp_path) -> None:
    select = {"selector": "magnitude", "drop_layers": 1, "attention_heads": 2}
    recipe = parse_recipe(
        tiny_recipe(
            bpe_model_dir,
            tasks=[TASK],
            select={**select, "sensitivity_samples": 4},
            prune={"vocabulary": "task"},
        )
    )
    run = tmp_path / "run"
    summary = run_pipeline(recipe, run, progress=False, until="save")
    plan = PrunePlan.load(run / "plan.json")
    vocab_kept = plan.provenance["vocabulary"]["kept"]
    record = plan.provenance["layers"]
    assert len(record["skip_kl"]) == 3 and record["dropped"] == plan.dropped_layers
    assert plan.dropped_layers == [min(range(3), key=record["skip_kl"].__getitem__)]
    parity = json.loads((run / "parity.json").read_text())
    assert parity["passed"] and parity["reports"][0]["comparisons"][0]["max_abs"] < 1e-9
    prune = json.loads((run / "prune.json").read_text())
    assert prune["layers"] == {"original": 3, "kept": 2, "dropped": plan.dropped_layers}
    original = prune["sizes"]["original"]["components"]
    padded = prune["sizes"]["padded"]["components"]
    # 2 of 3 blocks, each with half its heads (2 of 4 query heads, 1 of 2 groups)
    assert padded["attention"]["parameters"] * 3 == original["attention"]["parameters"]
    assert prune["heads"] == {"query": 2, "groups": 1}
    assert len(plan.provenance["heads"]["scores"]) == 3
    assert padded["embedding"]["parameters"] < original["embedding"]["parameters"]
    for layout in ("padded", "compact"):
        model = AutoModelForCausalLM.from_pretrained(
            summary.checkpoints[layout], trust_remote_code=layout == "compact"
        )
        assert model.config.num_hidden_layers == 2
        assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 1)
    exported = export_run(run, tmp_path / "export", layout="padded")
    card = (exported.out_dir / "README.md").read_text()
    assert f"{vocab_kept:,} of 512 tokens" in card
    assert f"Decoder blocks: 2 of 3 (blocks {plan.dropped_layers[0]} dropped" in card
    assert "| attention |" in card and "| embedding |" in card
    assert "Attention: 2 query heads and 1 key-value groups per layer" in card
    tokenizer = AutoTokenizer.from_pretrained(exported.out_dir)
    assert len(tokenizer) == vocab_kept
