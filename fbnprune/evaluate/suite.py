"""The offline lm-eval task suite, generated from the built-in corpora into a directory.

Every task is a flat lm-eval YAML file next to its JSONL data (``dataset_path: json`` with an
absolute ``data_files`` path), tagged ``fbnprune_suite``; load it with
``TaskManager(include_path=DIR, include_defaults=False)``. Nothing touches the Hub.

Tasks (names chosen not to clash with lm-eval's built-in tasks; lm-eval has its own
``arithmetic`` group):

- ``bbc_topics``: BBC News topic, 5-way multiple choice; prompt ``"Article: <first 120
  words>\\nTopic:"``, choices `` business`` `` entertainment`` `` politics`` `` sport``
  `` tech``; documents balanced across topics, so chance and the majority baseline are 0.20.
- ``word_problems``: the templated arithmetic problems, 4-way multiple choice between the
  exact answer and three near misses (answer +-1, +-2 or +-10). Multiple choice needs one
  forward pass per problem and has a known chance level (0.25); exact match by generation
  would decode token by token on CPU and reads 0 for every broken model alike.
- ``ppl_news``, ``ppl_wiki``, ``ppl_code``: rolling log-likelihood of held-out BBC articles,
  Wikipedia chunks and standard-library code, cut to their first ``perplexity_max_words``
  words; metrics word_perplexity, byte_perplexity, bits_per_byte.

Evaluation documents never overlap the run's documents (``evaluate.documents`` draws them);
each task's records are shaped by ``evaluate.records``; this module holds the catalog of tasks
and writes their YAML, JSONL and ``manifest.json``.

Why ``acc`` and not ``acc_norm`` for the choice tasks: lm-eval's ``acc_norm`` picks
``argmax(loglik_i / len(choice_i))``, dividing by the choice's length in characters. That
correction is meant for long continuations whose log-likelihood grows with their length. A
topic label is one token (all five are single tokens for SmolLM2) whose log-likelihood does
not grow with its spelling, and a small model gives every label a low one (-8 to -10 nats
after ``Topic:``). Dividing those by 4 (``tech``) ... 13 (``entertainment``) shrinks the
longest label's penalty most, so ``acc_norm`` answers "entertainment" almost always and
reads near that label's share of the documents (0.20 here) whatever the model knows.
Measured on SmolLM2-135M, 100 balanced documents: acc 0.62; acc_norm 0.36, answering
"entertainment" for 80 of them (and "politics" for the rest). ``acc`` (argmax of the summed
log-likelihood) is the primary metric; ``acc_norm`` is still recorded.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fbnprune.data.task_text import (
    Document,
    load_documents,
    task_choices,
    task_documents,
    task_generation,
    task_prompt_key,
)
from fbnprune.evaluate.answers import AnswerTask
from fbnprune.evaluate.documents import calibration_documents, draw_documents
from fbnprune.evaluate.errors import EvalError
from fbnprune.evaluate.records import (
    BBC_TOPICS,
    bbc_record,
    choice_record,
    generation_record,
    text_record,
    word_problem_record,
)
from fbnprune.io import atomic_write_json, atomic_write_text
from fbnprune.recipe import (
    EVAL_SUITE_TASKS,
    EvaluateConfig,
    GenerationConfig,
    Recipe,
    TaskConfig,
    Wording,
)

# also the names that lived here before evaluate.documents, .records and .errors split off
__all__ = [
    "BBC_TOPICS",
    "PERPLEXITY_TASKS",
    "SUITE",
    "EvalError",
    "Suite",
    "SuiteTask",
    "bbc_record",
    "build_suite",
    "calibration_documents",
    "catalog",
    "default_tasks",
    "draw_documents",
    "eval_name",
    "recipe_tasks",
    "word_problem_record",
]

logger = logging.getLogger(__name__)

SUITE_TAG = "fbnprune_suite"
SUITE_VERSION = 1
PERPLEXITY_METRICS = {  # metric -> lm-eval aggregation; lower is better for all three
    "word_perplexity": "weighted_perplexity",
    "byte_perplexity": "weighted_perplexity",
    "bits_per_byte": "bits_per_byte",
}


@dataclass(frozen=True)
class SuiteTask:
    """One generated task: its corpus, kind and primary metric; ``task`` and ``wording``
    for a multiple-choice or generation task defined by a recipe task (its template and
    answers, or its targets)."""

    name: str
    source: str
    kind: str  # "choice", "generation" or "perplexity"
    metric: str
    higher_is_better: bool
    description: str
    task: TaskConfig | None = None
    wording: Wording | None = None


SUITE: dict[str, SuiteTask] = {
    t.name: t
    for t in (
        SuiteTask(
            "bbc_topics",
            "builtin:bbc_news",
            "choice",
            "acc",
            True,
            "BBC News topic, 5-way multiple choice",
        ),
        SuiteTask(
            "word_problems",
            "builtin:arithmetic",
            "choice",
            "acc",
            True,
            "arithmetic word problems, 4-way multiple choice",
        ),
        SuiteTask(
            "ppl_news",
            "builtin:bbc_news",
            "perplexity",
            "word_perplexity",
            False,
            "perplexity of BBC News articles",
        ),
        SuiteTask(
            "ppl_wiki",
            "builtin:wikipedia",
            "perplexity",
            "word_perplexity",
            False,
            "perplexity of Wikipedia articles",
        ),
        SuiteTask(
            "ppl_code",
            "builtin:python_code",
            "perplexity",
            "word_perplexity",
            False,
            "perplexity of Python standard-library code",
        ),
    )
}
assert tuple(SUITE) == EVAL_SUITE_TASKS
PERPLEXITY_TASKS = tuple(n for n, t in SUITE.items() if t.kind == "perplexity")


def eval_name(task: TaskConfig, wording: Wording | None = None) -> str:
    """The lm-eval name of a recipe task's multiple-choice evaluation (per wording)."""
    base = re.sub(r"[^A-Za-z0-9_]", "_", task.name)
    return base if wording is None else f"{base}_{wording.name}"


def recipe_tasks(recipe: Recipe) -> dict[str, SuiteTask]:
    """The evaluations the recipe's own tasks define: one per task with ``choices``, and
    one per further wording; one per generation task (``generate_until``, scored by its
    metric)."""
    out: dict[str, SuiteTask] = {}
    for task in recipe.tasks:
        generation = task_generation(task)
        if generation is not None:
            name = eval_name(task)
            what = f"{task.name}: the model writes the answer, scored by {generation.metric}"
            kind, metric = "generation", generation.metric
            out[name] = SuiteTask(name, task.source, kind, metric, True, what, task)
            continue
        choices = task_choices(task)
        if choices is None:
            continue
        for wording in (None, *task.wordings):
            name = eval_name(task, wording)
            what = f"{task.name}: {len(choices)}-way multiple choice"
            if wording is not None:
                what += f", wording {wording.name!r}"
            out[name] = SuiteTask(name, task.source, "choice", "acc", True, what, task, wording)
    return out


def answer_tasks(recipe: Recipe, directory: Path, names: Iterable[str]) -> dict[str, AnswerTask]:
    """The recipe's own multiple-choice tasks among ``names``, to be scored by fbnprune's
    answer rules too (``recipe.verdict.scoring`` their primary metric; ``Harness``)."""
    from fbnprune.data.task_text import render
    from fbnprune.evaluate.answers import CONTENT_FREE_TEXT

    own = recipe_tasks(recipe)
    out = {}
    for name in names:
        task = own.get(name)
        if task is None or task.task is None or task.kind != "choice":
            continue
        template = task.task.template if task.wording is None else task.wording.template
        out[name] = AnswerTask(
            data_file=Path(directory) / f"{name}.jsonl",
            content_free_prompt=render(template, CONTENT_FREE_TEXT),
            scoring=recipe.verdict.scoring,
            labels=tuple(task_choices(task.task) or ()),
        )
    return out


def catalog(recipe: Recipe | None) -> dict[str, SuiteTask]:
    """Every task ``build_suite`` can generate for ``recipe``."""
    return {**SUITE, **(recipe_tasks(recipe) if recipe is not None else {})}


def default_tasks(recipe: Recipe) -> list[str]:
    """What is scored when no task is named: the recipe's own multiple-choice tasks (every
    wording) and the suite's perplexity tasks; the whole suite when the recipe has none."""
    own = list(recipe_tasks(recipe))
    return [*own, *PERPLEXITY_TASKS] if own else list(SUITE)


@dataclass(frozen=True)
class Suite:
    """A generated suite: its directory (an lm-eval include path) and what it holds."""

    directory: Path
    tasks: tuple[str, ...]
    doc_ids: dict[str, list[str]] = field(repr=False)


# --- YAML -----------------------------------------------------------------------------------


def _task_yaml(task: SuiteTask, data_file: Path, cache_dir: Path) -> dict[str, Any]:
    config: dict[str, Any] = {
        "task": task.name,
        "tag": [SUITE_TAG],
        "dataset_path": "json",
        "dataset_kwargs": {
            "data_files": {"test": str(data_file.resolve())},
            "cache_dir": str(cache_dir.resolve()),
        },
        "test_split": "test",
    }
    if task.kind == "choice":
        config.update(
            output_type="multiple_choice",
            doc_to_text="prompt",
            doc_to_choice="choices",
            doc_to_target="gold",
            # a recipe task's answers are written with their own leading space
            target_delimiter="" if task.task is not None else " ",
            metric_list=[
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            ],
        )
    elif task.kind == "generation":
        assert task.task is not None
        config.update(generation_yaml(task_generation(task.task)))
    else:
        config.update(
            output_type="loglikelihood_rolling",
            doc_to_text="",
            doc_to_target="text",
            metric_list=[
                {"metric": m, "aggregation": agg, "higher_is_better": False}
                for m, agg in PERPLEXITY_METRICS.items()
            ],
        )
    config["metadata"] = {"version": SUITE_VERSION, "description": task.description}
    return config


def generation_yaml(generation: GenerationConfig | None) -> dict[str, Any]:
    """What makes an lm-eval task of a generation task's records: ``generate_until`` with
    greedy decoding, its stop strings and length, and its metric (lm-eval's
    ``exact_match``, case, punctuation and outer whitespace ignored; or ``chrf``)."""
    assert generation is not None
    if generation.metric == "exact_match":
        metric = {
            "metric": "exact_match",
            "aggregation": "mean",
            "higher_is_better": True,
            "ignore_case": True,
            "ignore_punctuation": True,
            "regexes_to_ignore": ["^\\s+", "\\s+$"],
        }
    else:
        metric = {"metric": "chrf", "aggregation": "chrf", "higher_is_better": True}
    return {
        "output_type": "generate_until",
        "doc_to_text": "prompt",
        "doc_to_target": "target",
        "target_delimiter": "",
        "generation_kwargs": {
            "until": list(generation.stop),
            "max_gen_toks": generation.max_new_tokens,
            "do_sample": False,
        },
        "metric_list": [metric],
    }


def _records(task: SuiteTask, docs: list[Document], config: EvaluateConfig) -> list[dict]:
    if task.kind == "generation":
        assert task.task is not None
        return [generation_record(d, task.task) for d in docs]
    if task.task is not None:
        return [choice_record(d, task.task, task.wording) for d in docs]
    if task.name == "bbc_topics":
        return [bbc_record(d) for d in docs]
    if task.name == "word_problems":
        return [word_problem_record(d, config.seed) for d in docs]
    return [text_record(d, config.perplexity_max_words) for d in docs]


def build_suite(
    directory: str | Path,
    *,
    exclude: Iterable[Document],
    config: EvaluateConfig | None = None,
    tasks: Iterable[str] | None = None,
    loader: Callable[[str], list[Document]] = load_documents,
    recipe: Recipe | None = None,
) -> Suite:
    """Write the suite's YAML and JSONL files into ``directory`` and return it.

    Args:
        directory: created if needed; an lm-eval ``include_path`` afterwards.
        exclude: documents that must not be evaluated on (the run's calibration set).
        config: sizes, seed and word cap; ``EvaluateConfig()`` defaults if None.
        tasks: suite task names to generate (all of them if None).
        loader: reads a source into documents (``fbnprune.data.task_text.load_documents``).
        recipe: its tasks with ``choices`` can be generated too (``recipe_tasks``).
    """
    config = config or EvaluateConfig()
    known = catalog(recipe)
    names = list(SUITE) if tasks is None else list(dict.fromkeys(tasks))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise EvalError(f"not suite tasks: {', '.join(unknown)} (suite: {', '.join(known)})")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    exclude = list(exclude)
    cache: dict[str, list[Document]] = {}
    doc_ids: dict[str, list[str]] = {}
    for name in names:
        task = known[name]
        source = task.source
        if task.task is not None and not source.startswith("builtin:"):
            spec = task.task
            source = f"{source}|{spec.text_field}|{spec.label_field}|{spec.split}"
            if source not in cache:
                cache[source] = task_documents(spec)
        elif source not in cache:
            cache[source] = loader(source)
        n = config.perplexity_samples if task.kind == "perplexity" else config.choice_samples
        balance = name == "bbc_topics" or task.kind == "choice" and task.task is not None
        pool = cache[source]
        if task.kind == "choice" and task.task is not None:  # labels a choice answers
            pool = [d for d in pool if d.label in (task_choices(task.task) or {})]
        # a recipe task's documents are shown through its template
        prompt = task_prompt_key(task.task) if task.task is not None else None
        docs = draw_documents(
            pool, n, exclude=exclude, seed=config.seed, balance_labels=balance, prompt=prompt
        )
        if not docs:
            raise EvalError(
                f"{name}: no documents of {task.source} are left outside the run's splits"
            )
        if len(docs) < n:
            logger.warning(
                "%s: only %d documents outside the run's splits (asked %d)", name, len(docs), n
            )
        data_file = directory / f"{name}.jsonl"
        lines = (json.dumps(r, ensure_ascii=False) for r in _records(task, docs, config))
        atomic_write_text(data_file, "\n".join(lines) + "\n")
        task_yaml = _task_yaml(task, data_file, directory / ".datasets-cache")
        atomic_write_text(directory / f"{name}.yaml", yaml.safe_dump(task_yaml, sort_keys=False))
        doc_ids[name] = [d.id for d in docs]
    atomic_write_json(
        directory / "manifest.json",
        {
            "version": SUITE_VERSION,
            "tasks": names,
            "settings": config.model_dump(mode="json"),
            "excluded_documents": len(exclude),
            "doc_ids": doc_ids,
        },
    )
    logger.info(
        "evaluation suite: %s in %s",
        ", ".join(f"{n} ({len(doc_ids[n])} docs)" for n in names),
        directory,
    )
    return Suite(directory, tuple(names), doc_ids)
