"""The tokenizer cut: in-domain text tokenizes as before (renumbered), any text still encodes
and decodes, the cut tokenizer round-trips through stock AutoTokenizer, and a tokenizer that
cannot be trimmed safely is refused."""

from __future__ import annotations

import pytest
from conftest import _bpe_training_text, tiny_bpe_tokenizer, tiny_tokenizer
from tokenizers import Tokenizer, models
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from fbnprune.pruning.tokenizer_trim import (
    backend_spec,
    closed_ids,
    tokenization_parity,
    trim_tokenizer,
)
from fbnprune.vocabulary import Vocabulary, VocabularyError

KINDS = ("byte_level", "byte_fallback")
OUTSIDE = ["Zebra quartz über naïve café 😀 — 1234!", "\t tabs\nand  spaces  ", ""]


@pytest.fixture(scope="module", params=KINDS)
def cut(request: pytest.FixtureRequest):
    tokenizer = tiny_bpe_tokenizer(request.param)
    texts = [t[:300] for t in _bpe_training_text()[:6]]  # the task's text
    used = {i for ids in tokenizer(texts)["input_ids"] for i in ids}
    vocab = Vocabulary.of(closed_ids(tokenizer, used), len(tokenizer))
    return tokenizer, texts, vocab, trim_tokenizer(tokenizer, vocab)


def test_in_domain_text_tokenizes_as_before(cut) -> None:
    tokenizer, texts, vocab, trimmed = cut
    assert vocab.size < len(tokenizer)  # something was cut
    report = tokenization_parity(tokenizer, trimmed, vocab, texts)
    assert report["in_vocabulary"] == report["identical"] == len(texts)
    assert report["passed"]


def test_any_text_still_encodes_and_decodes(cut) -> None:
    tokenizer, _, vocab, trimmed = cut
    report = tokenization_parity(tokenizer, trimmed, vocab, OUTSIDE)
    assert report["round_trip"] == len(OUTSIDE) and report["passed"]
    ids = trimmed(OUTSIDE[0])["input_ids"]
    assert max(ids) < vocab.size
    assert trimmed.unk_token_id not in ids  # never unknown: byte pieces stay


def test_special_tokens_stay_and_are_renumbered(cut) -> None:
    tokenizer, _, vocab, trimmed = cut
    for name in ("pad_token", "bos_token", "eos_token", "unk_token"):
        assert getattr(trimmed, name) == getattr(tokenizer, name)
        old = getattr(tokenizer, f"{name}_id")
        assert getattr(trimmed, f"{name}_id") == vocab.new_id(old)


def test_round_trips_through_save_and_auto_tokenizer(cut, tmp_path) -> None:
    _, texts, _, trimmed = cut
    trimmed.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == trimmed.get_vocab()
    for text in texts + OUTSIDE:
        assert loaded(text)["input_ids"] == trimmed(text)["input_ids"]


def test_the_cut_keeps_every_merge_parent(cut) -> None:
    tokenizer, _, vocab, trimmed = cut
    spec = backend_spec(trimmed)
    kept = spec["model"]["vocab"]
    for merge in spec["model"]["merges"]:
        left, right = merge if isinstance(merge, list) else merge.split(" ")
        assert left in kept and right in kept and left + right in kept


def test_dropping_a_used_token_changes_tokenization_and_is_reported() -> None:
    tokenizer = tiny_bpe_tokenizer("byte_level")
    text = "the government said"
    used = set(tokenizer(text)["input_ids"])
    longest = max(used, key=lambda i: len(tokenizer.convert_ids_to_tokens(i)))
    vocab = Vocabulary.of(closed_ids(tokenizer, used - {longest}) - {longest}, len(tokenizer))
    trimmed = trim_tokenizer(tokenizer, vocab)
    report = tokenization_parity(tokenizer, trimmed, vocab, [text])
    assert report["in_vocabulary"] == 0  # the text is no longer made of kept tokens
    assert report["round_trip"] == 1  # but it still encodes, in smaller pieces
    assert len(trimmed(text)["input_ids"]) > len(tokenizer(text)["input_ids"])


def test_a_word_level_tokenizer_is_refused() -> None:
    with pytest.raises(VocabularyError, match="WordLevel"):
        closed_ids(tiny_tokenizer(), [4, 5])


def test_a_bpe_that_cannot_encode_any_text_is_refused() -> None:
    vocab = {"<unk>": 0, "a": 1, "b": 2, "ab": 3}
    backend = Tokenizer(models.BPE(vocab, [("a", "b")], unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    with pytest.raises(VocabularyError, match="neither byte-level nor"):
        trim_tokenizer(tokenizer, Vocabulary.of([0, 1], 4))
