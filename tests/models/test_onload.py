"""Layer-sequential calibration (``collect.onload: sequential``): one decoder block at a time,
its weights read from the safetensors files, records the same activations as the whole model.

Tolerance: none. The same batches run through the same operations in the same order, so the
matrices are compared bit for bit (``np.testing.assert_array_equal``) for every supported
family, both sites, one file and sharded checkpoints, float32 and bfloat16.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import (
    PLAIN_TEXTS,
    TINY_CONFIGS,
    checkpoint_config,
    checkpoint_tensors,
    saved_model_dir,
    tiny_model,
    tiny_recipe,
    tiny_tokenizer,
)
from transformers import AutoModelForCausalLM

from fbnprune.collect.activations import collect_activations
from fbnprune.collect.stage import collect
from fbnprune.collect.to_store import collect_to_store
from fbnprune.models.errors import ModelLoadError
from fbnprune.models.layercalls import capture_layer_calls
from fbnprune.models.onload import Checkpoint, LayerwiseModel
from fbnprune.pipeline import run_pipeline
from fbnprune.recipe import parse_recipe
from fbnprune.rundir import RunDir
from fbnprune.rundir.context import RunContext
from fbnprune.rundir.runner import fingerprint


def blocks_on_meta(source: LayerwiseModel) -> list[bool]:
    return [
        all(p.is_meta for p in block.parameters())
        for block in source.adapter.get_layer_list(source.model)
    ]


@pytest.mark.parametrize("site", ["hidden", "output"])
def test_layer_by_layer_from_disk_equals_the_whole_model(model_type, site, tmp_path):
    model = tiny_model(model_type)
    source = LayerwiseModel.from_checkpoint(saved_model_dir(model, tmp_path / "m", shard="40KB"))
    assert len(list((tmp_path / "m").glob("*.safetensors"))) > 1  # sharded
    kwargs = dict(site=site, max_length=32, batch_size=4, progress=False)
    full = collect_activations(model, tiny_tokenizer(), PLAIN_TEXTS, **kwargs)
    layered = collect_activations(source, tiny_tokenizer(), PLAIN_TEXTS, **kwargs)
    resident = collect_activations(
        LayerwiseModel.resident(model), tiny_tokenizer(), PLAIN_TEXTS, **kwargs
    )
    np.testing.assert_array_equal(layered.matrix, full.matrix)
    np.testing.assert_array_equal(resident.matrix, full.matrix)
    np.testing.assert_array_equal(layered.sample_index, full.sample_index)
    assert layered.layer_widths == full.layer_widths and layered.site == site
    assert all(blocks_on_meta(source))  # every block emptied after its turn


def test_bfloat16_and_one_file_checkpoint(tmp_path):
    path = saved_model_dir(tiny_model("llama"), tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    source = LayerwiseModel.from_checkpoint(path, dtype=torch.bfloat16)
    assert next(source.model.parameters()).dtype == torch.bfloat16
    kwargs = dict(max_length=32, batch_size=3, progress=False)
    np.testing.assert_array_equal(
        collect_activations(source, tiny_tokenizer(), PLAIN_TEXTS, **kwargs).matrix,
        collect_activations(model, tiny_tokenizer(), PLAIN_TEXTS, **kwargs).matrix,
    )


def test_per_layer_masks_are_replayed(tmp_path):
    """Gemma3 alternates sliding-window and full attention: each block must be replayed
    with its own mask (a window shorter than the texts makes them differ)."""
    config = dict(
        TINY_CONFIGS["gemma3_text"],
        sliding_window=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )
    from conftest import SPECIAL, VOCAB
    from transformers import AutoConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("gemma3_text", vocab_size=VOCAB, **SPECIAL, **config)
    ).eval()
    source = LayerwiseModel.from_checkpoint(saved_model_dir(model, tmp_path / "m"))
    ids = tiny_tokenizer()(PLAIN_TEXTS[:2], return_tensors="pt", padding=True)
    calls = capture_layer_calls(source.model, [(ids["input_ids"], ids["attention_mask"])])
    masks = [kwargs["attention_mask"] for _, kwargs in calls.calls[0]]
    assert not torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[2])
    kwargs = dict(max_length=32, batch_size=2, progress=False)
    np.testing.assert_array_equal(
        collect_activations(source, tiny_tokenizer(), PLAIN_TEXTS, **kwargs).matrix,
        collect_activations(model, tiny_tokenizer(), PLAIN_TEXTS, **kwargs).matrix,
    )


def test_onload_holds_one_block_at_a_time(tmp_path):
    source = LayerwiseModel.from_checkpoint(saved_model_dir(tiny_model("qwen2"), tmp_path / "m"))
    assert all(blocks_on_meta(source)) and source.n_layers == 3
    assert not any(
        p.is_meta for p in source.adapter.get_backbone(source.model).embed_tokens.parameters()
    )
    with source.onload(1) as block:
        assert blocks_on_meta(source) == [True, False, True]
        assert block is source.adapter.get_layers(source.model)[1]
    assert all(blocks_on_meta(source))


def test_store_collected_layer_by_layer_is_the_same_store(tmp_path):
    model = tiny_model("llama")
    source = LayerwiseModel.from_checkpoint(saved_model_dir(model, tmp_path / "m"))
    kwargs = dict(max_length=32, batch_size=4, dtype="float16", chunk_tokens=16, progress=False)
    a = collect_to_store(model, tiny_tokenizer(), PLAIN_TEXTS, tmp_path / "a.zarr", **kwargs)
    b = collect_to_store(source, tiny_tokenizer(), PLAIN_TEXTS, tmp_path / "b.zarr", **kwargs)
    np.testing.assert_array_equal(b.store.numpy(), a.store.numpy())
    np.testing.assert_array_equal(b.sample_index, a.sample_index)


def test_a_folder_without_safetensors_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no safetensors"):
        Checkpoint(tmp_path)


def test_pipeline_collects_layer_by_layer_with_the_same_plan(tiny_llama_dir, tmp_path, monkeypatch):
    base = parse_recipe(tiny_recipe(tiny_llama_dir))
    seq = parse_recipe(tiny_recipe(tiny_llama_dir, collect={"onload": "sequential"}))
    assert fingerprint(base.collect.model_dump()) == fingerprint(
        parse_recipe(tiny_recipe(tiny_llama_dir, collect={"onload": "full"})).collect.model_dump()
    )  # the default leaves the stage keys of existing recipes as they were
    assert fingerprint(seq.collect.model_dump()) != fingerprint(base.collect.model_dump())
    ref = run_pipeline(base, tmp_path / "full", until="select", progress=False)
    with monkeypatch.context() as patch:  # collect, discover and select never load the model
        patch.setattr("fbnprune.models.loading.load_model", _no_whole_model)
        run = run_pipeline(seq, tmp_path / "seq", until="select", progress=False)
    ctx = RunContext(seq, RunDir.open(tmp_path / "seq"), progress=False)
    full_ctx = RunContext(base, RunDir.open(tmp_path / "full"), progress=False)
    np.testing.assert_array_equal(collect(ctx, "news").matrix, collect(full_ctx, "news").matrix)
    assert ref.plan is not None and run.plan is not None
    assert run.plan.kept == ref.plan.kept
    assert run.plan.fill_values == ref.plan.fill_values


@pytest.mark.parametrize("selector", ["wanda", "magnitude"])
def test_select_reads_down_projections_layer_by_layer(tiny_llama_dir, tmp_path, selector):
    """``collect.onload: sequential``: the wanda scores and the ``reconstruct`` refit read
    each layer's down projection alone from the checkpoint, and the whole model is never
    loaded; the plan and the refit equal the in-memory run's bit for bit (the same float32
    weights, the same float64 solve)."""
    sections = {"select": {"selector": selector}, "prune": {"fill": "reconstruct"}}
    base = parse_recipe(tiny_recipe(tiny_llama_dir, **sections))
    seq = parse_recipe(tiny_recipe(tiny_llama_dir, collect={"onload": "sequential"}, **sections))
    ref = run_pipeline(base, tmp_path / "full", until="select", progress=False)
    run_pipeline(seq, tmp_path / "seq", until="discover", progress=False)  # reads every block
    read: list[str] = []
    tensor = Checkpoint.tensor

    def counted(self: Checkpoint, key: str) -> torch.Tensor:
        read.append(key)
        return tensor(self, key)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("fbnprune.models.loading.load_model", _no_whole_model)
        patch.setattr(Checkpoint, "tensor", counted)
        run = run_pipeline(seq, tmp_path / "seq", until="select", progress=False)
    assert ref.plan is not None and run.plan is not None
    assert [s for s in run.executed if not s.startswith("collect")] == ["select"]
    assert ref.plan.refit is not None and run.plan.refit is not None
    assert run.plan.kept == ref.plan.kept
    for got, want in zip(run.plan.refit.weights, ref.plan.refit.weights, strict=True):
        assert torch.equal(got, want)
    for got, want in zip(run.plan.refit.biases, ref.plan.refit.biases, strict=True):
        assert torch.equal(got, want)
    downs = [k for k in read if k.endswith("mlp.down_proj.weight")]
    layers = len(run.plan.layer_widths)
    assert len(downs) == layers * (2 if selector == "wanda" else 1)  # scores, then the refit
    assert not [k for k in read if "gate_proj" in k or "up_proj" in k]


def test_pipeline_prunes_checks_and_saves_layer_by_layer(tiny_llama_dir, tmp_path, monkeypatch):
    """``save.onload: sequential``: no stage loads the whole model, yet prune.json's sizes,
    every checkpoint tensor (bit for bit) and config equal the in-memory run's; parity.json
    holds the block-by-block float64 check and the saved-tensor check."""
    layouts = {"layouts": ["padded", "compact"]}
    base = parse_recipe(tiny_recipe(tiny_llama_dir, save=layouts))
    seq = parse_recipe(
        tiny_recipe(
            tiny_llama_dir,
            collect={"onload": "sequential"},
            save={**layouts, "onload": "sequential"},
        )
    )
    assert fingerprint(base.save.model_dump()) == fingerprint(
        parse_recipe(
            tiny_recipe(tiny_llama_dir, save={**layouts, "onload": "full"})
        ).save.model_dump()
    )  # the default leaves the stage keys of existing recipes as they were
    run_pipeline(base, tmp_path / "full", until="save", progress=False)
    with monkeypatch.context() as patch:
        patch.setattr("fbnprune.models.loading.load_model", _no_whole_model)
        summary = run_pipeline(seq, tmp_path / "seq", until="save", progress=False)
    exact, saved = summary.parity.reports
    assert summary.parity.passed and exact.dtype == "float64" and exact.n_tokens > 0
    assert [c.name for c in exact.comparisons] == ["sliced-padded", "sliced-compact"]
    assert all(c.max_abs < 1e-9 for c in exact.comparisons)
    assert [c.name for c in saved.comparisons] == ["saved-padded", "saved-compact"]
    assert all(c.max_abs == 0.0 for c in saved.comparisons)
    report = json.loads((tmp_path / "seq" / "prune.json").read_text())
    assert report["sizes"] == json.loads((tmp_path / "full" / "prune.json").read_text())["sizes"]
    for layout in layouts["layouts"]:
        full, streamed = (
            tmp_path / "full" / f"checkpoint-{layout}",
            tmp_path / "seq" / f"checkpoint-{layout}",
        )
        want, got = checkpoint_tensors(full), checkpoint_tensors(streamed)
        assert sorted(got) == sorted(want)
        assert all(torch.equal(got[key], value) for key, value in want.items()), layout
        assert checkpoint_config(streamed) == checkpoint_config(full)
        AutoModelForCausalLM.from_pretrained(streamed, trust_remote_code=layout == "compact")


def _no_whole_model(*args: object, **kwargs: object) -> None:
    raise AssertionError("the whole model was loaded")
