"""Packing (``collect.packing``): short samples share rows, position ids restart at each
sample, and transformers keeps attention within it.

Tolerance: ``ATOL`` = 1e-6 absolute on float32 activations. Packed and padded rows are not the
same shapes, so the matrix products sum in other orders; measured max |packed - unpacked| on
these tiny models (activations up to ~0.4): 1.0e-7 (GPT-NeoX, hidden), 0 to 1e-7 elsewhere
(with sliding windows of 3: up to 2.6e-8), and about a tenth of all values differ at all.
Without the restarting position ids the same rows differ by more than 1e-3
(``test_the_comparison_can_fail``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from conftest import (
    PLAIN_TEXTS,
    REPO,
    SPECIAL,
    TINY_CONFIGS,
    VOCAB,
    saved_model_dir,
    tiny_model,
    tiny_recipe,
    tiny_tokenizer,
)
from transformers import AutoConfig, AutoModelForCausalLM

from fbnprune.collect.activations import collect_activations, model_batches, tokenize
from fbnprune.collect.packing import (
    PACKED_FAMILIES,
    PackingError,
    length_order,
    pack_rows,
    packed_batch,
)
from fbnprune.collect.stage import collect
from fbnprune.collect.to_store import collect_to_store
from fbnprune.models.onload import LayerwiseModel
from fbnprune.pipeline import run_pipeline
from fbnprune.recipe import load_recipe, parse_recipe
from fbnprune.rundir import RunDir
from fbnprune.rundir.context import RunContext

ATOL = 1e-6
SHORT = [*PLAIN_TEXTS, "x", "one more short line", "the end"]  # nine samples, 1 to 41 characters
KW = dict(max_length=48, batch_size=2, progress=False)


def close(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want|, asserted within ``ATOL`` (shapes must match)."""
    assert got.shape == want.shape
    worst = float(np.abs(got - want).max())
    assert worst <= ATOL, worst
    return worst


def test_rows_are_filled_in_the_padded_order():
    lengths = [5, 9, 2, 9, 1, 4, 7]
    rows = pack_rows(lengths, 10)
    assert [i for row in rows for i in row] == length_order(lengths) == [1, 3, 6, 0, 5, 2, 4]
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert rows == [[1], [3], [6], [0, 5], [2, 4]]
    with pytest.raises(PackingError, match="sample #1 has 9 tokens"):
        pack_rows(lengths, 8)


def test_positions_restart_at_every_sample():
    batch = packed_batch([[7, 8, 9], [5], [4, 4]], [[0, 1], [2]])
    assert batch.spans == [(0, 0, 0), (1, 0, 3), (2, 1, 0)]
    assert batch.inputs["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 0, 1]]
    assert batch.inputs["input_ids"].tolist() == [[7, 8, 9, 5], [4, 4, 4, 4]]
    assert "attention_mask" not in batch.inputs  # transformers reads the packing from positions


def test_packing_fills_fewer_positions():
    ids = tokenize(tiny_tokenizer(), SHORT, 48)
    padded = model_batches(tiny_model("llama"), tiny_tokenizer(), ids, 2, None)
    packed = model_batches(tiny_model("llama"), tiny_tokenizer(), ids, 2, 48)
    cells = [sum(b.inputs["input_ids"].numel() for b in bs) for bs in (padded, packed)]
    assert cells[1] < cells[0] and len(packed) < len(padded)
    assert [s[0] for b in packed for s in b.spans] == [s[0] for b in padded for s in b.spans]


@pytest.mark.parametrize("site", ["hidden", "output"])
def test_packed_equals_unpacked_in_every_family(model_type, site, tmp_path):
    assert model_type in PACKED_FAMILIES
    model = tiny_model(model_type)
    kw = dict(KW, site=site)
    want = collect_activations(model, tiny_tokenizer(), SHORT, **kw)
    got = collect_activations(model, tiny_tokenizer(), SHORT, packing=True, **kw)
    close(got.matrix, want.matrix)
    np.testing.assert_array_equal(got.sample_index, want.sample_index)
    source = LayerwiseModel.from_checkpoint(saved_model_dir(model, tmp_path / "m"))
    layered = collect_activations(source, tiny_tokenizer(), SHORT, packing=True, **kw)
    np.testing.assert_array_equal(layered.matrix, got.matrix)  # replayed: the same operations


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize(
    ("family", "extra"),
    [
        ("gemma3_text", dict(layer_types=["sliding_attention", "full_attention"] * 2)),
        ("mistral", {}),
        ("qwen2", dict(use_sliding_window=True, max_window_layers=1)),
        ("phi3", {}),
    ],
)
def test_sliding_windows_stay_within_their_sample(family, extra, attention, tmp_path):
    """A window (3) shorter than the samples: each sliding layer must count positions from
    its own sample's start, in the whole model and in the replayed blocks."""
    config = {**SPECIAL, **TINY_CONFIGS[family], "sliding_window": 3, **extra}
    if family == "gemma3_text":
        config["num_hidden_layers"] = 4
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(family, vocab_size=VOCAB, **config), attn_implementation=attention
    ).eval()
    want = collect_activations(model, tiny_tokenizer(), SHORT, **KW)
    got = collect_activations(model, tiny_tokenizer(), SHORT, packing=True, **KW)
    close(got.matrix, want.matrix)
    source = LayerwiseModel.resident(model)
    layered = collect_activations(source, tiny_tokenizer(), SHORT, packing=True, **KW)
    np.testing.assert_array_equal(layered.matrix, got.matrix)


def test_the_comparison_can_fail(monkeypatch):
    """Packed rows without restarting positions (one long sequence per row) see their
    neighbours: the test above would catch it."""
    from fbnprune.collect import packing

    real = packing.packed_batch

    def unrestarted(ids, rows):
        batch = real(ids, rows)
        n = batch.inputs["input_ids"].shape[1]
        batch.inputs["position_ids"] = torch.arange(n).expand_as(batch.inputs["input_ids"])
        return batch

    monkeypatch.setattr(packing, "packed_batch", unrestarted)
    model = tiny_model("llama")
    want = collect_activations(model, tiny_tokenizer(), SHORT, **KW)
    got = collect_activations(model, tiny_tokenizer(), SHORT, packing=True, **KW)
    assert np.abs(got.matrix - want.matrix).max() > 1e-3


def test_store_gets_the_same_rows_in_the_same_order(tmp_path):
    model = tiny_model("qwen2")
    kw = dict(KW, dtype="float32", chunk_tokens=16)
    want = collect_to_store(model, tiny_tokenizer(), SHORT, tmp_path / "a.zarr", **kw)
    got = collect_to_store(model, tiny_tokenizer(), SHORT, tmp_path / "b.zarr", packing=True, **kw)
    np.testing.assert_array_equal(got.sample_index, want.sample_index)
    close(got.store.numpy(), want.store.numpy())
    source = LayerwiseModel.from_checkpoint(saved_model_dir(model, tmp_path / "m"))
    layered = collect_to_store(
        source, tiny_tokenizer(), SHORT, tmp_path / "c.zarr", packing=True, **kw
    )
    np.testing.assert_array_equal(layered.store.numpy(), got.store.numpy())


def test_an_unverified_attention_or_family_is_refused(monkeypatch, tmp_path):
    model = tiny_model("gpt2")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(PackingError, match="needs sdpa or eager attention"):
        collect_activations(model, tiny_tokenizer(), SHORT, packing=True, **KW)
    out = tmp_path / "a.npy"
    monkeypatch.setattr("fbnprune.collect.packing.PACKED_FAMILIES", PACKED_FAMILIES - {"gpt2"})
    with pytest.raises(PackingError, match="not verified for model_type 'gpt2'"):
        collect_activations(tiny_model("gpt2"), tiny_tokenizer(), SHORT, packing=True, **KW)
    with pytest.raises(PackingError, match="not verified"):
        collect_activations(
            tiny_model("gpt2"), tiny_tokenizer(), SHORT, packing=True, out_file=out, **KW
        )
    with pytest.raises(PackingError, match="not verified"):
        collect_to_store(
            tiny_model("gpt2"), tiny_tokenizer(), SHORT, tmp_path / "s.zarr", packing=True, **KW
        )
    assert not list(tmp_path.iterdir())  # no matrix, no store left behind
    collect_activations(tiny_model("gpt2"), tiny_tokenizer(), SHORT, **KW)  # unpacked: fine


def test_pipeline_with_packing_makes_the_same_plan(tiny_llama_dir, tmp_path):
    base = parse_recipe(tiny_recipe(tiny_llama_dir))
    packed = parse_recipe(tiny_recipe(tiny_llama_dir, collect={"packing": True}))
    off = parse_recipe(tiny_recipe(tiny_llama_dir, collect={"packing": False}))
    assert off.fingerprint() == base.fingerprint() != packed.fingerprint()
    ref = run_pipeline(base, tmp_path / "base", until="select", progress=False)
    run = run_pipeline(packed, tmp_path / "packed", until="select", progress=False)
    a = collect(RunContext(base, RunDir.open(tmp_path / "base"), progress=False), "news")
    ctx = RunContext(packed, RunDir.open(tmp_path / "packed"), progress=False)
    b = collect(ctx, "news")
    close(b.matrix, a.matrix)
    np.testing.assert_array_equal(b.sample_index, a.sample_index)
    assert ctx.layout.read_collect_meta("news")["packing"] is True
    assert ref.plan is not None and run.plan is not None
    assert run.plan.kept == ref.plan.kept


def test_shipped_recipes_keep_their_fingerprints():
    """``collect.packing`` at its default leaves every shipped recipe's fingerprint as it was
    before the key existed (the values of ``test_layer_ica``); on, it changes collect's."""
    expected = {
        "analyze-gemma3.yaml": "1b0624ff396b1ec3",
        "analyze-smollm2.yaml": "be39bafd1c6d3fe7",
        "demo.yaml": "5a0f165ad6e96d69",
        "gemma3-bbc.yaml": "2c5adddff7bb4e7b",
        "multitask.yaml": "fe9fc2a344256f43",
    }
    # the recipes shipped before (later ones, e.g. the small ones, have no earlier key)
    assert set(expected) <= {p.name for p in (REPO / "recipes").glob("*.yaml")}
    for name, whole in expected.items():
        recipe = load_recipe(REPO / "recipes" / name)
        assert recipe.fingerprint() == whole
        assert "packing" not in recipe.model_dump()["collect"]
        raw = yaml.safe_load((REPO / "recipes" / name).read_text())
        off = parse_recipe({**raw, "collect": {**raw.get("collect", {}), "packing": False}})
        on = parse_recipe({**raw, "collect": {**raw.get("collect", {}), "packing": True}})
        assert off.fingerprint() == whole
        assert on.fingerprint("collect") != recipe.fingerprint("collect")
        assert parse_recipe(yaml.safe_load(on.to_yaml())) == on
