"""Which documents an evaluation may use: none the run used, drawn deterministically.

Evaluation documents never overlap calibration documents: every document whose id, or whose
whitespace-normalised text, belongs to the run's calibration set is excluded (the BBC corpus
holds 100 exact duplicate articles under different ids, so ids alone would leak). The rest
are ranked by a hash of ``seed`` and the document id, so the draw is deterministic and a
different calibration set changes only the documents it removes.
"""

from __future__ import annotations

from pathlib import Path

from fbnprune.data.draw import draw_documents
from fbnprune.data.task_text import Document, load_task
from fbnprune.recipe import Recipe
from fbnprune.rundir.layout import RunLayout

__all__ = ["calibration_documents", "draw_documents"]  # draw_documents: its old home


def calibration_documents(recipe: Recipe, run_dir: Path | None = None) -> list[Document]:
    """Every document the run uses, of every split (calibration, held-out, healing; same
    splits as the pipeline's) and of ``heal.corpus``: none of them is evaluated on.

    With ``run_dir``, ids recorded by the run (``collect/*/meta.json``, ``documents.json``)
    are added too, as id-only documents, so a run made from data that has since changed is
    still excluded by id.
    """
    docs = []
    for task in recipe.tasks:
        data = load_task(task, seed=recipe.seed)
        docs += data.calibration + data.heldout + data.heal
    if recipe.heal.corpus is not None:  # healing may have distilled any of it
        from fbnprune.data.task_text import load_documents

        docs += load_documents(recipe.heal.corpus)
    if run_dir is not None:
        known = {d.id for d in docs}
        ids: list[str] = []
        run = RunLayout(Path(run_dir))
        for meta in run.read_all_collect_meta():
            ids += meta.get("sample_ids", [])
        if run.documents_file.is_file():
            for splits in run.read_documents()["tasks"].values():
                ids += [i for split in splits.values() for i in split]
        docs.extend(Document(id=i, text="") for i in dict.fromkeys(ids) if i not in known)
    return docs
