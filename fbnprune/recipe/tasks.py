"""The ``tasks`` section: where each task's text comes from and how it becomes prompts."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from fbnprune.recipe.base import _Additions, _Strict


def _label_keys(value: object) -> object:
    """Answer labels as text: YAML reads ``0:`` as a number (a .jsonl label 0 is read as
    "0", so it matches), and ``yes:``/``no:`` as booleans, which are refused (quote them)."""
    if not isinstance(value, dict):
        return value
    out = {}
    for key, answer in value.items():
        if isinstance(key, bool):
            raise ValueError(
                f"label {key!r}: YAML reads yes/no/true/false/on/off keys as booleans; quote the "
                "label (e.g. 'yes': ' yes')"
            )
        out[str(key) if isinstance(key, int | float) else key] = answer
    return out


def _distinct_answers(value: dict[str, str]) -> dict[str, str]:
    """Answers a model can tell apart: none empty, no two the same."""
    empty = [label for label, answer in value.items() if not answer.strip()]
    if empty:
        raise ValueError(f"the answer of label(s) {empty} is empty: give each label its words")
    seen: dict[str, str] = {}
    for label, answer in value.items():
        if answer.strip() in seen:
            raise ValueError(
                f"labels {seen[answer.strip()]!r} and {label!r} have the same answer "
                f"{answer!r}: no score could tell them apart"
            )
        seen[answer.strip()] = label
    return value


def _text_slot(value: str) -> str:
    if "{text}" not in value:
        raise ValueError("template must contain the placeholder '{text}'")
    return value


class Wording(_Strict):
    """Another way to ask a task's question: its own template and answer texts per label."""

    name: str = Field(pattern=r"^[A-Za-z0-9_]+$")
    template: str
    choices: dict[str, str] = Field(min_length=2)

    @field_validator("choices", mode="before")
    @classmethod
    def _labels_as_text(cls, value: object) -> object:
        return _label_keys(value)

    @field_validator("choices")
    @classmethod
    def _answers_differ(cls, value: dict[str, str]) -> dict[str, str]:
        return _distinct_answers(value)

    @field_validator("template")
    @classmethod
    def _has_text_slot(cls, value: str) -> str:
        return _text_slot(value)


class GenerationConfig(_Strict):
    """A task whose answer the model writes: each document's target, how the answer ends,
    and how it is scored (``fbnprune.evaluate.generation``)."""

    target_field: str = Field(
        default="target",
        description="key of each .jsonl document's target (a built-in's or an lm-eval "
        "task's documents carry their own)",
    )
    target_template: str = Field(
        default=" {target}",
        description="the text the model must write after the prompt; {target} is the "
        "document's target, {NAME} a .jsonl document's field NAME (e.g. ' {target} {unit}')",
    )
    stop: list[str] = Field(
        default_factory=lambda: ["\n"],
        description="the answer ends before the first of these strings",
    )
    max_new_tokens: int = Field(
        default=16, ge=1, le=1024, description="the longest answer, in tokens"
    )
    metric: Literal["exact_match", "chrf"] = Field(
        default="exact_match",
        description="exact_match (case, whitespace, outer punctuation and a number's format "
        "normalised) or chrf (sacrebleu's chrF, 0-100)",
    )

    @field_validator("target_template")
    @classmethod
    def _has_target_slot(cls, value: str) -> str:
        if not re.search(r"\{[A-Za-z_][A-Za-z0-9_]*\}", value):
            raise ValueError(
                "target_template must contain a placeholder: '{target}' or a field '{NAME}'"
            )
        return value

    @field_validator("stop")
    @classmethod
    def _stops_not_empty(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("a stop sequence must not be empty")
        return value


class TaskConfig(_Additions):
    """One task: where its text comes from and how much of it is used.

    ``source`` is ``builtin:NAME`` (bbc_news, wikipedia, python_code, arithmetic, and the
    labelled small tasks wiki_articles, code_modules, arithmetic_ops),
    ``file:PATH`` (.txt: one document per blank-line-separated block; .jsonl: one object
    per line), ``hf:DATASET`` (Hugging Face ``datasets``; needs the network) or
    ``lmeval:TASK.yaml`` (a multiple-choice lm-eval task: its ``doc_to_text`` is the prompt,
    its ``doc_to_choice`` the answers, ``doc_to_target`` the label; ``fbnprune.data.lmeval``).
    """

    added = ("generation",)  # left out of fingerprints while None

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=64)
    source: str
    template: str = "{text}"
    text_field: str = "text"
    split: str = "train"
    hf_config: str | None = None
    calibration_samples: int = Field(default=64, ge=1)
    heldout_samples: int = Field(default=16, ge=1)
    heal_samples: int = Field(
        default=0,
        ge=0,
        description="further documents for healing only, disjoint from calibration and "
        "held-out (never evaluated on)",
    )
    max_length: int = Field(default=128, ge=8)
    max_words: int | None = Field(
        default=None,
        ge=1,
        description="cut each document to its first N words before the template is applied, "
        "so the question after {text} survives truncation",
    )
    choices: dict[str, str] | None = Field(
        default=None,
        description="label -> answer text (e.g. {sport: ' sport'}): the task is multiple "
        "choice over these answers, the document's label picks the gold one",
    )
    label_field: str = Field(default="label", description="label key of .jsonl documents")
    generation: GenerationConfig | None = Field(
        default=None,
        description="the model writes the answer: a target per document, stop sequences, "
        "a length and a metric (exact_match or chrf), instead of choices",
    )
    wordings: list[Wording] = Field(
        default_factory=list,
        description="other wordings of the same question (template and answers), scored by "
        "evaluate and bench only, so a model tied to one template shows",
    )

    @field_validator("choices", mode="before")
    @classmethod
    def _labels_as_text(cls, value: object) -> object:
        return _label_keys(value)

    @field_validator("choices")
    @classmethod
    def _answers_differ(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return None if value is None else _distinct_answers(value)

    @field_validator("name")
    @classmethod
    def _not_a_path(cls, value: str) -> str:
        if value.startswith("."):
            raise ValueError(
                f"task name {value!r} must not start with '.': it names the task's folders "
                "in the run directory"
            )
        return value

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme, sep, rest = value.partition(":")
        if not sep or scheme not in {"builtin", "file", "hf", "lmeval"} or not rest:
            raise ValueError(
                f"source {value!r} must look like 'builtin:NAME', 'file:PATH', 'hf:DATASET' "
                "or 'lmeval:TASK.yaml'"
            )
        return value

    @field_validator("template")
    @classmethod
    def _has_text_slot(cls, value: str) -> str:
        return _text_slot(value)

    @model_validator(mode="after")
    def _whole_prompts_uncut(self) -> TaskConfig:
        if self.source.startswith("lmeval:") and self.max_words is not None:
            raise ValueError(
                "max_words: an lm-eval task's document is its whole rendered prompt, question "
                "included, so cutting its words would cut the question; leave max_words out "
                "(prompts longer than max_length are refused with the numbers)"
            )
        return self

    @model_validator(mode="after")
    def _one_answer_kind(self) -> TaskConfig:
        if self.generation is not None and self.choices is not None:
            raise ValueError(
                "a task has either choices (the model picks an answer) or generation (the "
                "model writes it), not both"
            )
        if self.generation is not None and self.wordings:
            raise ValueError(
                "wordings: other wordings are scored for multiple-choice tasks only; a "
                "generation task has one template"
            )
        return self

    @model_validator(mode="after")
    def _wordings_match(self) -> TaskConfig:
        for wording in self.wordings:
            if self.choices is None and self.source.startswith("lmeval:"):
                continue  # the lm-eval task's answers are known once it is loaded
            if self.choices is None or set(wording.choices) != set(self.choices):
                raise ValueError(
                    f"wording {wording.name!r}: its choices must answer the task's labels "
                    f"{sorted(self.choices or {})}, got {sorted(wording.choices)}"
                )
        if len({w.name for w in self.wordings}) != len(self.wordings):
            raise ValueError("wording names must be unique")
        return self
