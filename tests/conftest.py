"""Shared fixtures: tiny random models of every supported family, built in code, and the one
tiny recipe the pipeline tests run."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors import safe_open
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from fbnprune.models.adapters import get_adapter
from fbnprune.models.hooks import site_widths
from fbnprune.plan import PrunePlan, Refit
from fbnprune.recipe import Recipe, parse_recipe

REPO = Path(__file__).resolve().parents[1]  # the checkout: recipes/, fbnprune/, README.md

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 128
_ATTN = dict(num_attention_heads=4, num_key_value_heads=2)
TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, **_ATTN),
    "mistral": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, **_ATTN),
    "qwen2": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, **_ATTN),
    "gemma3_text": dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, head_dim=8, **_ATTN
    ),
    "phi3": dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, pad_token_id=0, **_ATTN
    ),
    "gpt_neox": dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4
    ),
    "gpt2": dict(n_embd=32, n_inner=48, n_layer=3, n_head=4),
}
SPECIAL = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random causal LM of one family, float32, eval mode, deterministic for a seed."""
    kwargs = {**SPECIAL, **TINY_CONFIGS[model_type]}
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # random init leaves biases at zero; make them non-zero so slicing must carry them
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(params=sorted(TINY_CONFIGS))
def model_type(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Llama with a char-level tokenizer, saved like any local checkpoint."""
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def assert_reloads_with_its_cache(
    model: torch.nn.Module, directory: Path, input_ids: torch.Tensor
) -> torch.nn.Module:
    """Save the float64 ``model`` to ``directory`` and assert that stock ``from_pretrained``
    rebuilds it with its logits on ``input_ids`` (to 1e-6: Gemma's embedding scale is
    rebuilt in float32 on load), and that greedy decoding with its KV cache equals decoding
    without (the cache is indexed by the blocks' and heads' numbers); return the reload."""
    with torch.no_grad():
        got = model(input_ids=input_ids, use_cache=False).logits
    model.save_pretrained(directory)
    reloaded = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float64).eval()
    with torch.no_grad():
        again = reloaded(input_ids=input_ids, use_cache=False).logits
    assert float((again - got).abs().max()) < 1e-6
    prompt = input_ids[:1]
    cached = model.generate(prompt, max_new_tokens=4, do_sample=False)
    uncached = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    return reloaded


def random_batch(seed: int = 0, batch: int = 3, length: int = 10) -> dict[str, torch.Tensor]:
    """Token ids with right padding in all but the first row."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    attention = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        attention[row, length - 2 * row :] = 0
        input_ids[row, length - 2 * row :] = 0
    return {"input_ids": input_ids, "attention_mask": attention}


def _transformers_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """``tok`` as a transformers tokenizer with the tests' special tokens, padding right."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="right",
    )


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer (lowercase ASCII) whose ids fit ``VOCAB``; built in code."""
    chars = [chr(c) for c in range(32, 127) if not chr(c).isupper()]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({ch: i + 4 for i, ch in enumerate(chars)})
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return _transformers_tokenizer(tok)


BPE_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def _bpe_training_text() -> list[str]:
    from fbnprune.data.corpora import bbc_news

    return [text for _, text, _ in bbc_news()[::40]]


def tiny_bpe_tokenizer(kind: str = "byte_level", size: int = 512) -> PreTrainedTokenizerFast:
    """A BPE tokenizer trained in code on a few BBC articles: ``byte_level`` (GPT-2 and
    SmolLM2's kind) or ``byte_fallback`` (Llama and Gemma's: "▁" for spaces, byte tokens
    for characters outside the vocabulary); ids ``0..3`` are ``BPE_SPECIALS``."""
    texts = _bpe_training_text()
    if kind == "byte_level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=size,
            special_tokens=BPE_SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
    else:
        normalizer = normalizers.Replace(" ", "\u2581")
        plain = Tokenizer(models.BPE())
        plain.normalizer = normalizer
        trainer = trainers.BpeTrainer(vocab_size=size - 256, show_progress=False)
        plain.train_from_iterator(texts, trainer)
        spec = json.loads(plain.to_str())["model"]
        pieces = BPE_SPECIALS + [f"<0x{b:02X}>" for b in range(256)]
        pieces += sorted(spec["vocab"], key=spec["vocab"].get)
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["merges"]]
        vocab = {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}
        tok = Tokenizer(
            models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
        )
        tok.normalizer = normalizer
        tok.decoder = decoders.Sequence(
            [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        )
        tok.add_special_tokens(BPE_SPECIALS)
    return _transformers_tokenizer(tok)


def tiny_bpe_model(model_type: str, vocab_size: int, seed: int = 0) -> torch.nn.Module:
    """``tiny_model`` with ``vocab_size`` tokens (a BPE tokenizer's)."""
    kwargs = {**SPECIAL, **TINY_CONFIGS[model_type]}
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, **kwargs)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


# one BBC task of 12 calibration and 4 held-out articles, 32 tokens each
NEWS_TASK: dict[str, Any] = {
    "name": "news",
    "source": "builtin:bbc_news",
    "template": "Article: {text}",
    "calibration_samples": 12,
    "heldout_samples": 4,
    "max_length": 32,
}
TINY_RECIPE: dict[str, Any] = {
    "name": "tiny",
    "tasks": [NEWS_TASK],
    "collect": {"batch_size": 4},
    "discover": {"n_components": 8},
    "select": {"budget": 0.25, "min_per_layer": 0.05},
    "check": {"samples": 4, "atol": 1e-5},
    "save": {"layouts": ["padded", "compact"]},
    "heal": {"enabled": False},
}


def tiny_recipe(model: str | Path = "unused", **sections: Any) -> dict[str, Any]:
    """The tests' recipe for ``model``: ``TINY_RECIPE`` with ``sections`` on top (a mapping
    updates the section of that name, anything else replaces it)."""
    recipe: dict[str, Any] = {**copy.deepcopy(TINY_RECIPE), "model": str(model)}
    for key, value in sections.items():
        base = recipe.get(key)
        recipe[key] = {**base, **value} if isinstance(value, dict) and base else value
    return recipe


def write_recipe(path: Path, data: dict[str, Any]) -> Path:
    """``data`` as a YAML recipe file at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


# short texts of many lengths (1 to 41 characters)
PLAIN_TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine",
    "pack my box with five dozen liquor jugs",
    "to be or not to be, that is the question",
    "hello world",
    "ab",
]


def saved_model_dir(model: torch.nn.Module, path, shard: str | None = None) -> str:
    """``model`` saved at ``path`` (in shards of ``shard``), as a path string."""
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return str(path)


def checkpoint_tensors(directory) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder's safetensors files."""
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


def checkpoint_config(directory) -> dict:
    """A checkpoint's config.json, without the transformers version."""
    data = json.loads((directory / "config.json").read_text())
    data.pop("transformers_version", None)
    return data


def random_plan(model, site: str, fill: str, seed: int = 1) -> PrunePlan:
    """A plan keeping a different, random number of units per layer."""
    widths = site_widths(model, get_adapter(model), site)
    gen = torch.Generator().manual_seed(seed)
    kept = [
        sorted(torch.randperm(w, generator=gen)[: 4 + 3 * i].tolist()) for i, w in enumerate(widths)
    ]
    fill_values = (
        [torch.randn(w, generator=gen).tolist() for w in widths] if fill == "mean" else None
    )
    refit = None
    if fill == "reconstruct":  # any columns and bias: slicing must carry them exactly
        adapter = get_adapter(model)
        d_model = adapter.output_width(adapter.get_layers(model)[0])
        refit = Refit(
            [torch.randn(d_model, len(k), generator=gen) for k in kept],
            [torch.randn(d_model, generator=gen) for _ in kept],
            ridge=0.0,
        )
    return PrunePlan(
        model="tiny",
        model_type=model.config.model_type,
        site=site,
        fill=fill,
        layer_widths=widths,
        kept=kept,
        fill_values=fill_values,
        refit=refit,
    )


def real_logits(model, batch) -> torch.Tensor:
    """The logits at the batch's real (unpadded) positions."""
    with torch.no_grad():
        return model(**batch).logits[batch["attention_mask"].bool()]


BBC_CHOICES = {t: f" {t}" for t in ("business", "entertainment", "politics", "sport", "tech")}


BBC_ALT = {
    "business": " Business",
    "entertainment": " Arts",
    "politics": " Politics",
    "sport": " Sports",
    "tech": " Technology",
}


def bbc_task(**overrides) -> dict:
    """The BBC topics as a labelled task in two wordings, 4 words a prompt: with the tiny
    tokenizer's one token a character, every BBC prompt fits its 64 tokens (54 at most), so
    truncation never cuts the question."""
    task = {
        "name": "bbc-news",
        "source": "builtin:bbc_news",
        "template": "Article: {text}\nTopic:",
        "max_words": 4,
        "choices": BBC_CHOICES,
        "wordings": [{"name": "alt", "template": "Story: {text}\nSection:", "choices": BBC_ALT}],
        "calibration_samples": 8,
        "heldout_samples": 4,
        "heal_samples": 6,
        "max_length": 64,
    }
    task.update(overrides)
    return task


def task_recipe(model: str = "unused", **sections: Any) -> Recipe:
    """The tiny recipe on ``bbc_task``, magnitude-selected, the compact layout; ``sections``
    replace whole sections."""
    base = tiny_recipe(
        model,
        name="tiny-task",
        tasks=[bbc_task()],
        select={"selector": "magnitude"},
        check={"samples": 2},
        save={"layouts": ["compact"]},
        evaluate={"choice_samples": 10, "perplexity_samples": 3},
    )
    return parse_recipe({**base, **sections})
