"""The task's tokens: every calibration and healing prompt in every wording, and every answer;
never a held-out document."""

from __future__ import annotations

from conftest import BBC_CHOICES, NEWS_TASK, tiny_bpe_tokenizer, tiny_recipe

from fbnprune.data.task_text import render
from fbnprune.recipe import parse_recipe
from fbnprune.rundir import RunDir
from fbnprune.rundir.context import RunContext
from fbnprune.select.task_tokens import task_texts, task_vocabulary

ALT = {k: f" {k.upper()}!" for k in BBC_CHOICES}
TASK = {
    **NEWS_TASK,
    "template": "Article: {text}\nTopic:",
    "max_words": 10,
    "choices": BBC_CHOICES,
    "wordings": [{"name": "alt", "template": "Story: {text}\nSection:", "choices": ALT}],
    "heal_samples": 6,
}


def _context(tmp_path) -> RunContext:
    recipe = parse_recipe(tiny_recipe(tasks=[TASK], prune={"vocabulary": "task"}))
    ctx = RunContext(recipe, RunDir.open(tmp_path / "run"), progress=False)
    ctx.__dict__["_tokenizer"] = tiny_bpe_tokenizer("byte_level")
    return ctx


def test_texts_are_every_wording_of_the_calibration_and_healing_documents(tmp_path) -> None:
    ctx = _context(tmp_path)
    data = ctx.tasks["news"]
    texts, answers = task_texts(ctx)
    docs = data.calibration + data.heal
    for doc in docs:
        assert render(TASK["template"], doc.text, 10) in texts
        assert render("Story: {text}\nSection:", doc.text, 10) in texts
    for doc in data.heldout:
        assert not any(doc.text[:40] in text for text in texts)
    assert set(answers) == set(BBC_CHOICES.values()) | set(ALT.values())


def test_the_vocabulary_holds_every_answer_and_records_its_sources(tmp_path) -> None:
    ctx = _context(tmp_path)
    tokenizer = ctx.tokenizer
    vocab, record = task_vocabulary(ctx, len(tokenizer))
    for answer in list(BBC_CHOICES.values()) + list(ALT.values()):
        assert set(tokenizer(answer, add_special_tokens=False)["input_ids"]) <= set(vocab.kept)
    assert record["kept"] == vocab.size and record["original"] == len(tokenizer)
    assert record["used"] <= vocab.size < len(tokenizer)
    assert record["answers"] == 10
