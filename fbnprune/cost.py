"""Cost: what a pruned model costs against the original, measured in one process.

Per model: unique parameters, bytes of the safetensors checkpoint ``save_checkpoint`` writes,
the peak extra memory of one prefill + decode run, and prefill and decode throughput.

Throughput comes from a greedy loop that does what ``generate(do_sample=False)`` does with a
``DynamicCache``, timed in two parts: the prefill (one forward over the prompt batch, logits
of the last position only) and the decode (``new_tokens - 1`` single-token forwards, each
making one token). The models are measured interleaved, a round over all of them per repeat
with the order rotated each round, so that machine noise hits every model alike; the figures
are medians and the per-repeat times are kept.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import inspect
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import psutil
import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.utils import logging as hf_logging

from fbnprune.models.size import count_parameters
from fbnprune.rundir import measure
from fbnprune.save.checkpoint import checkpoint_bytes, save_checkpoint

MiB = 2**20


@dataclass
class Cost:
    """What one model costs.

    Attributes:
        parameters: unique parameters (tied weights counted once).
        safetensors_bytes: size of the ``*.safetensors`` files ``save_checkpoint`` writes.
        peak_memory_mib: peak memory of one prefill + decode run above what was held before it
            (KV cache, activations, logits; the weights are not included). CPU: peak resident
            memory; CUDA: ``torch.cuda.max_memory_allocated``.
        prefill_tokens_per_s: prompt tokens (all rows) / median prefill time.
        decode_tokens_per_s: generated tokens after the first (all rows) / median decode time.
        device: where it ran.
        prompt_tokens, new_tokens, batch_size, threads: the settings measured with.
        prefill_seconds, decode_seconds: per-repeat times, in the order measured.
    """

    parameters: int
    safetensors_bytes: int
    peak_memory_mib: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    device: str
    prompt_tokens: int
    new_tokens: int
    batch_size: int
    threads: int
    prefill_seconds: list[float] = field(default_factory=list)
    decode_seconds: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def decode_range(self) -> tuple[float, float]:
        """Slowest and fastest decode tokens/s over the repeats."""
        return _rate_range(self.batch_size * (self.new_tokens - 1), self.decode_seconds)

    def prefill_range(self) -> tuple[float, float]:
        """Slowest and fastest prefill tokens/s over the repeats."""
        return _rate_range(self.batch_size * self.prompt_tokens, self.prefill_seconds)


def _rate_range(tokens: int, seconds: list[float]) -> tuple[float, float]:
    return tokens / max(seconds), tokens / min(seconds)


def safetensors_bytes(model: PreTrainedModel) -> int:
    """Bytes of the ``*.safetensors`` files of ``model`` saved by ``save_checkpoint``.

    The model is saved to a temporary directory, so the figure is exact (tied weights stored
    once, header included) for padded and compact layouts alike.
    """
    with tempfile.TemporaryDirectory(prefix="fbnprune-cost-") as tmp, _no_progress_bars():
        directory = save_checkpoint(model, None, Path(tmp) / "checkpoint")
        return checkpoint_bytes(directory)


def prompt_ids(
    vocab_size: int, *, prompt_tokens: int, batch_size: int, seed: int = 0
) -> torch.Tensor:
    """Fixed random token ids of shape (batch_size, prompt_tokens); same seed, same ids."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch_size, prompt_tokens), generator=gen)


@torch.inference_mode()
def timed_greedy(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    new_tokens: int,
    *,
    after_prefill: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, float, float]:
    """Greedy-generate ``new_tokens`` after ``input_ids`` (no padding) with a KV cache;
    ``after_prefill`` runs between the two timed parts (outside both).

    Returns:
        ``(tokens, prefill_seconds, decode_seconds)``: tokens of shape
        (batch, new_tokens), as ``model.generate(do_sample=False)`` would give them with no
        stopping; the prefill makes the first token, the decode the other ``new_tokens - 1``.
    """
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be at least 2 (one decode step), got {new_tokens}")
    device = input_ids.device
    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    # transformers 5 names the cache argument ``cache`` (``past_key_values`` is deprecated)
    cache_key = "cache" if _accepts(model, "cache") else "past_key_values"
    cache = {cache_key: DynamicCache(config=model.config)}
    tokens = []

    _sync(device)
    start = time.perf_counter()
    out = model(input_ids=input_ids, use_cache=True, **cache, **extra)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    tokens.append(token)
    _sync(device)
    prefilled = time.perf_counter()
    if after_prefill is not None:
        after_prefill()
    decoding = time.perf_counter()
    for _ in range(new_tokens - 1):
        out = model(input_ids=token, use_cache=True, **cache)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
    _sync(device)
    done = time.perf_counter()
    return torch.cat(tokens, dim=1), prefilled - start, done - decoding


def measure_costs(
    models: Mapping[str, PreTrainedModel],
    *,
    prompt_tokens: int = 128,
    new_tokens: int = 32,
    batch_size: int = 1,
    repeats: int = 5,
    warmup: int = 1,
    device: str | torch.device | None = None,
    threads: int | None = None,
    seed: int = 0,
) -> dict[str, Cost]:
    """Measure every model on the same prompts, interleaved, in this process.

    Args:
        models: name -> causal LM (e.g. ``original``, ``sliced-padded``, ``sliced-compact``).
        prompt_tokens: tokens per prompt (random ids, no padding).
        new_tokens: tokens generated per prompt, greedily; at least 2.
        batch_size: prompts per run.
        repeats: timed runs per model; the figures are medians.
        warmup: untimed runs per model first.
        device: move the models there (in place) first; default: where each model is.
        threads: ``torch.set_num_threads`` while measuring (restored afterwards).
        seed: of the prompt ids.

    Returns:
        name -> ``Cost``, in the order of ``models``.
    """
    if not models:
        raise ValueError("no models to measure")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be at least 2 (one decode step), got {new_tokens}")
    names = list(models)
    vocab = min(
        cast(nn.Embedding, m.get_input_embeddings()).num_embeddings for m in models.values()
    )
    ids = prompt_ids(vocab, prompt_tokens=prompt_tokens, batch_size=batch_size, seed=seed)

    with _threads(threads), _eval_mode(models.values()):
        placed = {}
        for name, model in models.items():
            if device is not None:
                # PreTrainedModel.to is wrapped by functools.wraps, typed as unbound (typeshed)
                model.to(device)  # type: ignore[arg-type]
            placed[name] = ids.to(next(model.parameters()).device)

        def run(name: str) -> tuple[float, float]:
            _, prefill, decode = timed_greedy(models[name], placed[name], new_tokens)
            return prefill, decode

        for name in names:
            for _ in range(warmup):
                run(name)
        peaks = {}
        for name in names:
            peaks[name] = _peak_memory_mib(placed[name].device, functools.partial(run, name))
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
        for repeat in range(repeats):
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:
                times[name].append(run(name))
        used_threads = torch.get_num_threads()

    costs = {}
    for name in names:
        prefill = [t[0] for t in times[name]]
        decode = [t[1] for t in times[name]]
        costs[name] = Cost(
            parameters=count_parameters(models[name]),
            safetensors_bytes=safetensors_bytes(models[name]),
            peak_memory_mib=peaks[name],
            prefill_tokens_per_s=batch_size * prompt_tokens / statistics.median(prefill),
            decode_tokens_per_s=batch_size * (new_tokens - 1) / statistics.median(decode),
            device=str(placed[name].device),
            prompt_tokens=prompt_tokens,
            new_tokens=new_tokens,
            batch_size=batch_size,
            threads=used_threads,
            prefill_seconds=prefill,
            decode_seconds=decode,
        )
    return costs


def costs_markdown(costs: Mapping[str, Cost], reference: str = "original") -> str:
    """A markdown table, one row per model, with ratios against ``reference``.

    ``params`` and ``bytes`` ratios are model / reference (smaller is cheaper); speed-ups are
    model tokens/s / reference tokens/s (larger is faster). Throughput cells show the median
    and, in brackets, the slowest and fastest repeat.
    """
    if reference not in costs:
        raise ValueError(f"reference {reference!r} is not among the models {list(costs)}")
    ref = costs[reference]
    lines = [
        "| model | params (M) | params × | safetensors (MiB) | bytes × | peak extra memory (MiB) "
        "| prefill tok/s | prefill speed-up | decode tok/s | decode speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, c in costs.items():
        lines.append(
            f"| {name} | {c.parameters / 1e6:.2f} | {c.parameters / ref.parameters:.3f} "
            f"| {c.safetensors_bytes / MiB:.1f} "
            f"| {c.safetensors_bytes / ref.safetensors_bytes:.3f} | {c.peak_memory_mib:.1f} "
            f"| {_rate(c.prefill_tokens_per_s, c.prefill_range())} "
            f"| {c.prefill_tokens_per_s / ref.prefill_tokens_per_s:.2f}x "
            f"| {_rate(c.decode_tokens_per_s, c.decode_range())} "
            f"| {c.decode_tokens_per_s / ref.decode_tokens_per_s:.2f}x |"
        )
    return "\n".join(lines)


def _rate(median: float, spread: tuple[float, float]) -> str:
    return f"{median:.1f} ({spread[0]:.1f}–{spread[1]:.1f})"


def _accepts(model: nn.Module, argument: str) -> bool:
    return argument in inspect.signature(model.forward).parameters


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_mib(device: torch.device, fn: Callable[[], Any]) -> float:
    """Peak memory of ``fn()`` above what was in use when it started, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / MiB
    _release_free_heap()  # so that freed memory kept by malloc does not hide the peak
    before = psutil.Process().memory_info().rss
    if _reset_peak_rss():
        fn()
        return max(0, _peak_rss() - before) / MiB
    with measure(interval=0.002) as result:  # no resettable kernel peak: sample instead
        fn()
    return max(0.0, result["peak_rss_mib"] - before / MiB)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) of this process (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _release_free_heap() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _eval_mode(models: Any) -> Iterator[None]:
    modes = [(m, m.training) for m in models]
    for model, _ in modes:
        model.eval()
    try:
        yield
    finally:
        for model, training in modes:
            model.train(training)


TIMED_PARTS = ("embedding", "attention", "mlp", "lm_head")


@torch.inference_mode()
def component_seconds(
    model: PreTrainedModel, input_ids: torch.Tensor, new_tokens: int
) -> dict[str, dict[str, float]]:
    """Where a greedy run's time goes: seconds per part (``TIMED_PARTS``; ``attention`` is
    each block's time less its MLP's, so it holds the block's norms and residual adds;
    ``other`` the rest, e.g. the final norm, the cache and the argmax) in the prefill and
    in the decode, timed by forward hooks on the CPU (hooks synchronise nothing: CPU only)."""
    from fbnprune.models.adapters import get_adapter

    adapter = get_adapter(model)
    blocks = adapter.get_layers(model)
    timed = {
        "embedding": [model.get_input_embeddings()],
        "lm_head": [m for m in [model.get_output_embeddings()] if m is not None],
        "block": blocks,
        "mlp": [adapter.get_mlp(b) for b in blocks],
    }
    seconds = dict.fromkeys(timed, 0.0)
    started: dict[int, float] = {}
    handles = []
    for part, modules in timed.items():
        for module in modules:

            def pre(m: nn.Module, *_: Any) -> None:
                started[id(m)] = time.perf_counter()

            def post(m: nn.Module, *_: Any, part: str = part) -> None:
                seconds[part] += time.perf_counter() - started.pop(id(m))

            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    prefill_seconds: dict[str, float] = {}

    def split() -> None:  # the prefill's seconds kept, the decode's counted from zero
        prefill_seconds.update(seconds)
        seconds.update(dict.fromkeys(seconds, 0.0))

    try:
        _, prefill, decode = timed_greedy(model, input_ids, new_tokens, after_prefill=split)
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for phase, part_seconds, total in (
        ("prefill", prefill_seconds, prefill),
        ("decode", seconds, decode),
    ):
        parts = {
            "embedding": part_seconds["embedding"],
            "attention": part_seconds["block"] - part_seconds["mlp"],
            "mlp": part_seconds["mlp"],
            "lm_head": part_seconds["lm_head"],
        }
        out[phase] = {**parts, "other": total - sum(parts.values()), "total": total}
    return out
