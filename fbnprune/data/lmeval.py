"""lm-eval tasks as fbnprune task sources (``source: lmeval:PATH.yaml`` or ``lmeval:NAME``).

An lm-eval multiple-choice task already says what fbnprune needs: ``doc_to_text`` is the
question (the whole prompt), ``doc_to_choice`` the answers and ``doc_to_target`` the gold one.
Each document of its test split (else validation, else train) becomes a ``Document`` whose
text is the rendered prompt and whose label is the gold answer; the task's answers, with
lm-eval's target delimiter in front, become the fbnprune task's ``choices``. A
``generate_until`` task's documents carry their ``doc_to_target`` as target, and its
``generation_kwargs`` (``until``, ``max_gen_toks``) and first metric (``exact_match`` or
``chrf``) become the fbnprune task's ``generation``. Calibration, healing and the generated
evaluation then all use the task's own prompts. A local YAML is loaded with its folder as the
include path (offline); a bare name needs the network.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fbnprune.data.document import DataError, Document
from fbnprune.recipe import GenerationConfig


@dataclass(frozen=True)
class LmevalTask:
    """An lm-eval task's documents (text = prompt, label = gold answer, or target) and its
    answers (multiple choice) or how its answer is written (``generate_until``)."""

    name: str
    documents: tuple[Document, ...]
    choices: dict[str, str] | None  # answer -> continuation scored (delimiter + answer)
    generation: GenerationConfig | None = None


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
    """Load a multiple-choice or ``generate_until`` lm-eval task (a YAML path or a
    registered name)."""
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


def _eval_docs(task: Any, name: str) -> tuple[str, list[Any]]:
    """The loaded task's documents: its test split, else validation, else train."""
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
    return split, list(getattr(task, f"{split}_docs")())


def _doc_id(name: str, split: str, i: int, doc: Any) -> str:
    own = doc.get("id") if isinstance(doc, dict) else None  # the dataset's own id
    return f"{name}/{split}/{i if own is None else own}"


def _documents(task: Any, name: str) -> LmevalTask:
    """The loaded task's documents and answers."""
    if task.OUTPUT_TYPE == "generate_until":
        return _generation_documents(task, name)
    if task.OUTPUT_TYPE != "multiple_choice":
        raise DataError(
            f"lm-eval task {name!r} is {task.OUTPUT_TYPE!r}; fbnprune tasks from lm-eval must "
            "be multiple_choice or generate_until"
        )
    split, docs = _eval_docs(task, name)
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
        documents.append(
            Document(id=_doc_id(name, split, i, doc), text=str(task.doc_to_text(doc)), label=label)
        )
    return LmevalTask(name, tuple(documents), {a: f"{delimiter}{a}" for a in answers})


GENERATION_METRICS = ("exact_match", "chrf")


def _generation_documents(task: Any, name: str) -> LmevalTask:
    """A ``generate_until`` task: documents with their targets, and its generation settings
    (``until`` -> stop, ``max_gen_toks`` -> max_new_tokens, the first metric)."""
    config = task.config
    metrics = [m.get("metric") for m in (config.metric_list or []) if isinstance(m, dict)]
    metric = next((m for m in metrics if m in GENERATION_METRICS), None)
    if metric is None:
        raise DataError(
            f"lm-eval task {name!r} scores {metrics or 'nothing'}; fbnprune scores generation "
            f"tasks with {' or '.join(GENERATION_METRICS)}: list one in its metric_list"
        )
    kwargs = dict(config.generation_kwargs or {})
    until = kwargs.get("until") or ["\n\n"]
    generation = GenerationConfig(
        target_template=f"{config.target_delimiter}{{target}}",
        stop=[until] if isinstance(until, str) else [str(u) for u in until],
        max_new_tokens=min(int(kwargs.get("max_gen_toks", 256)), 1024),
        metric=metric,
    )
    split, docs = _eval_docs(task, name)
    documents = []
    for i, doc in enumerate(docs):
        target = task.doc_to_target(doc)
        if isinstance(target, list):  # several gold answers: the first is the target
            target = target[0]
        documents.append(
            Document(
                id=_doc_id(name, split, i, doc),
                text=str(task.doc_to_text(doc)),
                target=str(target),
            )
        )
    return LmevalTask(name, tuple(documents), None, generation)
