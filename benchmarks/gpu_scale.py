"""A real-width Llama-shaped model on one device: collect, discover, heal (``gpu.sh``).

Usage: python benchmarks/gpu_scale.py [--device cuda] [--layers 4] [--tokens 16384]
       [--seq 512] [--batch 16] [--heal-steps 20] [--out FILE] [--tiny]

Builds a random Llama in code at 7B widths (hidden 4096, intermediate 11008, 32 heads;
``--layers`` decoder layers; ``--tiny``: hidden 64, intermediate 176 for a CPU dry run), and
measures on ``--device``, in bfloat16 (float32 on CPU):

- forward tokens/s: the backbone over the calibration batches, no hooks (the ceiling);
- collect tokens/s into memory (float32 matrix) and into the zarr store (float16), and
  their ratios to the forward;
- discover seconds: ``DaskGroupICA`` on the store (CPU, ``--memory``), and the in-memory
  ``GroupICA`` when ``--in-memory`` is given;
- heal steps/s: ``heal_model`` (full fine-tuning of the MLPs) of the slice at ``--budget``
  against the original, ``--heal-steps`` steps.

Every figure is printed and written as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import string
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer built in code (no download)."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({ch: i + 4 for i, ch in enumerate(string.ascii_lowercase + " .,")})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def build_model(tiny: bool, layers: int, dtype: torch.dtype, device: str) -> LlamaForCausalLM:
    widths = (
        dict(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=4)
        if tiny
        else dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_attention_heads=32,
            num_key_value_heads=32,
        )
    )
    config = LlamaConfig(
        vocab_size=32000,
        num_hidden_layers=layers,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        max_position_embeddings=4096,
        **widths,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def prompts(n: int, chars: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = string.ascii_lowercase + " " * 5
    return ["".join(rng.choice(alphabet) for _ in range(chars)) for _ in range(n)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def forward_tokens_per_second(model, tokenizer, texts, seq: int, batch: int, device: str):
    from fbnprune.collect.activations import token_batches

    batches = token_batches(tokenizer, texts, seq, batch)
    backbone = model.model
    backbone(input_ids=batches[0][0].to(device), attention_mask=batches[0][1].to(device))  # warm
    sync(device)
    start = time.perf_counter()
    tokens = 0
    for input_ids, attention in batches:
        backbone(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False
        )
        tokens += int(attention.sum())
    sync(device)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny widths: a CPU dry run")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16384, help="calibration tokens")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sample")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--components", type=int, default=128)
    parser.add_argument("--memory", default="8GiB", help="the dask discover's budget")
    parser.add_argument("--in-memory", action="store_true", help="also time GroupICA")
    parser.add_argument("--budget", type=float, default=0.25, help="fraction of units kept")
    parser.add_argument("--heal-steps", type=int, default=20)
    parser.add_argument("--heal-batch", type=int, default=4)
    parser.add_argument("--work", type=Path, help="where the store goes (default: temporary)")
    parser.add_argument("--out", type=Path, default=Path("gpu_scale.json"))
    args = parser.parse_args()
    from fbnprune.collect.activations import collect_activations
    from fbnprune.collect.to_store import collect_to_store
    from fbnprune.discover.dask_ica import DaskGroupICA
    from fbnprune.discover.group_ica import GroupICA
    from fbnprune.plan import PrunePlan
    from fbnprune.pruning.slicing import slice_model
    from fbnprune.recipe import HealConfig
    from fbnprune.select.selection import allocate, layer_bounds

    on_gpu = args.device.startswith("cuda")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    figures: dict = {
        "device": args.device,
        "dtype": str(dtype),
        "host": platform.node(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    if on_gpu:
        figures["gpu"] = torch.cuda.get_device_name(0)

    def report(name: str, value) -> None:
        figures[name] = value
        print(f"{name}: {value}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2) + "\n")  # after every figure

    start = time.perf_counter()
    model = build_model(args.tiny, args.layers, dtype, args.device)
    tokenizer = char_tokenizer()
    report("build_seconds", round(time.perf_counter() - start, 1))
    report("parameters", sum(p.numel() for p in model.parameters()))
    texts = prompts(max(1, args.tokens // args.seq), args.seq)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-scale-"))

    report(
        "forward_tokens_per_second",
        round(
            forward_tokens_per_second(model, tokenizer, texts, args.seq, args.batch, args.device)
        ),
    )
    acts = collect_activations(
        model, tokenizer, texts, max_length=args.seq, batch_size=args.batch, progress=False
    )
    report("collect_memory_tokens_per_second", round(acts.tokens_per_second))
    report(
        "matrix",
        {
            "tokens": int(acts.n_tokens),
            "neurons": int(acts.matrix.shape[1]),
            "float32_gib": round(acts.matrix.nbytes / 2**30, 2),
        },
    )
    stored = collect_to_store(
        model,
        tokenizer,
        texts,
        work / "activations.zarr",
        max_length=args.seq,
        batch_size=args.batch,
        progress=False,
    )
    report("collect_zarr_tokens_per_second", round(stored.tokens_per_second))
    forward = figures["forward_tokens_per_second"]
    report(
        "collect_vs_forward",
        {
            "memory": round(acts.tokens_per_second / forward, 3),
            "zarr": round(stored.tokens_per_second / forward, 3),
        },
    )
    matrix = acts.matrix
    del acts

    start = time.perf_counter()
    ica = DaskGroupICA(n_components=args.components, memory=args.memory).fit(stored.store)
    report("discover_dask_seconds", round(time.perf_counter() - start, 1))
    report(
        "discover_dask",
        {
            "block_rows": ica.block_rows_,
            "cached": ica.cached_,
            "n_iter": ica.n_iter_,
            "converged": bool(ica.converged_),
        },
    )
    if args.in_memory:
        start = time.perf_counter()
        GroupICA(n_components=args.components).fit(matrix)
        report("discover_memory_seconds", round(time.perf_counter() - start, 1))
    del matrix

    scores = ica.neuron_scores()
    widths = stored.layer_widths
    kept = allocate([scores[a:b] for a, b in layer_bounds(widths)], args.budget)
    plan = PrunePlan(
        model="random-llama",
        model_type="llama",
        site="hidden",
        fill="zero",
        layer_widths=list(widths),
        kept=kept,
        provenance={},
    )
    student = slice_model(copy.deepcopy(model), plan, layout="compact").train()
    cfg = HealConfig(
        steps=args.heal_steps,
        batch_size=args.heal_batch,
        max_length=args.seq,
        eval_every=10**6,
        checkpoint_every=10**6,
        max_minutes=None,
    )
    from fbnprune.heal.train import heal_model

    heal_texts = texts[: args.heal_batch * 4]
    sync(args.device)
    start = time.perf_counter()
    _, log = heal_model(student, model, tokenizer, heal_texts, cfg, progress=False)
    sync(args.device)
    report(
        "heal",
        {
            "steps": log.steps,
            "seconds_total": round(time.perf_counter() - start, 1),
            "train_seconds": round(log.seconds, 1),
            "steps_per_second": round(log.steps / log.seconds, 3) if log.seconds else None,
            "loss_first": log.train_loss[0],
            "loss_last": log.train_loss[-1],
        },
    )
    if on_gpu:
        report("gpu_peak_gib", round(torch.cuda.max_memory_allocated() / 2**30, 2))
    import resource

    report("cpu_peak_rss_gib", round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))


if __name__ == "__main__":
    main()
