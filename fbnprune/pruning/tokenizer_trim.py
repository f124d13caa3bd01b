"""The tokenizer cut to a ``Vocabulary``: renumbered, loadable by stock ``AutoTokenizer``.

Supported: BPE tokenizers that can encode any text from their base pieces, byte-level BPE
(GPT-2, SmolLM2: 256 byte characters) and BPE with byte fallback (Llama, Gemma: the
``<0x00>``..``<0xFF>`` tokens). Any other tokenizer is refused (``VocabularyError``), never
trimmed wrongly.

``closed_ids`` completes a set of used ids: the base pieces, the tokenizer's named special
tokens and those its chat template writes, and every token BPE builds a kept token from
(recursively), so that BPE can still build every kept token. ``trim_tokenizer`` keeps the
merges whose parts and result all stay, renumbers the vocabulary in the old order and saves
it through ``tokenizers``. Why the cut is exact: BPE applies, at each step, the lowest-ranked
merge among adjacent pairs; every merge of the original derivation of a text made of kept
tokens builds a kept token, so it is kept and still the lowest ranked among the kept ones:
the trimmed tokenizer applies the same merges in the same order (``tokenization_parity``
measures it). Text with dropped tokens falls back to smaller kept pieces.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer
from tokenizers.pre_tokenizers import ByteLevel
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from fbnprune.vocabulary import Vocabulary, VocabularyError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
BYTE_FALLBACK_PIECES = tuple(f"<0x{b:02X}>" for b in range(256))


def backend_spec(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """The tokenizer's ``tokenizer.json`` as a dict; ``VocabularyError`` unless it is a BPE
    that fbnprune can trim."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise VocabularyError(
            f"{type(tokenizer).__name__} has no fast (tokenizers) backend; "
            "only fast BPE tokenizers can be trimmed"
        )
    spec: dict[str, Any] = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise VocabularyError(
            f"a {model.get('type')} tokenizer cannot be trimmed: fbnprune trims byte-level "
            "BPE and BPE with byte fallback only; keep the full vocabulary"
        )
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise VocabularyError(
            "a BPE with a subword prefix or end-of-word suffix cannot be trimmed (its merges "
            "do not join strings); keep the full vocabulary"
        )
    if model.get("dropout"):
        raise VocabularyError("a BPE with dropout tokenizes at random; it cannot be trimmed")
    if not (_byte_level(spec) or model.get("byte_fallback")):
        raise VocabularyError(
            "this BPE is neither byte-level nor has byte fallback: text outside its kept "
            "tokens could not be encoded; keep the full vocabulary"
        )
    return spec


def closed_ids(tokenizer: PreTrainedTokenizerBase, used: Iterable[int]) -> set[int]:
    """``used`` with the base pieces, the special tokens, and the tokens BPE builds every
    kept token from (its derivation from its characters, ``_derivation``), recursively:
    the ids a trimmed tokenizer must keep. ``tokenizers`` does not expose the merges it
    applies, hence the derivation here; whether the kept set is closed is measured with
    ``tokenizers`` itself (``tokenization_parity``, in every run's check)."""
    spec = backend_spec(tokenizer)
    vocab: dict[str, int] = spec["model"]["vocab"]
    token_of = {i: t for t, i in vocab.items()}
    keep = {int(i) for i in used} | set(base_ids(spec)) | special_ids(tokenizer, spec)
    pairs = _merge_pairs(spec["model"]["merges"])
    ranks = {pair: rank for rank, pair in reversed(list(enumerate(pairs)))}
    parents: dict[str, list[tuple[str, str]]] = {}
    for left, right in pairs:
        parents.setdefault(left + right, []).append((left, right))
    todo = [token_of[i] for i in keep if i in token_of]
    while todo:
        token = todo.pop()
        built = _derivation(token, ranks)
        # a token BPE does not build from its characters (reached some other way): keep
        # every pair it can be merged from
        parts = built or {p for pair in parents.get(token, ()) for p in pair}
        for part in parts:
            if part in vocab and vocab[part] not in keep:
                keep.add(vocab[part])
                todo.append(part)
    return keep


def _derivation(token: str, ranks: dict[tuple[str, str], int]) -> set[str] | None:
    """The characters of ``token`` and the tokens BPE builds from them on its way to
    ``token`` (merging the lowest-ranked adjacent pair, leftmost first, as ``tokenizers``
    does); None when it does not end at ``token``."""
    symbols, built = list(token), set(token)
    while len(symbols) > 1:
        candidates = [
            (ranks[pair], i)
            for i, pair in enumerate(zip(symbols, symbols[1:], strict=False))
            if pair in ranks
        ]
        if not candidates:
            break
        _, i = min(candidates)
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
        built.add(symbols[i])
    return built if symbols == [token] else None


def base_ids(spec: dict[str, Any]) -> list[int]:
    """The ids of the pieces any text is written in: the byte characters (or byte tokens)
    that the original has (some byte-level BPEs lack bytes that UTF-8 never uses; the
    original cannot write those either)."""
    vocab = spec["model"]["vocab"]
    pieces: Sequence[str] = ByteLevel.alphabet() if _byte_level(spec) else BYTE_FALLBACK_PIECES
    return sorted(vocab[p] for p in pieces if p in vocab)


def special_ids(tokenizer: PreTrainedTokenizerBase, spec: dict[str, Any]) -> set[int]:
    """The named special tokens, the model's unknown token, and every added token that the
    chat template writes."""
    ids = {int(i) for i in tokenizer.all_special_ids}
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    ids |= {a["id"] for a in spec["added_tokens"] if a["content"] in template}
    unk = spec["model"].get("unk_token")
    if unk is not None and unk in spec["model"]["vocab"]:
        ids.add(spec["model"]["vocab"][unk])
    return ids


def trim_tokenizer(
    tokenizer: PreTrainedTokenizerBase, vocab: Vocabulary
) -> PreTrainedTokenizerBase:
    """A stock tokenizer with only ``vocab``'s tokens, renumbered; loaded back through
    ``AutoTokenizer.from_pretrained`` so that what is saved is what was checked."""
    spec = trimmed_spec(backend_spec(tokenizer), vocab)
    backend = Tokenizer.from_str(json.dumps(spec))  # fails here if the spec is inconsistent
    with tempfile.TemporaryDirectory(prefix="fbnprune-tokenizer-") as tmp:
        folder = Path(tmp)
        tokenizer.save_pretrained(folder)
        for name in ("vocab.json", "merges.txt", "tokenizer.model", "spiece.model"):
            (folder / name).unlink(missing_ok=True)  # the slow files would name old ids
        backend.save(str(folder / TOKENIZER_FILE))
        _trim_config(folder / CONFIG_FILE, spec)
        trimmed = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if len(trimmed) != vocab.size:
        raise VocabularyError(
            f"the trimmed tokenizer loads with {len(trimmed)} tokens, not {vocab.size}: "
            "its configuration names tokens outside the kept vocabulary"
        )
    return trimmed


def trimmed_spec(spec: dict[str, Any], vocab: Vocabulary) -> dict[str, Any]:
    """``tokenizer.json`` with only the kept ids, renumbered; merges kept where both parts
    and their result stay."""
    new_of = {old: new for new, old in enumerate(vocab.kept)}
    model = spec["model"]
    kept_vocab = {t: new_of[i] for t, i in model["vocab"].items() if i in new_of}
    unk = model.get("unk_token")
    if unk is not None and unk in model["vocab"] and unk not in kept_vocab:
        raise VocabularyError(f"the unknown token {unk!r} must stay in the vocabulary")
    merges = [
        m
        for m, (left, right) in zip(model["merges"], _merge_pairs(model["merges"]), strict=True)
        if left in kept_vocab and right in kept_vocab and left + right in kept_vocab
    ]
    added = [{**a, "id": new_of[a["id"]]} for a in spec["added_tokens"] if a["id"] in new_of]
    if set(kept_vocab.values()) | {a["id"] for a in added} != set(range(vocab.size)):
        raise VocabularyError("some kept ids name no token of this tokenizer")
    post = _renumber_post_processor(spec.get("post_processor"), new_of)
    return {
        **spec,
        "model": {**model, "vocab": kept_vocab, "merges": merges},
        "added_tokens": added,
        "post_processor": post,
    }


def tokenization_parity(
    original: PreTrainedTokenizerBase,
    trimmed: PreTrainedTokenizerBase,
    vocab: Vocabulary,
    texts: Sequence[str],
) -> dict[str, Any]:
    """How the trimmed tokenizer writes ``texts`` against the original: ``in_vocabulary``,
    the texts whose original tokens are all kept; ``identical``, those of them tokenized to
    the same tokens (renumbered), which must be all; ``round_trip``, the texts (all of them)
    that decode to the original's decoding."""
    new_of = {old: new for new, old in enumerate(vocab.kept)}
    in_vocab = identical = round_trip = 0
    for text in texts:
        before = original(text)["input_ids"]
        after = trimmed(text)["input_ids"]
        if all(i in new_of for i in before):
            in_vocab += 1
            identical += [new_of[i] for i in before] == after
        round_trip += original.decode(before) == trimmed.decode(after)
    return {
        "texts": len(texts),
        "in_vocabulary": in_vocab,
        "identical": identical,
        "round_trip": round_trip,
        "passed": identical == in_vocab and round_trip == len(texts),
    }


def _byte_level(spec: dict[str, Any]) -> bool:
    return "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))


def _merge_pairs(merges: list[Any]) -> list[tuple[str, str]]:
    """Merges as (left, right): ``tokenizers`` writes lists, older files "left right"."""
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]


def _renumber_post_processor(node: Any, new_of: dict[int, int]) -> Any:
    """The post-processor with its special tokens' ids renumbered (TemplateProcessing's
    ``ids``, Bert/Roberta's ``[token, id]`` pairs), recursively through sequences."""
    if isinstance(node, list):
        return [_renumber_post_processor(n, new_of) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "ids" and isinstance(value, list):
            out[key] = [_kept(new_of, i) for i in value]
        elif key in ("sep", "cls") and isinstance(value, list) and len(value) == 2:
            out[key] = [value[0], _kept(new_of, value[1])]
        else:
            out[key] = _renumber_post_processor(value, new_of)
    return out


def _kept(new_of: dict[int, int], old: int) -> int:
    if old not in new_of:
        raise VocabularyError(f"the post-processor writes token id {old}, which is dropped")
    return new_of[old]


def _trim_config(file: Path, spec: dict[str, Any]) -> None:
    """Keep ``tokenizer_config.json`` naming only tokens that stay."""
    if not file.is_file():
        return
    config = json.loads(file.read_text())
    contents = {a["content"]: a["id"] for a in spec["added_tokens"]}
    if "added_tokens_decoder" in config:
        config["added_tokens_decoder"] = {
            str(contents[v["content"]]): v
            for v in config["added_tokens_decoder"].values()
            if v.get("content") in contents
        }
    for key in ("additional_special_tokens", "extra_special_tokens"):
        if isinstance(config.get(key), list):
            config[key] = [t for t in config[key] if _content(t) in contents]
    file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _content(token: Any) -> str:
    return token["content"] if isinstance(token, dict) else str(token)
