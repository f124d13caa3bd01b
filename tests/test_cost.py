"""Cost: sizes are exact, the timed greedy loop is generate's, the table has a row per model.

No timing is asserted: only that the measured figures exist and are consistent.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import tiny_model

from fbnprune.cost import (
    Cost,
    costs_markdown,
    measure_costs,
    prompt_ids,
    safetensors_bytes,
    timed_greedy,
)
from fbnprune.models.adapters import get_adapter
from fbnprune.models.hooks import site_widths
from fbnprune.models.size import count_parameters, model_size
from fbnprune.plan import PrunePlan
from fbnprune.pruning.slicing import slice_model
from fbnprune.save.checkpoint import checkpoint_bytes, save_checkpoint


def sliced(model, layout: str):
    """A copy keeping a different number of random units per layer."""
    widths = site_widths(model, get_adapter(model), "hidden")
    gen = torch.Generator().manual_seed(1)
    kept = [
        sorted(torch.randperm(w, generator=gen)[: 4 + 3 * i].tolist()) for i, w in enumerate(widths)
    ]
    plan = PrunePlan(
        model="tiny",
        model_type=model.config.model_type,
        site="hidden",
        fill="zero",
        layer_widths=widths,
        kept=kept,
    )
    return slice_model(copy.deepcopy(model), plan, layout=layout).eval()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops on a busy machine: more threads only wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llama_costs(one_thread) -> dict[str, Cost]:
    original = tiny_model("llama")
    models = {
        "original": original,
        "sliced-padded": sliced(original, "padded"),
        "sliced-compact": sliced(original, "compact"),
    }
    return measure_costs(models, prompt_tokens=16, new_tokens=4, batch_size=2, repeats=3)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen2"])
def test_timed_greedy_equals_generate(model_type):
    model = tiny_model(model_type)
    ids = prompt_ids(128, prompt_tokens=12, batch_size=2, seed=1)
    tokens, prefill, decode = timed_greedy(model, ids, 6)
    expected = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=6,
        min_new_tokens=6,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert torch.equal(tokens, expected[:, ids.shape[1] :])
    assert prefill > 0 and decode > 0


def test_timed_greedy_needs_a_decode_step():
    with pytest.raises(ValueError, match="at least 2"):
        timed_greedy(tiny_model("llama"), prompt_ids(128, prompt_tokens=4, batch_size=1), 1)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gpt2", "qwen2"])
def test_safetensors_bytes_is_what_save_checkpoint_writes(model_type, tmp_path):
    model = tiny_model(model_type)
    assert model.config.tie_word_embeddings == (model_type in ("gemma3_text", "gpt2"))
    measured = safetensors_bytes(model)
    assert measured == checkpoint_bytes(save_checkpoint(model, None, tmp_path / "ckpt"))
    # the weights once each (tied embeddings counted once) plus a small header
    weights = model_size(model).bytes
    assert weights < measured < weights + 64 * 1024
    every_tensor = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if model.config.tie_word_embeddings:
        assert measured < every_tensor


@pytest.mark.parametrize("layout", ["padded", "compact"])
def test_safetensors_bytes_of_sliced_model(layout, tmp_path):
    model = sliced(tiny_model("llama"), layout)
    measured = safetensors_bytes(model)
    assert measured == checkpoint_bytes(save_checkpoint(model, None, tmp_path / "ckpt"))


def test_costs_are_positive_and_consistent(llama_costs):
    assert list(llama_costs) == ["original", "sliced-padded", "sliced-compact"]
    for cost in llama_costs.values():
        assert cost.device == "cpu"
        assert cost.parameters > 0 and cost.safetensors_bytes > 4 * cost.parameters
        assert cost.peak_memory_mib >= 0
        assert len(cost.prefill_seconds) == len(cost.decode_seconds) == 3
        assert all(t > 0 for t in cost.prefill_seconds + cost.decode_seconds)
        # the medians are derived from the per-repeat times
        slow, fast = cost.decode_range()
        assert slow <= cost.decode_tokens_per_s <= fast
        slow, fast = cost.prefill_range()
        assert slow <= cost.prefill_tokens_per_s <= fast
        assert (cost.prompt_tokens, cost.new_tokens, cost.batch_size) == (16, 4, 2)
        assert cost.threads == 1
        assert json.loads(json.dumps(cost.to_dict())) == cost.to_dict()


def test_sliced_models_cost_less(llama_costs):
    original = llama_costs["original"]
    for name in ("sliced-padded", "sliced-compact"):
        assert llama_costs[name].parameters < original.parameters
        assert llama_costs[name].safetensors_bytes < original.safetensors_bytes
    assert llama_costs["sliced-compact"].parameters < llama_costs["sliced-padded"].parameters


def test_parameters_count_tied_weights_once():
    model = tiny_model("gpt2")
    costs = measure_costs({"m": model}, prompt_tokens=4, new_tokens=2, repeats=1, warmup=0)
    assert costs["m"].parameters == count_parameters(model)
    assert costs["m"].parameters < sum(p.numel() for p in model.state_dict().values())


def test_measure_costs_restores_threads_and_mode():
    model = tiny_model("llama").train()
    before = torch.get_num_threads()
    costs = measure_costs({"m": model}, prompt_tokens=4, new_tokens=2, repeats=1, threads=2)
    assert costs["m"].threads == 2
    assert torch.get_num_threads() == before
    assert model.training


def test_measure_costs_rejects_bad_arguments():
    with pytest.raises(ValueError, match="no models"):
        measure_costs({})
    with pytest.raises(ValueError, match="repeats"):
        measure_costs({"m": tiny_model("llama")}, repeats=0)
    with pytest.raises(ValueError, match="at least 2"):
        measure_costs({"m": tiny_model("llama")}, new_tokens=1)


def test_markdown_has_one_row_per_model(llama_costs):
    table = costs_markdown(llama_costs)
    lines = table.splitlines()
    assert len(lines) == 2 + len(llama_costs)
    header_cells = lines[0].count("|")
    for name, line in zip(llama_costs, lines[2:], strict=True):
        assert line.startswith(f"| {name} |")
        assert line.count("|") == header_cells
    original = lines[2].split("|")
    assert [cell.strip() for cell in original[3:6:2]] == ["1.000", "1.000"]
    assert original[8].strip() == original[10].strip() == "1.00x"


def test_markdown_ratios_and_reference(llama_costs):
    table = costs_markdown(llama_costs, reference="sliced-padded")
    padded = table.splitlines()[3].split("|")
    assert padded[3].strip() == "1.000"
    compact = llama_costs["sliced-compact"]
    ratio = compact.parameters / llama_costs["sliced-padded"].parameters
    assert math.isclose(float(table.splitlines()[4].split("|")[3]), ratio, abs_tol=5e-4)
    with pytest.raises(ValueError, match="reference 'base'"):
        costs_markdown(llama_costs, reference="base")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_measure_costs_on_cuda():
    model = tiny_model("llama")
    costs = measure_costs({"m": model}, prompt_tokens=8, new_tokens=3, repeats=2, device="cuda")
    assert costs["m"].device.startswith("cuda")
    assert costs["m"].peak_memory_mib > 0
    assert costs["m"].decode_tokens_per_s > 0
