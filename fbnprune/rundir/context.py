"""``RunContext``: what the stages, bench, evaluate and analyze read of one run.

The recipe, the run directory (its ledger and layout), the model and tokenizer (loaded on
first use), the dtype, the tasks' documents and the prompts drawn from them. It computes no
stage: the stages (each family's ``stage`` module) take it as their first input.
"""

from __future__ import annotations

import functools
import gc
from typing import TYPE_CHECKING, Any

from fbnprune.rundir.layout import RunLayout
from fbnprune.rundir.runner import RunDir

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from fbnprune.accel import Launch
    from fbnprune.data.task_text import Document, Split, TaskData
    from fbnprune.models.onload import LayerwiseModel
    from fbnprune.recipe import Recipe


class RunContext:
    """One recipe over one run directory, with its model and tasks loaded lazily."""

    def __init__(
        self,
        recipe: Recipe,
        run: RunDir,
        *,
        progress: bool = True,
        model_and_tokenizer: tuple[PreTrainedModel, Any] | None = None,
        launch: Launch | None = None,
    ) -> None:
        """``model_and_tokenizer``: the recipe's model, already loaded (shared between the
        contexts of one model, e.g. the benchmark's two neuron sites). ``launch``: this
        process's place among those of an ``accelerate launch`` (the main one's)."""
        self.recipe, self.run, self.progress = recipe, run, progress
        self.launch = launch
        self.layout = RunLayout(run.path)
        if model_and_tokenizer is not None:
            self.__dict__["model_and_tokenizer"] = model_and_tokenizer

    # -- the model -------------------------------------------------------------------------
    @functools.cached_property
    def model_and_tokenizer(self) -> tuple[PreTrainedModel, Any]:
        from fbnprune.models.adapters import get_adapter
        from fbnprune.models.loading import load_model

        model, tokenizer = load_model(
            self.recipe.model, dtype=self.dtype, allow_pickle=self.recipe.allow_pickle
        )
        get_adapter(model)  # fail early on unsupported architectures
        return model, tokenizer

    @property
    def model(self) -> PreTrainedModel:
        return self.model_and_tokenizer[0]

    def release_model(self) -> None:
        """Forget the loaded model (the tokenizer stays) and collect it, so its memory is
        free when this returns: discover fits without it, heal trains without the teacher;
        the next use loads it again."""
        loaded = self.__dict__.pop("model_and_tokenizer", None)
        if loaded is not None:
            self.__dict__["_tokenizer"] = loaded[1]
            del loaded
            gc.collect()

    @property
    def processes(self) -> int:
        """The processes healing trains on (1 outside ``accelerate launch``)."""
        return 1 if self.launch is None else self.launch.processes

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer; loaded alone (the model is not) until the model is."""
        if "model_and_tokenizer" in self.__dict__:
            return self.model_and_tokenizer[1]
        return self._tokenizer

    @functools.cached_property
    def _tokenizer(self) -> Any:
        from fbnprune.models.loading import load_tokenizer

        return load_tokenizer(self.recipe.model)

    def layerwise_model(self) -> LayerwiseModel:
        """The recipe's model with its decoder layers onloaded one at a time from its
        checkpoint (``collect.onload: sequential``; ``fbnprune.models.onload``)."""
        from fbnprune.models.onload import LayerwiseModel, checkpoint_dir

        return LayerwiseModel.from_checkpoint(checkpoint_dir(self.recipe.model), dtype=self.dtype)

    def empty_model(self) -> PreTrainedModel:
        """The recipe's model on the meta device, tied as loaded: its shapes without its
        weights (``save.onload: sequential`` measures the slices' sizes on it)."""
        from fbnprune.models.onload import checkpoint_dir, empty_model

        model = empty_model(checkpoint_dir(self.recipe.model), dtype=self.dtype)
        model.tie_weights()
        return model

    @property
    def dtype(self) -> torch.dtype:
        import torch

        dtype: torch.dtype = getattr(torch, self.recipe.dtype)
        return dtype

    @functools.cached_property
    def model_fingerprint(self) -> str:
        """The model's content (``loading.model_fingerprint``): new weights at the same path
        make every stage run again."""
        from fbnprune.models.loading import model_fingerprint

        return model_fingerprint(self.recipe.model)

    # -- the tasks and their prompts -------------------------------------------------------
    @functools.cached_property
    def tasks(self) -> dict[str, TaskData]:
        from fbnprune.data.task_text import load_task

        return {t.name: load_task(t, seed=self.recipe.seed) for t in self.recipe.tasks}

    @property
    def max_length(self) -> int:
        """The longest prompt, in tokens, any task allows."""
        return max(t.max_length for t in self.recipe.tasks)

    def calibration_prompts(self) -> list[str]:
        """Every task's calibration texts (prompts; a generation task's with their
        targets), task after task."""
        return [p for data in self.tasks.values() for p in data.texts("calibration")]

    def prompts_of(self, splits: tuple[Split, ...]) -> tuple[list[str], list[bool]]:
        """Every task's prompts of the given splits, and per prompt whether it is a
        question (multiple choice or generation: its last position predicts the answer)."""
        prompts: list[str] = []
        questions: list[bool] = []
        for data in self.tasks.values():
            for split in splits:
                batch = data.prompts(split)
                prompts += batch
                asks = data.choices is not None or data.generation is not None
                questions += [asks] * len(batch)
        return prompts, questions

    def answers_of(self, splits: tuple[Split, ...]) -> list[str | None]:
        """The gold answer text of every prompt of ``prompts_of(splits)`` (its label's
        answer), None where a task has no choices or a document no label; a generation
        task's answers are its ``targets_of``, not these."""
        out: list[str | None] = []
        for data in self.tasks.values():
            for split in splits:
                out += [data.gold_answer(doc) for doc in data.split(split)]
        return out

    def targets_of(self, splits: tuple[Split, ...]) -> list[str | None]:
        """The target of every prompt of ``prompts_of(splits)`` of a generation task (what
        the model must write after it), None for the other tasks' prompts."""
        out: list[str | None] = []
        for data in self.tasks.values():
            for split in splits:
                out += [data.target(doc) for doc in data.split(split)]
        return out

    def heal_answers(self) -> list[str | None]:
        """The gold answer of every text of ``heal_texts`` (None for plain text)."""
        answers = self.answers_of(("calibration", "heal"))
        return answers + [None] * (len(self.heal_texts()[0]) - len(answers))

    def heal_targets(self) -> list[str | None]:
        """The generation target of every text of ``heal_texts`` (None for the others)."""
        targets = self.targets_of(("calibration", "heal"))
        return targets + [None] * (len(self.heal_texts()[0]) - len(targets))

    def heal_texts(self) -> tuple[list[str], list[bool]]:
        """What healing distils on: every task's prompts of the calibration and healing
        documents, then, with ``heal.plain_text`` p, a share p of a multiple-choice task's
        documents (spread evenly over them) as plain text, which is not a question; then
        the documents of ``heal.corpus`` and the ``heal.general_text`` share of general
        text (``extra_heal_documents``), plain text too."""
        prompts, questions = self.prompts_of(("calibration", "heal"))
        share = self.recipe.heal.plain_text
        for data in self.tasks.values():
            if data.choices is None or share == 0:
                continue  # a plain-text task's prompts are plain text already
            docs = data.calibration + data.heal
            plain = [d.text for i, d in enumerate(docs) if int((i + 1) * share) > int(i * share)]
            prompts += plain
            questions += [False] * len(plain)
        extra = [d.text for d in self.extra_heal_documents]
        return prompts + extra, questions + [False] * len(extra)

    @functools.cached_property
    def extra_heal_documents(self) -> list[Document]:
        """Plain-text documents healing distils beside the tasks': up to
        ``heal.corpus_samples`` of ``heal.corpus`` (none whose text is a held-out
        document's), and packaged Wikipedia passages, ``heal.general_text`` times the
        number of the tasks' healing texts. Drawn by the recipe's seed."""
        from fbnprune.data.draw import draw_documents
        from fbnprune.data.task_text import load_documents, normalise

        cfg, seed = self.recipe.heal, self.recipe.seed
        heldout = [d for data in self.tasks.values() for d in data.heldout]
        out: list[Document] = []
        if cfg.corpus is not None:
            corpus = load_documents(cfg.corpus)
            out += draw_documents(corpus, cfg.corpus_samples, exclude=heldout, seed=seed)
        if cfg.general_text:
            n_task = len(self.prompts_of(("calibration", "heal"))[0])
            general = load_documents("builtin:wikipedia")
            out += draw_documents(
                general, round(cfg.general_text * n_task), exclude=heldout, seed=seed
            )
        used = {normalise(d.text) for d in heldout}
        return [d for d in out if normalise(d.text) not in used]

    def heldout_prompts(self, n: int) -> list[str]:
        """Up to ``n`` held-out prompts, taken round-robin across tasks."""
        per_task = [d.prompts("heldout") for d in self.tasks.values()]
        out: list[str] = []
        for i in range(max(len(p) for p in per_task)):
            out.extend(p[i] for p in per_task if i < len(p))
        return out[:n]

    def document_ids(self) -> dict[str, dict[str, list[str]]]:
        """Per task and split, the ids of the documents this run uses."""
        return {name: data.document_ids() for name, data in self.tasks.items()}
