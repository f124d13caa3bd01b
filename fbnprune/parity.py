"""Parity reports: how far each candidate's logits are from the reference's, and whether
that proves the slice (``ParityReport``, ``ParityResult``). Plain data, below everything that
writes or reads ``parity.json``; ``fbnprune.check.compare`` computes them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fbnprune.errors import FbnpruneError
from fbnprune.integrity import digest_mismatches


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
    that export and resume can prove they read the same bytes. ``tokenization``, with a
    vocabulary cut, records per set of prompts how the trimmed tokenizer writes them
    (``tokenizer_trim.tokenization_parity``); each must pass.
    """

    reports: list[ParityReport]
    files: dict[str, dict[str, str]] = field(default_factory=dict)
    tokenization: dict[str, dict[str, Any]] | None = None

    @property
    def passed(self) -> bool:
        tokens = self.tokenization or {}
        return all(r.passed for r in self.reports if r.gating) and all(
            t["passed"] for t in tokens.values()
        )

    def to_dict(self) -> dict:
        data = {
            "passed": self.passed,
            "reports": [r.to_dict() for r in self.reports],
            "files": self.files,
        }
        if self.tokenization is not None:
            data["tokenization"] = self.tokenization
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ParityResult:
        reports = [ParityReport.from_dict(r) for r in data["reports"]]
        return cls(reports, dict(data.get("files", {})), data.get("tokenization"))

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
        for prompts, t in (self.tokenization or {}).items():
            if not t["passed"]:
                out.append(f"the trimmed tokenizer does not write the {prompts} prompts as before")
        return out

    def table(self) -> str:
        lines = [r.table() for r in self.reports]
        for prompts, t in (self.tokenization or {}).items():
            lines.append(
                f"tokenization of {t['texts']} {prompts} prompts: {t['in_vocabulary']} made of "
                f"kept tokens, {t['identical']} of them tokenized as before (renumbered); "
                f"{t['round_trip']} decode as before"
            )
        return "\n".join(lines)

    def worst(self) -> float:
        """Largest max |delta| over the gating comparisons."""
        return max(c.max_abs for r in self.reports if r.gating for c in r.comparisons)

    def mismatches(self, folder: Path) -> list[str]:
        """What differs between ``folder`` and the digests recorded for it (``files``):
        one line per missing, changed or added file; every file when none were recorded."""
        return digest_mismatches(folder, self.files.get(folder.name, {}))

    def raise_if_failed(self) -> None:
        if not self.passed:
            bad = [
                f"{c.name} ({r.dtype}, max|d| {c.max_abs:.2e} > {r.atol:g})"
                for r in self.reports
                if r.gating
                for c in r.comparisons
                if not c.passed
            ]
            bad += [
                f"tokenization of the {name} prompts"
                for name, t in (self.tokenization or {}).items()
                if not t["passed"]
            ]
            raise ParityError("parity check failed: " + ", ".join(bad) + "\n" + self.table())
