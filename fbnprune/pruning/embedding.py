"""The model cut to a ``Vocabulary``: the rows of its embedding and LM head.

``trim_model`` slices the input embedding and the LM head to the kept rows (a tied head stays
tied), and renumbers every token id the config and generation config name. The trimmed
model's logits at new id ``i`` are the untrimmed model's at ``kept[i]`` for the same token
sequence: nothing else of the model reads the vocabulary (the check stage proves it in
float64).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fbnprune.vocabulary import Vocabulary, VocabularyError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# config and generation-config fields that hold token ids (an int, a list of ints, or None)
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
# generation-config fields whose ids could name dropped tokens: refused unless empty
UNMAPPED_FIELDS = ("suppress_tokens", "begin_suppress_tokens", "bad_words_ids", "force_words_ids")


def vocabulary_rows(model: PreTrainedModel) -> int:
    """The model's vocabulary: rows of its input embedding."""
    embedding: Any = model.get_input_embeddings()
    return int(embedding.weight.shape[0])


def trim_model(model: PreTrainedModel, vocab: Vocabulary) -> PreTrainedModel:
    """Keep only ``vocab``'s rows of the embedding and LM head (in place); renumber the
    token ids of the config and generation config; return the model."""
    if vocabulary_rows(model) != vocab.original_size:
        raise VocabularyError(
            f"the vocabulary cut is for {vocab.original_size} tokens; "
            f"this model has {vocabulary_rows(model)}"
        )
    embedding: Any = model.get_input_embeddings()
    head: Any = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    rows = vocab.to_old.to(embedding.weight.device)
    embedding.weight = nn.Parameter(embedding.weight.data[rows].clone())
    embedding.num_embeddings = vocab.size
    if embedding.padding_idx is not None:
        embedding.padding_idx = _new_or_none(vocab, embedding.padding_idx)
    if head is not None:
        head.weight = embedding.weight if tied else nn.Parameter(head.weight.data[rows].clone())
        if getattr(head, "bias", None) is not None:
            head.bias = nn.Parameter(head.bias.data[rows].clone())
        head.out_features = vocab.size
    trim_config(model.config, vocab)
    if getattr(model, "generation_config", None) is not None:
        _renumber(model.generation_config, vocab, generation=True)
    return model


def trim_config(config: Any, vocab: Vocabulary) -> None:
    """Set ``vocab_size`` and renumber the token ids of ``config`` (and its text config)."""
    for part in {id(c): c for c in (config, config.get_text_config())}.values():
        if getattr(part, "vocab_size", None) is not None:
            part.vocab_size = vocab.size
        _renumber(part, vocab)


def _renumber(config: Any, vocab: Vocabulary, *, generation: bool = False) -> None:
    for name in TOKEN_ID_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int):
            setattr(config, name, _new_or_fail(vocab, value, name))
        elif isinstance(value, list | tuple):
            setattr(config, name, [_new_or_fail(vocab, v, name) for v in value])
    if generation:
        named = [name for name in UNMAPPED_FIELDS if getattr(config, name, None)]
        if named:
            raise VocabularyError(
                f"the generation config names token ids in {', '.join(named)}; "
                "fbnprune does not renumber those: clear them or keep the full vocabulary"
            )


def _new_or_fail(vocab: Vocabulary, old: int, field: str) -> int:
    try:
        return vocab.new_id(old)
    except (VocabularyError, IndexError):
        raise VocabularyError(
            f"{field} {old} is not a kept token: the special tokens must stay"
        ) from None


def _new_or_none(vocab: Vocabulary, old: int) -> int | None:
    new = int(vocab.to_new[old]) if 0 <= old < vocab.original_size else -1
    return None if new < 0 else new


class VocabularyView(nn.Module):
    """A model read through a vocabulary cut: new ids in, logits at the kept ids out. With
    the original inside, it computes what the trimmed model computes from the original's
    embedding and head: the check stage's reference, and the teacher that heals a trimmed
    student (its distribution over the kept tokens)."""

    def __init__(self, model: nn.Module, vocab: Vocabulary) -> None:
        super().__init__()
        self.model = model
        device = next(model.parameters()).device
        self.to_old: torch.Tensor
        self.register_buffer("to_old", vocab.to_old.to(device), persistent=False)

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        out = self.model(input_ids=self.to_old[input_ids], **kwargs)
        out.logits = out.logits[..., self.to_old]
        return out
