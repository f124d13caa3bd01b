"""A model's size per component adds up to its size, and each cut shows where it cut."""

from __future__ import annotations

import copy

import pytest
from conftest import TINY_CONFIGS, VOCAB, random_plan, tiny_model

from fbnprune.models.size import component_sizes, model_size
from fbnprune.pruning.embedding import trim_model
from fbnprune.pruning.slicing import slice_model
from fbnprune.vocabulary import Vocabulary


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_components_add_up_to_the_model(model_type: str) -> None:
    model = tiny_model(model_type)
    parts = component_sizes(model)
    assert sum(p.parameters for p in parts.values()) == model_size(model).parameters
    assert sum(p.bytes for p in parts.values()) == model_size(model).bytes
    config = model.config
    hidden = config.hidden_size
    assert parts["embedding"].parameters == VOCAB * hidden
    assert ("lm_head" in parts) != bool(config.tie_word_embeddings)
    assert parts["attention"].parameters > 0 and parts["mlp"].parameters > 0


def test_each_cut_shrinks_its_own_component() -> None:
    model = tiny_model("llama")
    before = component_sizes(model)
    sliced = slice_model(copy.deepcopy(model), random_plan(model, "hidden", "zero"))
    after = component_sizes(sliced)
    assert after["mlp"].parameters < before["mlp"].parameters
    assert after["embedding"] == before["embedding"] and after["attention"] == before["attention"]
    trimmed = component_sizes(trim_model(sliced, Vocabulary.of(range(VOCAB // 2), VOCAB)))
    assert trimmed["embedding"].parameters == before["embedding"].parameters // 2
    assert trimmed["lm_head"].parameters == before["lm_head"].parameters // 2
    assert trimmed["mlp"] == after["mlp"]
