"""Evaluate: lm-eval on the original and pruned models, same tasks, same settings, one run.

- ``suite``: the offline task suite (BBC topics, word problems, perplexity on news,
  Wikipedia and code, the recipe's multiple-choice tasks) and the files it is written to.
- ``documents``: which documents are evaluated on (none the run used), drawn by seed.
- ``records``: each task's JSONL record of a document (prompt and choices, or text).
- ``errors``: ``EvalError``.
- ``harness``: ``Harness`` loads the tasks once and scores any number of models in process.
- ``results``: ``results.json`` and the Markdown table.
- ``run``: ``evaluate_run(RUN_DIR)``, what ``fbnprune evaluate`` calls.
"""

from fbnprune.evaluate.documents import calibration_documents
from fbnprune.evaluate.errors import EvalError
from fbnprune.evaluate.harness import Harness, evaluate_models, offline
from fbnprune.evaluate.results import build_results, preferred_pruned, write_results
from fbnprune.evaluate.run_eval import MODEL_KINDS, evaluate_run, model_variants
from fbnprune.evaluate.suite import SUITE, Suite, build_suite

__all__ = [
    "MODEL_KINDS",
    "SUITE",
    "EvalError",
    "Harness",
    "Suite",
    "build_results",
    "build_suite",
    "calibration_documents",
    "evaluate_models",
    "evaluate_run",
    "model_variants",
    "offline",
    "preferred_pruned",
    "write_results",
]
