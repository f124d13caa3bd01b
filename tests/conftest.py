"""Shared fixtures: tiny random models of every supported family, built in code."""

from __future__ import annotations

import os

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

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


def random_batch(seed: int = 0, batch: int = 3, length: int = 10) -> dict[str, torch.Tensor]:
    """Token ids with right padding in all but the first row."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    attention = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        attention[row, length - 2 * row :] = 0
        input_ids[row, length - 2 * row :] = 0
    return {"input_ids": input_ids, "attention_mask": attention}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer (lowercase ASCII) whose ids fit ``VOCAB``; built in code."""
    chars = [chr(c) for c in range(32, 127) if not chr(c).isupper()]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({ch: i + 4 for i, ch in enumerate(chars)})
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="right",
    )
