"""Task text: read documents from a source and split them into calibration and held-out sets.

A source is ``builtin:NAME`` (offline corpora, see ``fbnprune.data.corpora``), ``file:PATH``
(``.txt``: blank-line-separated documents; ``.jsonl``: one JSON object per line) or
``hf:DATASET`` (Hugging Face ``datasets``, needs the network). ``load_task`` turns a
``TaskConfig`` into a ``TaskData`` whose two splits are disjoint and fixed by the seed.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fbnprune.data import corpora
from fbnprune.data.document import DataError, Document
from fbnprune.hashing import digest
from fbnprune.recipe import GenerationConfig, TaskConfig

logger = logging.getLogger(__name__)


TEMPLATE_SLOT = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")  # a target template's {name}
Split = Literal["calibration", "heldout", "heal"]
SPLITS: tuple[Split, ...] = ("calibration", "heldout", "heal")


def cut_words(text: str, n: int | None) -> str:
    """The first ``n`` whitespace-separated words of ``text`` joined by single spaces (the
    whole text, unchanged, when ``n`` is None)."""
    return text if n is None else " ".join(text.split()[:n])


def prompt_key(template: str, text: str, max_words: int | None = None) -> str:
    """What the model is shown, folded: the rendered prompt, case- and whitespace-folded.
    Two documents with one key (the same first ``max_words`` words, or a case-only
    difference) are the same prompt, so they never land in two splits."""
    return " ".join(render(template, text, max_words).casefold().split())


def task_prompt_key(task: TaskConfig) -> Callable[[str], str]:
    """``prompt_key`` with ``task``'s template and ``max_words``: text -> its folded prompt."""
    return functools.partial(prompt_key, task.template, max_words=task.max_words)


def render(template: str, text: str, max_words: int | None = None) -> str:
    """``template`` with ``{text}`` replaced by ``text`` cut to ``max_words`` (braces in the
    text are safe)."""
    return template.replace("{text}", cut_words(text, max_words))


@dataclass(frozen=True)
class TaskData:
    """A task's documents per split and how they become prompts.

    ``calibration`` feeds collect, discover, select and the refit; ``heldout`` the parity
    check and healing's validation loss; ``heal`` (optional, further in-domain documents)
    healing only. ``choices`` (label -> answer text) makes the task multiple choice: the
    prompt is the question, the answer follows it; ``generation`` makes it a task whose
    answer the model writes: each document's target follows its prompt.
    """

    name: str
    template: str
    calibration: list[Document]
    heldout: list[Document]
    heal: list[Document] = field(default_factory=list)
    max_words: int | None = None
    choices: dict[str, str] | None = None
    generation: GenerationConfig | None = None

    def split(self, split: Split) -> list[Document]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        return getattr(self, split)

    def prompt(self, doc: Document) -> str:
        return render(self.template, doc.text, self.max_words)

    def target(self, doc: Document) -> str | None:
        """What a generation task's model must write after ``doc``'s prompt (None for
        other tasks)."""
        if self.generation is None:
            return None
        return document_target(self.generation, doc)

    def gold_answer(self, doc: Document) -> str | None:
        """The answer text of ``doc``'s label (None without choices or a label; a
        generation task's answer is its ``target``)."""
        if self.choices is None or doc.label is None:
            return None
        return self.choices.get(doc.label)

    def prompts(self, split: Split) -> list[str]:
        """The template applied to every document of ``split``."""
        return [self.prompt(doc) for doc in self.split(split)]

    def texts(self, split: Split) -> list[str]:
        """What calibration reads of ``split``: the prompts, each followed by its target
        for a generation task (the tokens the model must produce)."""
        return [self.prompt(doc) + (self.target(doc) or "") for doc in self.split(split)]

    def document_ids(self) -> dict[str, list[str]]:
        """The ids of every split's documents."""
        return {split: [d.id for d in self.split(split)] for split in SPLITS}

    def fingerprint(self, *, heal: bool = True) -> str:
        """sha256 (first 16 hex digits) of the name, template and the splits' ids and texts
        (and of the answer format, and with ``heal`` of the healing documents, where the
        task has them)."""
        content: dict[str, Any] = {
            "name": self.name,
            "template": self.template,
            "calibration": [[d.id, d.text] for d in self.calibration],
            "heldout": [[d.id, d.text] for d in self.heldout],
        }
        if heal and self.heal:
            content["heal"] = [[d.id, d.text] for d in self.heal]
        if self.max_words is not None:
            content["max_words"] = self.max_words
        if self.choices is not None:
            content["choices"] = self.choices
        if self.generation is not None:
            content["generation"] = self.generation.model_dump()
            content["targets"] = [self.target(d) for d in self.calibration + self.heldout]
        return digest(json.dumps(content, ensure_ascii=False).encode())


# --- built-in corpora -----------------------------------------------------------------------


def _builtin(reader: Callable[[], tuple[corpora.Record, ...]]) -> Callable[[], list[Document]]:
    def load() -> list[Document]:
        return [Document(id=i, text=t, label=lab) for i, t, lab in reader()]

    load.__name__ = reader.__name__
    load.__doc__ = reader.__doc__
    return load


BUILTIN_SOURCES: dict[str, Callable[[], list[Document]]] = {
    name: _builtin(reader) for name, reader in corpora.READERS.items()
}


def _load_builtin(name: str) -> list[Document]:
    if name not in BUILTIN_SOURCES:
        known = ", ".join(sorted(BUILTIN_SOURCES))
        close = difflib.get_close_matches(name, BUILTIN_SOURCES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise DataError(f"unknown built-in corpus {name!r} (known: {known}){hint}")
    try:
        return BUILTIN_SOURCES[name]()
    except (OSError, ModuleNotFoundError) as exc:
        raise DataError(f"built-in corpus {name!r} could not be read: {exc}") from exc


# --- files ----------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(
            f"file not found: {path} (a relative file: path in a recipe is "
            "resolved against the recipe's folder)"
        )
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def _load_txt(path: Path) -> list[Document]:
    """Documents separated by one or more blank lines."""
    blocks, current = [], []
    for line in _read_text(path).splitlines():
        if line.strip():
            current.append(line.rstrip())
        elif current:
            blocks.append("\n".join(current))
            current = []
    if current:
        blocks.append("\n".join(current))
    return [Document(id=f"file:{i}", text=text) for i, text in enumerate(blocks)]


def _jsonl_record(line: str, where: str, text_field: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg})") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if text_field not in obj:
        raise DataError(f"{where}: no {text_field!r} key (keys: {', '.join(sorted(obj))})")
    if not isinstance(obj[text_field], str):
        raise DataError(f"{where}: {text_field!r} must be a string")
    return obj


def _load_jsonl(
    path: Path, text_field: str, label_field: str = "label", target_field: str | None = None
) -> list[Document]:
    """One JSON object per line: text in ``text_field``, optional ``id``, label (in
    ``label_field``) and, for a generation task, target (in ``target_field``: required)."""
    docs: list[Document] = []
    # JSON Lines ends a record at "\n" only: U+2028 or U+0085 inside a string is text
    for lineno, line in enumerate(_read_text(path).split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        obj = _jsonl_record(line, f"{path}:{lineno}", text_field)
        doc_id = str(obj["id"]) if obj.get("id") is not None else f"file:{len(docs)}"
        label = None if obj.get(label_field) is None else str(obj[label_field])
        target: str | None = None
        fields: tuple[tuple[str, str], ...] = ()
        if target_field is not None:  # a generation task: its target and fields
            value = obj.get(target_field)
            if value is not None and not _scalar(value):
                raise DataError(
                    f"{path}:{lineno}: the generation task's target {target_field!r} must be "
                    f"text or a number, got {value!r}"
                )
            target = None if value is None else str(value)
            fields = tuple((k, str(v)) for k, v in obj.items() if k != text_field and _scalar(v))
        docs.append(
            Document(id=doc_id, text=obj[text_field], label=label, target=target, fields=fields)
        )
    return docs


def _scalar(value: object) -> bool:
    """Text or a number (not a boolean): what a target template can hold."""
    return isinstance(value, str | int | float) and not isinstance(value, bool)


def _load_file(
    path: Path, text_field: str, label_field: str, target_field: str | None = None
) -> list[Document]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        if target_field is not None:
            raise DataError(f"{path}: a generation task needs targets; use a .jsonl file")
        return _load_txt(path)
    if suffix == ".jsonl":
        return _load_jsonl(path, text_field, label_field, target_field)
    raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r}; use .txt or .jsonl")


# --- Hugging Face datasets ------------------------------------------------------------------


def _label_name(features: Any, value: Any) -> str | None:
    if value is None:
        return None
    feature = features.get("label") if features is not None else None
    if isinstance(value, int) and feature is not None and hasattr(feature, "int2str"):
        return str(feature.int2str(value))
    return str(value)


def _load_hf(
    name: str, text_field: str, split: str, hf_config: str | None, target_field: str | None
) -> list[Document]:
    try:
        import datasets
    except ModuleNotFoundError as exc:
        raise DataError(
            f"source 'hf:{name}' needs the Hugging Face 'datasets' package and the network: "
            "pip install datasets"
        ) from exc
    try:
        table = datasets.load_dataset(name, hf_config, split=split)
    except Exception as exc:  # datasets raises many types (network, config, split)
        where = f"hf:{name} (config={hf_config}, split={split})"
        raise DataError(f"could not load {where}: {exc}") from exc
    if text_field not in table.column_names:
        columns = ", ".join(table.column_names)
        raise DataError(f"hf:{name}: no column {text_field!r} (columns: {columns})")
    labels = table["label"] if "label" in table.column_names else [None] * len(table)
    if target_field is not None and target_field not in table.column_names:
        columns = ", ".join(table.column_names)
        raise DataError(f"hf:{name}: no target column {target_field!r} (columns: {columns})")
    targets = [None] * len(table) if target_field is None else table[target_field]
    return [
        Document(
            id=f"{name}/{split}/{i}",
            text=str(text),
            label=_label_name(table.features, lab),
            target=None if target is None else str(target),
        )
        for i, (text, lab, target) in enumerate(
            zip(table[text_field], labels, targets, strict=True)
        )
    ]


# --- public API -----------------------------------------------------------------------------


def load_documents(
    source: str,
    *,
    text_field: str = "text",
    label_field: str = "label",
    split: str = "train",
    hf_config: str | None = None,
    target_field: str | None = None,
) -> list[Document]:
    """All documents of ``source`` in source order; raise ``DataError`` if there are none.

    ``text_field`` names the text key of ``.jsonl`` files and Hugging Face datasets; ``split``
    and ``hf_config`` apply to Hugging Face datasets only; ``target_field`` (a generation
    task's) the target key of ``.jsonl`` files.
    """
    scheme, sep, rest = source.partition(":")
    if not sep or not rest:
        raise DataError(
            f"source {source!r} must look like 'builtin:NAME', 'file:PATH' or 'hf:DATASET'"
        )
    if scheme == "builtin":
        docs = _load_builtin(rest)
    elif scheme == "file":
        docs = _load_file(Path(rest).expanduser(), text_field, label_field, target_field)
    elif scheme == "hf":
        docs = _load_hf(rest, text_field, split, hf_config, target_field)
    elif scheme == "lmeval":
        from fbnprune.data.lmeval import load_lmeval_task

        docs = list(load_lmeval_task(rest).documents)
    else:
        raise DataError(
            f"source {source!r}: unknown scheme {scheme!r}; use builtin, file, hf or lmeval"
        )
    if not docs:
        raise DataError(f"source {source!r} holds no documents")
    if not any(doc.text.strip() for doc in docs):
        raise DataError(f"source {source!r} holds only empty documents ({len(docs)})")
    return docs


def task_documents(task: TaskConfig) -> list[Document]:
    """All documents of a task's source, read with the task's fields and split."""
    return load_documents(
        task.source,
        text_field=task.text_field,
        label_field=task.label_field,
        split=task.split,
        hf_config=task.hf_config,
        target_field=None if task.generation is None else task.generation.target_field,
    )


def normalise(text: str) -> str:
    """Whitespace-collapsed text, the key under which two documents count as the same."""
    return " ".join(text.split())


def _usable(docs: list[Document], task: str) -> list[Document]:
    """Drop empty documents and duplicate texts (first kept; texts that differ only in
    whitespace count as duplicates, so none can land in both splits); check ids are unique."""
    seen_ids: set[str] = set()
    seen_texts: set[str] = set()
    kept = []
    for doc in docs:
        if doc.id in seen_ids:
            raise DataError(f"task {task!r}: document id {doc.id!r} occurs more than once")
        seen_ids.add(doc.id)
        key = normalise(doc.text)
        if key and key not in seen_texts:
            seen_texts.add(key)
            kept.append(doc)
    if len(kept) < len(docs):
        logger.info(
            "task %s: dropped %d empty or duplicate documents of %d",
            task,
            len(docs) - len(kept),
            len(docs),
        )
    return kept


def _check_labels(docs: list[Document], task: str, choices: dict[str, str] | None) -> None:
    """Every document of a multiple-choice task has a label that one of its choices answers."""
    if choices is None:
        return
    bad = [d for d in docs if d.label not in choices]
    if bad:
        raise DataError(
            f"task {task!r}: {len(bad)} document(s) have labels that no choice answers "
            f"(e.g. {bad[0].id}: {bad[0].label!r}; choices: {', '.join(choices)})"
        )


def document_target(generation: GenerationConfig, doc: Document) -> str:
    """The text a generation task's model must write after ``doc``'s prompt: the target
    template over the document's target (a built-in's is its label) and, for a .jsonl
    document, its other fields (``{unit}``)."""
    target = doc.target if doc.target is not None else doc.label
    values = {**dict(doc.fields), **({"target": target} if target is not None else {})}

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            what = "target" if name == "target" else f"field {name!r}"
            raise DataError(f"document {doc.id!r} has no {what} for the target template")
        return values[name]

    return TEMPLATE_SLOT.sub(value, generation.target_template)


def _check_targets(docs: list[Document], task: str, generation: GenerationConfig) -> None:
    """Every document of a generation task has a non-empty target text."""
    bad = [d for d in docs if not document_target(generation, d).strip()]
    if bad:
        raise DataError(
            f"task {task!r}: {len(bad)} document(s) have an empty target (e.g. {bad[0].id}); "
            "a generation task needs one per document"
        )


def documents_left(task: TaskConfig, data: TaskData) -> int:
    """How many of the task's usable documents no split takes: what evaluate and the
    verdict can score."""
    return len(_usable(task_documents(task), task.name)) - sum(len(data.split(s)) for s in SPLITS)


def load_task(task: TaskConfig, *, seed: int) -> TaskData:
    """Load a task's documents and split them, after a seeded shuffle, into the first
    ``calibration_samples`` (calibration), the next ``heldout_samples`` (held-out) and the
    next ``heal_samples`` (healing only).

    Empty documents and exact duplicate texts are dropped first, and a document whose
    prompt another already is (``prompt_key``) is passed over, so the splits share no id,
    no text and no prompt. Adding healing documents never changes the other two splits.
    """
    docs = _usable(task_documents(task), task.name)
    sizes = (task.calibration_samples, task.heldout_samples, task.heal_samples)
    if len(docs) < sum(sizes):
        raise DataError(
            f"task {task.name!r}: source {task.source!r} has {len(docs)} usable documents, "
            f"needs {sum(sizes)} ({sizes[0]} calibration + {sizes[1]} held-out + "
            f"{sizes[2]} healing)"
        )
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    # in that order, a document whose prompt an earlier one already is (prompt_key) is
    # passed over, so no split repeats another's prompt
    prompt_of = task_prompt_key(task)
    distinct, keys = [], set()
    for i in order:
        key = prompt_of(docs[i].text)
        if key not in keys:
            keys.add(key)
            distinct.append(docs[i])
        if len(distinct) == sum(sizes):
            break
    if len(distinct) < sum(sizes):
        raise DataError(
            f"task {task.name!r}: source {task.source!r} has {len(distinct)} documents with "
            f"distinct prompts, needs {sum(sizes)} ({sizes[0]} calibration + {sizes[1]} "
            f"held-out + {sizes[2]} healing); documents whose first max_words words are the "
            "same make the same prompt"
        )
    bounds = [0, sizes[0], sizes[0] + sizes[1], sum(sizes)]
    calibration, heldout, heal = (
        distinct[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    )
    choices = task_choices(task)
    _check_labels(calibration + heldout + heal, task.name, choices)
    generation = task_generation(task)
    if generation is not None:
        _check_targets(docs, task.name, generation)  # the verdict's and evaluate's too
    unseen = sorted(set(choices or {}) - {d.label for d in calibration + heal})
    if unseen:
        logger.warning(
            "task %s: no calibration or healing document has the label(s) %s: selection "
            "and healing never see them; raise calibration_samples or heal_samples",
            task.name,
            ", ".join(unseen),
        )
    ids = [{d.id for d in split} for split in (calibration, heldout, heal)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    return TaskData(
        task.name,
        task.template,
        calibration,
        heldout,
        heal,
        max_words=task.max_words,
        choices=choices,
        generation=generation,
    )


def task_generation(task: TaskConfig) -> GenerationConfig | None:
    """How the task's answer is written and scored: the recipe's, else an lm-eval
    ``generate_until`` task's own."""
    if task.generation is not None or not task.source.startswith("lmeval:"):
        return task.generation
    from fbnprune.data.lmeval import load_lmeval_task

    return load_lmeval_task(task.source.partition(":")[2]).generation


def task_choices(task: TaskConfig) -> dict[str, str] | None:
    """The task's answers (label -> answer text): the recipe's, else an lm-eval task's own."""
    if task.choices is not None or not task.source.startswith("lmeval:"):
        return task.choices
    from fbnprune.data.lmeval import load_lmeval_task

    return load_lmeval_task(task.source.partition(":")[2]).choices
