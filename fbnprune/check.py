"""Check: prove that a sliced model computes what the masked model computes.

Logits of a reference (e.g. the masked original) are compared with those of each candidate
(sliced in memory, saved-and-reloaded, ...) on held-out text, at real tokens only. A report
gives max and mean |delta| per candidate and fails beyond its stated tolerance.

Exactness is proven in float64: there, masked and sliced models agree to rounding (measured
0.0 on SmolLM2-135M), while in float32 different summation orders alone move logits by up to
~1e-3 after 30 layers. A float32 comparison is therefore reported for information
(``gating=False``), and the saved checkpoint is compared with the in-memory slice in the
model's own dtype.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from fbnprune.collect import token_batches
from fbnprune.errors import FbnpruneError


class ParityError(FbnpruneError, AssertionError):
    """A candidate's logits differ from the reference beyond tolerance."""


@dataclass
class Comparison:
    name: str
    max_abs: float
    mean_abs: float
    passed: bool


@dataclass
class ParityReport:
    """Max and mean |delta logits| of each candidate against the reference."""

    reference: str
    atol: float
    n_tokens: int
    dtype: str = "float32"
    gating: bool = True
    comparisons: list[Comparison] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    @classmethod
    def from_dict(cls, data: dict) -> ParityReport:
        fields = {k: v for k, v in data.items() if k not in ("passed", "comparisons")}
        return cls(**fields, comparisons=[Comparison(**c) for c in data["comparisons"]])

    def table(self) -> str:
        role = "" if self.gating else ", for information"
        lines = [
            f"parity vs {self.reference} in {self.dtype} over {self.n_tokens} tokens "
            f"(atol {self.atol:g}{role}):"
        ]
        for c in self.comparisons:
            status = ("ok" if c.passed else "FAIL") if self.gating else ""
            lines.append(
                f"  {c.name:<22} max|d| {c.max_abs:.3e}  mean|d| {c.mean_abs:.3e}  {status}"
            )
        return "\n".join(lines)


@dataclass
class ParityResult:
    """Several parity reports; passes when every gating report passes.

    ``files`` records, per checked checkpoint folder (``checkpoint-padded``, ...), the sha256
    of each of its files as they were when their logits were compared (``integrity``), so
    that export and resume can prove they read the same bytes.
    """

    reports: list[ParityReport]
    files: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.reports if r.gating)

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "reports": [r.to_dict() for r in self.reports],
            "files": self.files,
        }

    @classmethod
    def from_dict(cls, data: dict) -> ParityResult:
        reports = [ParityReport.from_dict(r) for r in data["reports"]]
        return cls(reports, dict(data.get("files", {})))

    @classmethod
    def parse(cls, data: object) -> ParityResult:
        """``from_dict`` for data read from disk: ``ValueError`` naming what is malformed."""
        try:
            if not isinstance(data, dict):
                raise TypeError(f"a JSON object was expected, not {type(data).__name__}")
            result = cls.from_dict(data)
            for report in result.reports:
                report.atol = float(report.atol)
                for c in report.comparisons:
                    c.max_abs, c.mean_abs = float(c.max_abs), float(c.mean_abs)
            if not all(isinstance(d, dict) for d in result.files.values()):
                raise TypeError("files must map folders to {file: sha256}")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a parity report ({type(exc).__name__}: {exc})") from None
        return result

    def problems(self, atol: float) -> list[str]:
        """Why these figures do not prove parity at tolerance ``atol`` (judged from the
        figures, not from any recorded flag): empty when every gating comparison is finite
        and within both its report's tolerance and ``atol``."""
        gating = [r for r in self.reports if r.gating]
        if not any(r.comparisons for r in gating):
            return ["it holds no gating comparison"]
        out = []
        for r in gating:
            limit = min(r.atol, atol)
            for c in r.comparisons:
                if not math.isfinite(c.max_abs) or c.max_abs > limit:
                    out.append(
                        f"{c.name} vs {r.reference} ({r.dtype}): max|d| {c.max_abs:.3e} > {limit:g}"
                    )
        return out

    def table(self) -> str:
        return "\n".join(r.table() for r in self.reports)

    def worst(self) -> float:
        """Largest max |delta| over the gating comparisons."""
        return max(c.max_abs for r in self.reports if r.gating for c in r.comparisons)

    def raise_if_failed(self) -> None:
        if not self.passed:
            bad = [
                f"{c.name} ({r.dtype}, max|d| {c.max_abs:.2e} > {r.atol:g})"
                for r in self.reports
                if r.gating
                for c in r.comparisons
                if not c.passed
            ]
            raise ParityError("parity check failed: " + ", ".join(bad) + "\n" + self.table())


@torch.inference_mode()
def real_token_logits(
    model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """Logits at real tokens of every batch, concatenated: (n_tokens, vocab) float32."""
    device = next(model.parameters()).device
    out = []
    for input_ids, attention in batches:
        logits = model(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False
        ).logits
        out.append(logits[attention.to(device).bool()].float().cpu())
    return torch.cat(out)


def check_parity(
    reference: tuple[str, nn.Module, Callable[[], contextlib.AbstractContextManager] | None],
    candidates: Mapping[str, nn.Module],
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    atol: float = 1e-4,
    max_length: int = 128,
    batch_size: int = 4,
    gating: bool = True,
) -> ParityReport:
    """Compare each candidate's logits with the reference's on ``prompts``.

    Args:
        reference: (name, model, context) where ``context()`` (e.g. ``masked(model, plan)``)
            is entered while the reference runs; ``None`` for no context.
        candidates: name -> model to compare.
        tokenizer: shared tokenizer.
        prompts: held-out texts.
        atol: largest allowed max |delta logits|.
        gating: whether a failure of this report fails the check.
    """
    batches = token_batches(tokenizer, prompts, max_length, batch_size)
    name, model, context = reference
    with context() if context is not None else contextlib.nullcontext():
        ref = real_token_logits(model, batches)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    report = ParityReport(name, atol, ref.shape[0], dtype=dtype, gating=gating)
    for cand_name, cand in candidates.items():
        delta = (real_token_logits(cand, batches) - ref).abs()
        max_abs, mean_abs = float(delta.max()), float(delta.mean())
        report.comparisons.append(Comparison(cand_name, max_abs, mean_abs, max_abs <= atol))
    return report
