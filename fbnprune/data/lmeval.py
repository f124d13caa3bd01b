"""lm-eval tasks as fbnprune task sources (``source: lmeval:PATH.yaml`` or ``lmeval:NAME``).

An lm-eval multiple-choice task already says what fbnprune needs: ``doc_to_text`` is the
question (the whole prompt), ``doc_to_choice`` the answers and ``doc_to_target`` the gold one.
Each document of its test split (else validation, else train) becomes a ``Document`` whose
text is the rendered prompt and whose label is the gold answer; the task's answers, with
lm-eval's target delimiter in front, become the fbnprune task's ``choices``. Calibration,
healing and the generated evaluation then all use the task's own prompts. A local YAML is
loaded with its folder as the include path (offline); a bare name needs the network.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fbnprune.data.document import DataError, Document


@dataclass(frozen=True)
class LmevalTask:
    """An lm-eval task's documents (text = prompt, label = gold answer) and its answers."""

    name: str
    documents: tuple[Document, ...]
    choices: dict[str, str]  # answer -> continuation scored (delimiter + answer)


def _task_name(spec: str) -> tuple[str, str | None]:
    path = Path(spec).expanduser()
    if path.suffix.lower() not in (".yaml", ".yml"):
        return spec, None
    if not path.is_file():
        raise DataError(
            f"lm-eval task file not found: {path} (a relative path in a recipe "
            "is resolved against the recipe's folder)"
        )
    config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(config, dict) or "task" not in config:
        raise DataError(f"{path}: not an lm-eval task YAML (no 'task' key)")
    return str(config["task"]), str(path.resolve().parent)


@functools.lru_cache(maxsize=8)
def load_lmeval_task(spec: str) -> LmevalTask:
    """Load a multiple-choice lm-eval task (a YAML path or a registered name)."""
    from lm_eval.tasks import TaskManager

    name, include = _task_name(spec)
    manager = TaskManager(include_path=include, include_defaults=include is None)
    # relative paths in the YAML (data_files) are read against the YAML's folder, as a
    # recipe's own paths are, whatever the working directory
    with contextlib.chdir(include) if include else contextlib.nullcontext():
        try:
            task = manager.load([name])["tasks"][name]
        except Exception as exc:  # lm-eval raises many types (config, dataset, network)
            raise DataError(f"lm-eval task {spec!r} could not be loaded: {exc}") from exc
        return _documents(task, name)


def _documents(task: Any, name: str) -> LmevalTask:
    """The loaded task's documents (its test split, else validation, else train)."""
    if task.OUTPUT_TYPE != "multiple_choice":
        raise DataError(
            f"lm-eval task {name!r} is {task.OUTPUT_TYPE!r}; fbnprune tasks from lm-eval must "
            "be multiple_choice"
        )
    split = next(
        (
            s
            for s, has in (
                ("test", task.has_test_docs()),
                ("validation", task.has_validation_docs()),
                ("train", task.has_training_docs()),
            )
            if has
        ),
        None,
    )
    if split is None:
        raise DataError(f"lm-eval task {name!r} has no documents")
    docs = getattr(task, f"{split}_docs")()
    delimiter = task.config.target_delimiter
    answers: list[str] = []
    documents = []
    for i, doc in enumerate(docs):
        choices = [str(c) for c in task.doc_to_choice(doc)]
        if answers and choices != answers:
            raise DataError(
                f"lm-eval task {name!r}: document {i} has other answers ({choices}) than the "
                f"first ({answers}); fbnprune needs one fixed set of answers"
            )
        answers = choices
        target = task.doc_to_target(doc)
        label = choices[target] if isinstance(target, int) else str(target)
        own = doc.get("id") if isinstance(doc, dict) else None  # the dataset's own id
        documents.append(
            Document(
                id=f"{name}/{split}/{i if own is None else own}",
                text=str(task.doc_to_text(doc)),
                label=label,
            )
        )
    return LmevalTask(name, tuple(documents), {a: f"{delimiter}{a}" for a in answers})
