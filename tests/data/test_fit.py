"""A question after the document is never cut by truncation: such a task is refused, with
the ``max_words`` that fits (issue 29, D1)."""

from __future__ import annotations

import re

from conftest import bbc_task, tiny_recipe, tiny_tokenizer, write_recipe

from fbnprune.cli import main
from fbnprune.data.fit import question_cut
from fbnprune.data.task_text import load_task
from fbnprune.recipe import TaskConfig


def test_prompts_longer_than_max_length_are_refused_with_the_words_that_fit():
    tokenizer = tiny_tokenizer()  # one token a character
    data = load_task(TaskConfig(**bbc_task(max_words=None, max_length=64)), seed=0)
    message = question_cut(data, tokenizer, 64)
    assert (
        message is not None and "'\\nTopic:'" in message and "longer than max_length 64" in message
    )
    words = int(re.search(r"max_words: (\d+)", message).group(1))
    fitted = load_task(TaskConfig(**bbc_task(max_words=words, max_length=64)), seed=0)
    assert question_cut(fitted, tokenizer, 64) is None
    lengths = [len(tokenizer(p).input_ids) for p in fitted.prompts("calibration")]
    assert max(lengths) <= 64 and all(p.endswith("\nTopic:") for p in fitted.prompts("heal"))
    # one more word does not fit the longest: the suggestion is the most that fits
    more = load_task(TaskConfig(**bbc_task(max_words=words + 1, max_length=64)), seed=0)
    assert question_cut(more, tokenizer, 64) is not None


def test_nothing_after_the_document_nothing_to_cut():
    data = load_task(TaskConfig(**bbc_task(max_words=None, template="Article: {text}")), seed=0)
    assert question_cut(data, tiny_tokenizer(), 16) is None
    too_small = load_task(TaskConfig(**bbc_task(max_length=8)), seed=0)
    assert "raise max_length" in question_cut(too_small, tiny_tokenizer(), 8)


def test_the_run_refuses_before_collecting(tiny_llama_dir, tmp_path, capsys):
    task = bbc_task(max_words=None, max_length=64)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_llama_dir, tasks=[task]))
    code = main(["-q", "run", str(recipe), "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "max_words:" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "collect" / "bbc-news").exists()
    assert main(["validate", "--data", str(recipe)]) == 2
