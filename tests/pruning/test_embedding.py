"""The model cut to a vocabulary: logits at kept ids equal (float64, exactly), tied heads stay
tied, token ids renumbered, and the saved model loads with stock classes."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import SPECIAL, TINY_CONFIGS, VOCAB, tiny_model
from transformers import AutoModelForCausalLM

from fbnprune.pruning.embedding import VocabularyView, trim_model
from fbnprune.vocabulary import Vocabulary, VocabularyError


def _vocabulary(seed: int = 0) -> Vocabulary:
    gen = torch.Generator().manual_seed(seed)
    picked = torch.randperm(VOCAB, generator=gen)[: VOCAB // 3].tolist()
    return Vocabulary.of(picked + list(SPECIAL.values()), VOCAB)


def _new_ids(vocab: Vocabulary, length: int = 12) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab.size, (2, length), generator=gen)


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_logits_at_kept_ids_are_exactly_the_originals(model_type: str) -> None:
    model = tiny_model(model_type).double()
    vocab = _vocabulary()
    trimmed = trim_model(copy.deepcopy(model), vocab)
    ids = _new_ids(vocab)
    with torch.no_grad():
        want = model(input_ids=vocab.to_old[ids]).logits[..., vocab.to_old]
        got = trimmed(input_ids=ids).logits
        view = VocabularyView(model, vocab)(input_ids=ids).logits
    assert got.shape[-1] == vocab.size
    assert float((got - want).abs().max()) == 0.0
    assert torch.equal(view, want)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma3_text"])
def test_saved_model_loads_with_stock_classes_and_keeps_ties(model_type: str, tmp_path) -> None:
    model = tiny_model(model_type)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    vocab = _vocabulary()
    trimmed = trim_model(copy.deepcopy(model), vocab)
    assert (trimmed.get_output_embeddings().weight is trimmed.get_input_embeddings().weight) == tied
    trimmed.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.vocab_size == vocab.size
    for name, old in SPECIAL.items():
        assert getattr(loaded.config, name) == vocab.new_id(old)
    ids = _new_ids(vocab)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, trimmed(input_ids=ids).logits)


def test_parameters_shrink_by_the_dropped_rows() -> None:
    model = tiny_model("llama")
    vocab = _vocabulary()
    before = sum(p.numel() for p in model.parameters())
    trim_model(model, vocab)
    after = sum(p.numel() for p in model.parameters())
    hidden = model.config.hidden_size
    tied = model.config.tie_word_embeddings
    assert before - after == (VOCAB - vocab.size) * hidden * (1 if tied else 2)


def test_a_special_token_must_stay() -> None:
    model = tiny_model("llama")
    vocab = Vocabulary.of(range(3, VOCAB), VOCAB)  # bos, eos, pad dropped
    with pytest.raises(VocabularyError, match="special tokens must stay"):
        trim_model(model, vocab)


def test_a_cut_for_another_vocabulary_is_refused() -> None:
    with pytest.raises(VocabularyError, match="this model has 128"):
        trim_model(tiny_model("llama"), Vocabulary.of([0, 1, 2], 500))


def test_vocabulary_tables() -> None:
    vocab = Vocabulary.of([5, 1, 9, 1], 12)
    assert vocab.kept == (1, 5, 9) and vocab.size == 3
    assert vocab.to_new[[1, 5, 9, 0]].tolist() == [0, 1, 2, -1]
    assert vocab.new_ids(torch.tensor([9, 1])).tolist() == [2, 0]
    with pytest.raises(VocabularyError, match=r"\[0\]"):
        vocab.new_ids(torch.tensor([0]))
    assert Vocabulary.from_dict(vocab.to_dict()) == vocab
    with pytest.raises(VocabularyError):
        Vocabulary((3, 1), 12)
    with pytest.raises(VocabularyError):
        Vocabulary((1, 12), 12)
