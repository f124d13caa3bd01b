"""lm-eval in process: load the tasks once, then score any number of models on them.

``Harness`` resolves task names against the include paths (the generated suite, user YAML)
without indexing lm-eval's ~230 built-in task folders; only a name found nowhere else turns
the built-in index on (those tasks download their data, so they need the network). When
every task is local, the Hub and ``datasets`` are switched to offline mode while tasks load
and models run. Each model is wrapped in ``lm_eval.models.huggingface.HFLM`` as it is and
run through ``lm_eval.evaluator.evaluate`` on the already built tasks, so scoring another
pruned variant costs only its forward passes. (``simple_evaluate`` would rebuild the tasks
and collect environment information on every call.)

A model is given as ``(model, tokenizer)`` or as a zero-argument callable returning a
context manager that yields ``(model, tokenizer)``: the masked model is scored inside
``masked(model, plan)``, a checkpoint is loaded only for its own evaluation.

Many variants of one model (a benchmark)::

    suite = build_suite(run_dir / "eval" / "suite", exclude=calibration_documents(recipe))
    harness = Harness(suite.tasks, include_paths=[suite.directory], limit=40)
    reference = harness.score(model, tokenizer)
    for plan in plans:
        with masked(model, plan):
            scores = harness.score(model, tokenizer)   # {task: {metric: value}}
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from fbnprune.evaluate.answers import AnswerTask
from fbnprune.evaluate.errors import EvalError
from fbnprune.evaluate.suite import SUITE

logger = logging.getLogger(__name__)

ModelAndTokenizer = tuple[nn.Module, Any]
ModelSpec = ModelAndTokenizer | Callable[[], AbstractContextManager[ModelAndTokenizer]]
Scores = dict[str, dict[str, float | None]]
"""task -> metric -> value; ``METRIC_stderr`` keys hold standard errors (None if unknown)."""

FEWSHOT_SEED = 1234  # lm-eval's default
_NOISE = (  # lm-eval warns about every model passed as an object, which is what we do
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
)


@contextlib.contextmanager
def offline(enabled: bool = True) -> Iterator[None]:
    """Hub and ``datasets`` offline inside the block (environment and the already imported
    constants, which both libraries read at import time); restored afterwards."""
    if not enabled:
        yield
        return
    import datasets.config
    import huggingface_hub.constants as hub_constants

    env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    saved = [
        (hub_constants, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_DATASETS_OFFLINE"),
    ]
    values = [getattr(obj, name) for obj, name in saved]
    os.environ.update({k: "1" for k in env})
    for obj, name in saved:
        setattr(obj, name, True)
    try:
        yield
    finally:
        for (obj, name), value in zip(saved, values, strict=True):
            setattr(obj, name, value)
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_NOISE)


@dataclass(frozen=True)
class TaskInfo:
    """What a loaded task reports: its primary metric and every metric it computes."""

    name: str
    metric: str
    higher_is_better: bool
    metrics: dict[str, bool] = field(default_factory=dict)  # metric -> higher is better
    n_docs: int = 0


def primary_metric(task_name: str, higher_is_better: Mapping[str, bool]) -> str:
    """The metric reported for a task.

    Suite tasks name theirs (``acc`` for multiple choice, never ``acc_norm``: see
    ``fbnprune.evaluate.suite``; ``word_perplexity`` for perplexity). Any other task reports
    the first metric of its ``metric_list``, except that ``acc`` is preferred to
    ``acc_norm`` when a task lists both.
    """
    if task_name in SUITE:
        return SUITE[task_name].metric
    names = list(higher_is_better)
    if not names:
        raise EvalError(f"task {task_name!r} defines no metric")
    return "acc" if "acc" in names else names[0]


class Harness:
    """Tasks loaded once; ``score`` runs one model on all of them.

    Args:
        tasks: task, group or tag names (suite tasks, YAML under ``include_paths``, or
            lm-eval built-ins, which need the network).
        include_paths: directories (or YAML files) of task definitions.
        limit: at most this many documents per task (first ones; the suite's order is
            already a seeded draw).
        batch_size: HFLM batch size.
        device: move each model there before scoring (None: leave it where it is).
        max_length: HFLM context window; the model's own if None.
        bootstrap_iters: for metrics whose standard error needs a bootstrap.
        answer_tasks: tasks also scored by fbnprune's answer rules (``AnswerTask``); the
            spread of each model's answers is kept in ``spreads`` per ``score`` call.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        include_paths: Sequence[str | Path] = (),
        limit: int | None = None,
        batch_size: int = 8,
        device: str | None = None,
        max_length: int | None = None,
        bootstrap_iters: int = 1000,
        answer_tasks: Mapping[str, AnswerTask] | None = None,
    ) -> None:
        from lm_eval.tasks import TaskManager

        if not tasks:
            raise EvalError("no tasks to evaluate")
        self.limit, self.batch_size, self.device = limit, batch_size, device
        self.max_length, self.bootstrap_iters = max_length, bootstrap_iters
        self.include_paths = [str(Path(p).resolve()) for p in include_paths]
        for path in self.include_paths:
            if not Path(path).exists():
                raise EvalError(f"include path not found: {path}")
        names = list(dict.fromkeys(tasks))
        manager = TaskManager(include_path=self.include_paths or None, include_defaults=False)
        missing = [n for n in names if n not in manager.all_tasks and not Path(n).is_file()]
        self.offline = not missing
        if missing:
            logger.info(
                "tasks %s are not local; indexing lm-eval's built-in tasks (their "
                "data needs the network)",
                ", ".join(missing),
            )
            manager = TaskManager(include_path=self.include_paths or None, include_defaults=True)
            _raise_unknown([n for n in missing if n not in manager.all_tasks], manager.all_tasks)
        with offline(self.offline), _quiet_lm_eval():
            self.loaded = manager.load(names)
        for task in self.loaded["tasks"].values():  # as simple_evaluate does: zero-shot
            if task.get_config("num_fewshot") is None:  # unless a task says otherwise,
                task.set_config(key="num_fewshot", value=0)  # and a fixed few-shot draw
            task.set_fewshot_seed(seed=FEWSHOT_SEED)
        self.tasks = {
            name: _task_info(name, task, limit) for name, task in self.loaded["tasks"].items()
        }
        self.answer_tasks = {k: v for k, v in (answer_tasks or {}).items() if k in self.tasks}
        for name, answer_task in self.answer_tasks.items():
            info, added = self.tasks[name], answer_task.metrics()
            metrics = {**info.metrics, **added}
            self.tasks[name] = TaskInfo(
                name, f"acc_{answer_task.scoring}", True, metrics, info.n_docs
            )
        self.spreads: list[dict[str, dict[str, Any]]] = []  # per score(): task -> answers
        # the tasks whose answers the model writes: their answers are kept per score()
        self.written = [
            name
            for name, task in self.loaded["tasks"].items()
            if getattr(task, "OUTPUT_TYPE", None) == "generate_until"
        ]
        self.answers: list[dict[str, list[dict[str, Any]]]] = []
        logger.info("evaluation tasks: %s", ", ".join(self.tasks))

    def score(self, model: nn.Module, tokenizer: Any) -> Scores:
        """Every task's metrics for one model (as it is: hooks attached stay attached)."""
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM

        if self.device is not None:
            model.to(self.device)
        with offline(self.offline), _quiet_lm_eval():
            lm = HFLM(
                pretrained=model,
                tokenizer=tokenizer,
                batch_size=self.batch_size,
                max_length=self.max_length,
            )
            out = evaluate(
                lm,
                self.loaded,
                limit=self.limit,
                log_samples=bool(self.written),
                bootstrap_iters=self.bootstrap_iters,
            )
        if out is None:
            raise EvalError("lm-eval returned no results (not rank 0?)")
        scores = {name: _metrics(out["results"][name]) for name in self.tasks}
        self.answers.append({name: _written(out["samples"][name]) for name in self.written})
        spread: dict[str, dict[str, Any]] = {}
        for name, answer_task in self.answer_tasks.items():
            metrics, spread[name] = _answer_scores(model, tokenizer, answer_task, self)
            scores[name].update(metrics)
        self.spreads.append(spread)
        return scores

    def score_all(
        self,
        models: Mapping[str, ModelSpec],
        *,
        timings: dict[str, float] | None = None,
        spreads: dict[str, dict[str, dict[str, Any]]] | None = None,
        answers: dict[str, dict[str, list[dict[str, Any]]]] | None = None,
    ) -> dict[str, Scores]:
        """``score`` for each named model in turn; ``timings`` receives seconds per model,
        ``spreads`` each model's answer spread on the answer tasks, ``answers`` its written
        answers to the generation tasks."""
        scores: dict[str, Scores] = {}
        for name, spec in models.items():
            start = time.perf_counter()
            logger.info("evaluating %s", name)
            with _enter(spec) as (model, tokenizer):
                scores[name] = self.score(model, tokenizer)
            if spreads is not None:
                spreads[name] = self.spreads[-1]
            if answers is not None:
                answers[name] = self.answers[-1]
            seconds = time.perf_counter() - start
            if timings is not None:
                timings[name] = round(seconds, 2)
            logger.info("evaluated %s in %.1f s: %s", name, seconds, self.summary(scores[name]))
        return scores

    def summary(self, scores: Scores) -> str:
        return ", ".join(
            f"{n} {info.metric}={_fmt(scores[n].get(info.metric))}"
            for n, info in self.tasks.items()
        )

    def settings(self) -> dict[str, Any]:
        return {
            "limit": self.limit,
            "batch_size": self.batch_size,
            "device": self.device,
            "max_length": self.max_length,
            "include_paths": self.include_paths,
            "offline": self.offline,
            "bootstrap_iters": self.bootstrap_iters,
        }


def evaluate_models(
    models: Mapping[str, ModelSpec],
    task_names: Sequence[str],
    *,
    include_path: str | Path | Sequence[str | Path] = (),
    limit: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
    max_length: int | None = None,
) -> dict[str, Scores]:
    """Score every model on the same tasks with the same settings: ``{model: {task:
    {metric: value}}}``. For many models, build one ``Harness`` and call ``score``."""
    paths = [include_path] if isinstance(include_path, str | Path) else list(include_path)
    harness = Harness(
        task_names,
        include_paths=paths,
        limit=limit,
        batch_size=batch_size,
        device=device,
        max_length=max_length,
    )
    return harness.score_all(models)


# --- helpers ----------------------------------------------------------------------------------


def _answer_scores(
    model: nn.Module, tokenizer: Any, task: AnswerTask, harness: Harness
) -> tuple[dict[str, float | None], dict[str, Any]]:
    """fbnprune's answer rules on the task's records (the first ``limit``): the metrics of
    ``answer_metrics`` with binomial standard errors, and the spread of the answers."""
    import json
    import math

    from fbnprune.evaluate.answers import SCORING_RULES, answer_logliks, answer_stats

    lines = task.data_file.read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()][: harness.limit]
    if not records:
        raise EvalError(f"{task.data_file}: no records")
    answers = records[0]["choices"]
    labels = task.labels or tuple(answers)
    ll = answer_logliks(
        model,
        tokenizer,
        [r["prompt"] for r in records],
        dict(zip(labels, answers, strict=True)),
        content_free_prompt=task.content_free_prompt,
        batch_size=harness.batch_size,
    )
    gold = [int(r["gold"]) for r in records]
    metrics: dict[str, float | None] = {}
    spread: dict[str, Any] = {"n": len(records), "predicted": {}}
    for rule in SCORING_RULES:
        stats = answer_stats(ll, gold, rule)
        metrics[f"acc_{rule}"] = stats.accuracy
        metrics[f"acc_{rule}_stderr"] = math.sqrt(stats.accuracy * (1 - stats.accuracy) / stats.n)
        metrics[f"top_share_{rule}"] = stats.top_share
        spread["predicted"][rule] = stats.predicted
    # the gold labels' counts, the same under every rule
    metrics["majority_rate"] = spread["majority_rate"] = stats.majority_rate
    spread["majority_label"] = stats.majority_label
    return metrics, spread


def _written(samples: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A generation task's lm-eval samples as records: the document's id, the target and
    the answer the model wrote (after lm-eval's filters)."""
    out = []
    for sample in samples:
        doc = sample.get("doc") or {}
        answer = sample["filtered_resps"]
        out.append(
            {
                "id": doc.get("id", sample.get("doc_id")),
                "target": sample.get("target"),
                "answer": answer[0] if isinstance(answer, list) else answer,
            }
        )
    return out


@contextlib.contextmanager
def _enter(spec: ModelSpec) -> Iterator[ModelAndTokenizer]:
    if isinstance(spec, tuple):
        yield spec
    else:
        with spec() as pair:
            yield pair


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs every step at INFO and warns on every model passed as an object;
    ``datasets`` draws a progress bar for every tiny JSONL file it reads."""
    import datasets

    lm_logger = logging.getLogger("lm_eval")
    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    level, noise = lm_logger.level, _DropNoise()
    bars = not datasets.are_progress_bars_disabled()
    if not logger.isEnabledFor(logging.DEBUG):
        lm_logger.setLevel(logging.WARNING)
    hf_logger.addFilter(noise)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        lm_logger.setLevel(level)
        hf_logger.removeFilter(noise)
        if bars:
            datasets.enable_progress_bars()


def _task_info(name: str, task: Any, limit: int | None) -> TaskInfo:
    higher = {k: bool(v) for k, v in task.higher_is_better().items()}
    metric = primary_metric(name, higher)
    n_docs = len(task.eval_docs) if task.has_test_docs() or task.has_validation_docs() else 0
    if limit is not None:
        n_docs = min(n_docs, limit)
    return TaskInfo(name, metric, higher.get(metric, True), higher, n_docs)


def _metrics(raw: Mapping[str, Any]) -> dict[str, float | None]:
    """``{"acc,none": 0.6, "acc_stderr,none": 0.05, "alias": ...}`` -> ``{"acc": 0.6,
    "acc_stderr": 0.05}`` (first filter only; "N/A" stderr becomes None)."""
    out: dict[str, float | None] = {}
    for key, value in raw.items():
        metric, sep, _filter = key.partition(",")
        if not sep or metric in out:
            continue
        out[metric] = float(value) if isinstance(value, int | float) else None
    return out


def _raise_unknown(unknown: list[str], known: Sequence[str]) -> None:
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=3)
        hints.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    raise EvalError(
        f"unknown task(s): {'; '.join(hints)}. Suite tasks: {', '.join(SUITE)}; "
        "add your own YAML with --include-path"
    )


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}"
