"""The parity check one decoder layer at a time: sliced blocks against the masked original.

Held-out prompts are replayed through the original model block by block (``LayerwiseModel``,
``LayerCalls``), the block masked by the plan (``mask.masked_layer``): the reference
trajectory. A candidate block is run on the same inputs as the original's and their outputs
are compared on the real tokens, so memory holds one block of each model and a wrong unit
shows in the layer that holds it.

- ``slicing_parity``: each block's MLP sliced in memory (``slicing.slice_layer``, every
  layout) in float64 against the same MLP masked by the plan, on the inputs the masked
  reference (in the run's dtype) gives it: the streamed form of the check stage's exactness
  comparison. Only the MLP is sliced, and the block adds its output to the residual, so a
  wrong unit shows in the MLP's output; memory holds one block in the run's dtype, then its
  MLP alone in float64 (at 7B widths a float64 block would be 1.6 GiB).
- ``saved_tensors_parity``: each saved checkpoint's tensors against the original's sliced in
  the run's dtype, bit for bit, block by block; every tensor outside the blocks must be the
  original's, and the model of the saved config must take every tensor as it is shaped. The
  streamed form of the saved-and-reloaded comparison.
- ``layerwise_parity``: a saved checkpoint's blocks against the masked original (both
  upcast), in one pass.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.core_model_loading import revert_weight_conversion

from fbnprune.collect.activations import token_batches
from fbnprune.models.adapters import MLPAdapter, get_adapter
from fbnprune.models.layercalls import capture_layer_calls
from fbnprune.models.onload import Checkpoint, LayerwiseModel, empty_model
from fbnprune.parity import Comparison, ParityReport
from fbnprune.plan import PrunePlan
from fbnprune.pruning.mask import masked_layer
from fbnprune.pruning.slicing import COMPACT_KEY, check_sliceable, slice_layer

# the candidates of block ``index``, given the reference's onloaded block: name -> a module
# that runs as that block (entered before the reference is masked, left after)
Candidates = Callable[[int, nn.Module], contextlib.AbstractContextManager[dict[str, nn.Module]]]


@dataclass(frozen=True)
class LayerParity:
    """Per layer, max |masked original - sliced| of the block's output on the real tokens;
    the tensors outside the blocks that differ from the original's (none when right)."""

    layers: list[float]
    other_tensors_differing: list[str]
    atol: float

    @property
    def worst(self) -> float:
        return max(self.layers)

    @property
    def passed(self) -> bool:
        return self.worst <= self.atol and not self.other_tensors_differing


@dataclass
class _Deltas:
    """Per candidate: max |delta| per layer, and the sum and count of |delta| over all."""

    layers: dict[str, list[float]] = field(default_factory=dict)
    total: dict[str, float] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)
    n_tokens: int = 0

    def add(self, name: str, index: int, delta: torch.Tensor) -> None:
        layers = self.layers.setdefault(name, [])
        if len(layers) == index:
            layers.append(0.0)
        layers[index] = max(layers[index], float(delta.max()))
        self.total[name] = self.total.get(name, 0.0) + float(delta.sum())
        self.count[name] = self.count.get(name, 0) + delta.numel()

    def comparison(self, name: str, atol: float) -> Comparison:
        worst = max(self.layers[name])
        return Comparison(name, worst, self.total[name] / self.count[name], worst <= atol)


@torch.inference_mode()
def _replay(
    reference: LayerwiseModel,
    plan: PrunePlan,
    candidates: Candidates,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    max_length: int,
    batch_size: int,
) -> _Deltas:
    """The masked reference replayed block by block on ``prompts``; each candidate of each
    block run on the reference block's inputs and compared with its output."""
    batches = token_batches(tokenizer, prompts, max_length, batch_size)
    calls = capture_layer_calls(reference.model, batches)
    hidden = calls.inputs
    real = [attention.bool() for _, attention in batches]
    deltas = _Deltas(n_tokens=sum(int(r.sum()) for r in real))
    adapter = reference.adapter
    for index in range(reference.n_layers):
        with (
            reference.onload(index) as block,
            candidates(index, block) as blocks,
            masked_layer(adapter, block, index, plan),
        ):
            for b, x in enumerate(hidden):
                want = calls.replay(block, index, b, x)
                for name, candidate in blocks.items():
                    got = calls.replay(candidate, index, b, x)
                    deltas.add(name, index, (got - want)[real[b]].abs())
                hidden[b] = want
    return deltas


@torch.inference_mode()
def slicing_parity(
    original: str | os.PathLike[str] | LayerwiseModel,
    plan: PrunePlan,
    layouts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    atol: float = 1e-4,
    max_length: int = 128,
    batch_size: int = 4,
    dtype: torch.dtype = torch.float32,
) -> ParityReport:
    """float64, MLP by MLP: each block's MLP of ``original`` (a checkpoint's folder, or a
    model in memory: ``LayerwiseModel.resident``) sliced by ``plan`` in every layout against
    the same MLP masked by ``plan``, on ``prompts``. The masked reference is replayed block
    by block in ``dtype``; each MLP's inputs are recorded, upcast and fed to the float64 MLP
    and its slices. Memory holds one block in ``dtype`` (none more when resident), then one
    float64 MLP and its slices."""
    if isinstance(original, LayerwiseModel):
        reference = original
    else:
        reference = LayerwiseModel.from_checkpoint(original, dtype=dtype)
    adapter = reference.adapter
    for layout in layouts:
        check_sliceable(adapter, plan, layout)
    batches = token_batches(tokenizer, prompts, max_length, batch_size)
    calls = capture_layer_calls(reference.model, batches)
    hidden = calls.inputs
    real = [attention.bool() for _, attention in batches]
    deltas = _Deltas(n_tokens=sum(int(r.sum()) for r in real))
    for index in range(reference.n_layers):
        seen: list[tuple[tuple, dict]] = []
        with reference.onload(index) as block, masked_layer(adapter, block, index, plan):
            mlp = adapter.get_mlp(block)
            handle = mlp.register_forward_pre_hook(
                functools.partial(_record, seen), with_kwargs=True
            )
            try:
                hidden = [calls.replay(block, index, b, x) for b, x in enumerate(hidden)]
            finally:
                handle.remove()
        if len(seen) != len(hidden):
            raise RuntimeError(
                f"block {index} called its MLP {len(seen)} times on {len(hidden)} batches"
            )
        inputs = [_upcast(call) for call in seen]
        with reference.onload_mlp(index, torch.float64) as exact:
            holder = nn.Module()
            setattr(holder, adapter.mlp, exact)
            for layout in layouts:
                sliced = _sliced_mlp(adapter, holder, plan, index, layout)
                got = [_output(sliced(*args, **kwargs)) for args, kwargs in inputs]
                del sliced
                with masked_layer(adapter, holder, index, plan):
                    for b, (args, kwargs) in enumerate(inputs):
                        want = _output(exact(*args, **kwargs))
                        deltas.add(f"sliced-{layout}", index, (got[b] - want)[real[b]].abs())
    comparisons = [deltas.comparison(f"sliced-{layout}", atol) for layout in layouts]
    return ParityReport(
        "masked (MLP by MLP)", atol, deltas.n_tokens, "float64", comparisons=comparisons
    )


def _record(sink: list[tuple[tuple, dict]], _: nn.Module, args: tuple, kwargs: dict) -> None:
    """A forward pre-hook: keep the module's call."""
    sink.append((args, kwargs))


def _upcast(call: tuple[tuple, dict]) -> tuple[tuple, dict]:
    """An MLP call with its floating-point tensors in float64."""

    def up(x: object) -> object:
        return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    args, kwargs = call
    return tuple(up(a) for a in args), {k: up(v) for k, v in kwargs.items()}


def _output(out: object) -> torch.Tensor:
    """An MLP's output tensor (some families return a tuple)."""
    return out[0] if isinstance(out, tuple) else out  # type: ignore[return-value]


def _sliced_mlp(
    adapter: MLPAdapter, block: nn.Module, plan: PrunePlan, index: int, layout: str
) -> nn.Module:
    """Block ``index``'s MLP sliced by ``plan``, the block left as it is. At the hidden
    site the copy is shallow (it shares the activation and every module slicing does not
    replace), so only the sliced projections take new memory."""
    if plan.site == "output":  # the output site zeroes rows in place: a copy of its own
        mlp = copy.deepcopy(adapter.get_mlp(block))
    else:
        mlp = copy.copy(adapter.get_mlp(block))
        mlp._modules = dict(mlp._modules)  # its own table: slicing replaces its projections
    holder = nn.Module()
    setattr(holder, adapter.mlp, mlp)
    slice_layer(adapter, holder, plan, index, layout=layout)
    return adapter.get_mlp(holder)


@torch.inference_mode()
def saved_tensors_parity(
    original: str | os.PathLike[str],
    saved: dict[str, Path],
    plan: PrunePlan,
    *,
    dtype: torch.dtype = torch.float32,
) -> ParityReport:
    """Each saved checkpoint (layout -> folder) against ``plan`` applied to ``original`` in
    ``dtype``, tensor by tensor: max and mean |difference| over every value, which must be
    0 (a missing, extra, reshaped or retyped tensor counts as infinite). Memory holds one
    block and its slices."""
    source = LayerwiseModel.from_checkpoint(original, dtype=dtype)
    assert source.checkpoint is not None
    checkpoints = {layout: Checkpoint(folder) for layout, folder in saved.items()}
    blocks = f"{source.key_prefix}{source.adapter.layers}."
    deltas = _Deltas()
    for index in range(source.n_layers):
        prefix = f"{blocks}{index}."
        with source.onload(index) as block:
            for layout, checkpoint in checkpoints.items():
                name = f"saved-{layout}"
                want = _sliced_block_tensors(source.adapter, block, plan, index, layout)
                keys = {k for k in checkpoint.files if k.startswith(prefix)}
                if keys != {prefix + key for key in want}:
                    deltas.add(name, index, torch.tensor([float("inf")]))
                for key, value in want.items():
                    if prefix + key in checkpoint:
                        deltas.add(name, index, _difference(checkpoint.tensor(prefix + key), value))
    for layout, checkpoint in checkpoints.items():
        wrong = _other_tensors_differing(source.checkpoint, checkpoint, blocks, dtype)
        if wrong or _config_mismatches(checkpoint, dtype):
            deltas.add(f"saved-{layout}", source.n_layers - 1, torch.tensor([float("inf")]))
    comparisons = [deltas.comparison(f"saved-{layout}", 0.0) for layout in saved]
    return ParityReport(
        "sliced (in memory, tensor by tensor)",
        0.0,
        0,
        str(dtype).removeprefix("torch."),
        comparisons=comparisons,
    )


def _sliced_block_tensors(
    adapter: MLPAdapter, block: nn.Module, plan: PrunePlan, index: int, layout: str
) -> dict[str, torch.Tensor]:
    """The state of block ``index`` as the streamed save writes it (``slice_layer`` on a
    copy whose MLP is its own)."""
    mlp = _sliced_mlp(adapter, block, plan, index, layout)
    outside = {k: v for k, v in block.state_dict().items() if not k.startswith(adapter.mlp + ".")}
    return {**outside, **{f"{adapter.mlp}.{k}": v for k, v in mlp.state_dict().items()}}


def _config_mismatches(checkpoint: Checkpoint, dtype: torch.dtype) -> list[str]:
    """What ``from_pretrained`` would find wrong in a saved checkpoint: tensors that the
    model of its config lacks or shapes otherwise, and parameters no tensor fills (tied
    ones once). Built on the meta device: nothing is loaded."""
    folder = checkpoint.directory
    compact = json.loads((folder / "config.json").read_text()).get(COMPACT_KEY) is not None
    model = empty_model(folder, dtype=dtype, trust_remote_code=compact)
    model.tie_weights()
    prefix = get_adapter(model).backbone + "."
    named: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers())
    # The names save_pretrained writes (e.g. gpt_neox's lm_head is saved as embed_out).
    named = revert_weight_conversion(model, named)
    if not any(key in named for key in checkpoint.files):  # a base model's keys
        named = {k.removeprefix(prefix): v for k, v in named.items()}
    problems = [
        key
        for key in checkpoint.files
        if key not in named or tuple(named[key].shape) != checkpoint.shape(key)
    ]
    filled = {id(named[key]) for key in checkpoint.files if key in named}
    problems += [n for n, p in model.named_parameters() if id(p) not in filled]
    return problems


def _difference(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """|got - want| elementwise; ``inf`` when their shapes or dtypes differ."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return torch.tensor([float("inf")])
    if not got.is_floating_point():
        return torch.tensor([0.0 if torch.equal(got, want) else float("inf")])
    return (got.double() - want.double()).abs().flatten()


@torch.inference_mode()
def layerwise_parity(
    original: str | os.PathLike[str],
    sliced: str | os.PathLike[str],
    plan: PrunePlan,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    atol: float = 1e-4,
    max_length: int = 128,
    batch_size: int = 4,
    dtype: torch.dtype = torch.float64,
) -> LayerParity:
    """Compare the sliced checkpoint in ``sliced`` with ``plan`` applied to ``original``,
    one decoder block at a time, on ``prompts`` (in ``dtype``: float64 by default, so
    rounding cannot hide a wrong unit)."""
    compact = json.loads((Path(sliced) / "config.json").read_text()).get(COMPACT_KEY)
    reference = LayerwiseModel.from_checkpoint(original, dtype=dtype)
    candidate = LayerwiseModel.from_checkpoint(
        sliced, dtype=dtype, trust_remote_code=compact is not None
    )

    @contextlib.contextmanager
    def onloaded(index: int, block: nn.Module) -> Iterator[dict[str, nn.Module]]:
        with candidate.onload(index) as other:
            yield {"sliced": other}

    deltas = _replay(
        reference,
        plan,
        onloaded,
        tokenizer,
        prompts,
        max_length=max_length,
        batch_size=batch_size,
    )
    assert reference.checkpoint is not None and candidate.checkpoint is not None
    blocks = f"{reference.key_prefix}{reference.adapter.layers}."
    differing = _other_tensors_differing(reference.checkpoint, candidate.checkpoint, blocks)
    return LayerParity(deltas.layers["sliced"], differing, atol)


def _other_tensors_differing(
    a: Checkpoint, b: Checkpoint, blocks: str, dtype: torch.dtype | None = None
) -> list[str]:
    """The tensors outside the decoder blocks (keys not under ``blocks``) whose names or
    values differ (``a``'s cast to ``dtype`` when given, else to ``b``'s)."""
    left = {k for k in a.files if not k.startswith(blocks)}
    right = {k for k in b.files if not k.startswith(blocks)}
    differ = sorted(left ^ right)
    for key in sorted(left & right):
        x, y = a.tensor(key), b.tensor(key)
        target = dtype if dtype is not None and x.is_floating_point() else y.dtype
        if x.shape != y.shape or y.dtype != target or not torch.equal(x.to(target), y):
            differ.append(key)
    return differ
