"""Tests for fbnprune.data.task_text: built-in corpora, file sources, splits, prompts and errors."""

from __future__ import annotations

import functools
import json
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from fbnprune.data.draw import draw_documents
from fbnprune.data.task_text import (
    BUILTIN_SOURCES,
    SPLITS,
    DataError,
    Document,
    TaskData,
    load_documents,
    load_task,
    prompt_key,
)
from fbnprune.recipe import TaskConfig


def _task(source: str, **kwargs: object) -> TaskConfig:
    settings: dict[str, object] = {"calibration_samples": 20, "heldout_samples": 10}
    settings.update(kwargs)
    return TaskConfig(name="t", source=source, **settings)


def _write_txt(path: Path, texts: list[str]) -> Path:
    path.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    return path


# --- built-in corpora -----------------------------------------------------------------------


def test_builtin_names() -> None:
    assert set(BUILTIN_SOURCES) == {
        "bbc_news",
        "wikipedia",
        "python_code",
        "arithmetic",
        "wiki_articles",
        "code_modules",
        "arithmetic_ops",
        "arithmetic_items",
        "bbc_headlines",
    }


@pytest.mark.parametrize("name", sorted(BUILTIN_SOURCES))
def test_builtin_loads(name: str) -> None:
    docs = load_documents(f"builtin:{name}")
    assert len(docs) >= 200
    assert all(isinstance(d, Document) for d in docs)
    assert len({d.id for d in docs}) == len(docs)
    assert all(d.text.strip() for d in docs)
    assert all(d.id.startswith(f"{name}/") for d in docs)
    # Cached readers still hand out fresh lists, and the same content each time.
    again = load_documents(f"builtin:{name}")
    assert again == docs and again is not docs


def test_bbc_topics_and_counts() -> None:
    docs = load_documents("builtin:bbc_news")
    counts = Counter(d.label for d in docs)
    assert counts == {
        "business": 510,
        "entertainment": 386,
        "politics": 417,
        "sport": 511,
        "tech": 401,
    }
    first = next(d for d in docs if d.id == "bbc_news/business/001")
    assert first.text.startswith("Ad sales boost Time Warner profit\n\n")
    # The one non-UTF-8 file decodes its pound sign instead of dropping it.
    assert "£15.8m" in next(d.text for d in docs if d.id == "bbc_news/sport/199")


def test_wikipedia_chunks_are_prose() -> None:
    docs = load_documents("builtin:wikipedia")
    assert all(d.label is None for d in docs)
    assert all(len(d.text.split()) >= 50 for d in docs)
    assert not any(d.text.lstrip().lower().startswith("#redirect") for d in docs)
    assert not any("'''" in d.text for d in docs)
    articles = {d.id.rsplit("/", 1)[0] for d in docs}
    assert len(articles) >= 80
    assert docs[0].id == "wikipedia/Anarchism/000"
    assert docs[0].text.startswith("Anarchism is a political philosophy")


def test_python_code_chunks() -> None:
    docs = load_documents("builtin:python_code")
    for doc in docs:
        path = doc.id.removeprefix("python_code/").rsplit(":", 1)[0]
        assert path.endswith(".py")
        parts = set(Path(path).parts)
        assert not parts & {"test", "tests", "idlelib", "site-packages"}
        assert sum(1 for line in doc.text.splitlines() if line.strip()) >= 5
        assert len(doc.text.splitlines()) <= 60
    paths = [d.id.rsplit(":", 1)[0] for d in docs]
    assert paths == sorted(paths, key=lambda p: Path(p).parts)
    assert any(d.text.lstrip().startswith(("def ", "class ")) for d in docs)


def _solve(problem: str) -> int:
    """Recompute a generated word problem's answer from its numbers and wording."""
    a, b, *rest = (int(n) for n in re.findall(r"\d+", problem))
    if "then gives away" in problem:
        return a + b - rest[0]
    if "packs of" in problem:
        return a * b + rest[0]
    if "then sells" in problem:
        return a * b - rest[0]
    if re.search(r"bags with|rows of|every day for", problem):
        return a * b
    if re.search(r"gives|lost|sold", problem):
        return a - b
    return a + b


def test_arithmetic_answers_are_exact() -> None:
    docs = load_documents("builtin:arithmetic")
    assert len(docs) == 2000
    assert len({d.text for d in docs}) == len(docs)
    for doc in docs:
        assert doc.text.endswith("? Answer:")
        assert doc.label == str(_solve(doc.text)), doc.text
    assert min(int(d.label) for d in docs if d.label) >= 1
    tom = "Tom has 12 apples and buys 7 more. How many apples does he have now?"
    assert _solve(tom) == 19


def test_unknown_builtin_suggests_a_name() -> None:
    with pytest.raises(DataError, match="did you mean 'wikipedia'") as info:
        load_documents("builtin:wikipedai")
    for name in BUILTIN_SOURCES:
        assert name in str(info.value)


# --- splits and prompts ---------------------------------------------------------------------


def test_splits_disjoint_and_seeded() -> None:
    task = _task("builtin:arithmetic", calibration_samples=64, heldout_samples=16)
    data = load_task(task, seed=0)
    assert len(data.calibration) == 64 and len(data.heldout) == 16
    assert not {d.id for d in data.calibration} & {d.id for d in data.heldout}
    assert load_task(task, seed=0) == data
    other = load_task(task, seed=1)
    assert [d.id for d in other.calibration] != [d.id for d in data.calibration]
    assert other.fingerprint() != data.fingerprint()


def test_duplicate_texts_never_cross_splits() -> None:
    task = _task("builtin:bbc_news", calibration_samples=2000, heldout_samples=100)
    data = load_task(task, seed=3)
    texts = [d.text for d in data.calibration + data.heldout]
    assert len(set(texts)) == len(texts)


def test_prompts_apply_template_with_braces() -> None:
    docs = [Document("a", "def f(x): return {x: 1}"), Document("b", "{text} {0} }{")]
    data = TaskData("t", "Code:\n{text}\nEnd", calibration=docs, heldout=docs[:1])
    assert data.prompts("calibration") == [
        "Code:\ndef f(x): return {x: 1}\nEnd",
        "Code:\n{text} {0} }{\nEnd",
    ]
    assert data.prompts("heldout") == ["Code:\ndef f(x): return {x: 1}\nEnd"]
    with pytest.raises(ValueError, match="calibration"):
        data.prompts("train")  # type: ignore[arg-type]


def test_fingerprint_tracks_text() -> None:
    docs = [Document("a", "one"), Document("b", "two")]
    base = TaskData("t", "{text}", docs[:1], docs[1:])
    same = TaskData("t", "{text}", [Document("a", "one")], [Document("b", "two")])
    changed = TaskData("t", "{text}", docs[:1], [Document("b", "two!")])
    assert re.fullmatch(r"[0-9a-f]{16}", base.fingerprint())
    assert base.fingerprint() == same.fingerprint()
    assert base.fingerprint() != changed.fingerprint()
    assert base.fingerprint() != TaskData("t", "Q: {text}", docs[:1], docs[1:]).fingerprint()


def test_too_few_documents(tmp_path: Path) -> None:
    path = _write_txt(tmp_path / "few.txt", [f"doc {i}" for i in range(5)])
    with pytest.raises(DataError) as info:
        load_task(_task(f"file:{path}", calibration_samples=4, heldout_samples=2), seed=0)
    message = str(info.value)
    assert "'t'" in message and "has 5 usable documents" in message and "needs 6" in message


# --- files ----------------------------------------------------------------------------------


def test_txt_file(tmp_path: Path) -> None:
    path = tmp_path / "docs.txt"
    path.write_text("first doc\nline two\n\n\n  \nsecond {doc}\n\nthird\n", encoding="utf-8")
    docs = load_documents(f"file:{path}")
    assert docs == [
        Document("file:0", "first doc\nline two"),
        Document("file:1", "second {doc}"),
        Document("file:2", "third"),
    ]


def test_jsonl_file(tmp_path: Path) -> None:
    rows = [{"body": "alpha", "label": 1, "id": "x1"}, {"body": "beta"}, {"body": "gamma"}]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    docs = load_documents(f"file:{path}", text_field="body")
    assert docs == [
        Document("x1", "alpha", "1"),
        Document("file:1", "beta"),
        Document("file:2", "gamma"),
    ]


def test_jsonl_line_separators_inside_strings_are_text(tmp_path: Path) -> None:
    """JSON Lines ends a record at a newline only; U+2028, U+2029 and U+0085 are valid
    inside a JSON string (issue 29, D4). Windows line ends are read too."""
    texts = ["one\u2028two", "three\u0085four", "five\u2029six"]
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": t}, ensure_ascii=False) for t in texts]
    path.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8", newline="")
    assert [d.text for d in load_documents(f"file:{path}")] == texts


def test_file_task_drops_empty(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    rows = [{"text": f"doc {i}"} for i in range(30)] + [{"text": "   "}, {"text": ""}]
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    data = load_task(_task(f"file:{path}", calibration_samples=25, heldout_samples=5), seed=7)
    assert len(data.calibration) == 25 and len(data.heldout) == 5
    assert all(d.text.strip() for d in data.calibration + data.heldout)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_text("\n \n\n", encoding="utf-8")
    with pytest.raises(DataError, match="no documents"):
        load_documents(f"file:{path}")


def test_only_empty_texts(tmp_path: Path) -> None:
    path = tmp_path / "blank.jsonl"
    path.write_text('{"text": ""}\n{"text": "  "}\n', encoding="utf-8")
    with pytest.raises(DataError, match="only empty documents"):
        load_documents(f"file:{path}")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found: .*nope.txt"):
        load_documents(f"file:{tmp_path / 'nope.txt'}")


def test_unsupported_file_type(tmp_path: Path) -> None:
    path = tmp_path / "docs.csv"
    path.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"unsupported file type '\.csv'"):
        load_documents(f"file:{path}")


def test_malformed_jsonl_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "also ok"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: not valid JSON"):
        load_documents(f"file:{path}")


def test_jsonl_missing_field_names_line(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text key"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"docs\.jsonl:2: no 'text' key \(keys: body\)"):
        load_documents(f"file:{path}")


def test_duplicate_ids_rejected(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="id '1' occurs more than once"):
        load_task(_task(f"file:{path}", calibration_samples=1, heldout_samples=1), seed=0)


# --- sources --------------------------------------------------------------------------------


def test_unknown_scheme() -> None:
    with pytest.raises(DataError, match="unknown scheme 'ftp'"):
        load_documents("ftp:somewhere")
    with pytest.raises(DataError, match="must look like"):
        load_documents("bbc_news")


def test_hf_without_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match="pip install datasets") as info:
        load_documents("hf:ag_news")
    assert "network" in str(info.value)


def test_hf_dataset_mapped(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    table = datasets.Dataset.from_dict({"text": ["bad", "good"], "label": [0, 1]}, features)
    calls = []

    def fake_load(name: str, config: str | None, *, split: str) -> object:
        calls.append((name, config, split))
        if name == "broken":
            raise ConnectionError("no network")
        return table

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    docs = load_documents("hf:imdb", split="test", hf_config="plain")
    assert calls == [("imdb", "plain", "test")]
    assert docs == [Document("imdb/test/0", "bad", "neg"), Document("imdb/test/1", "good", "pos")]
    with pytest.raises(DataError, match="no column 'body'"):
        load_documents("hf:imdb", text_field="body")
    with pytest.raises(DataError, match="could not load hf:broken .*no network"):
        load_documents("hf:broken")


# --- one prompt, one split (issue 29, D3) ----------------------------------------------------


def test_documents_with_one_prompt_never_land_in_two_splits(tmp_path: Path) -> None:
    """Near-duplicates (the same first max_words words) and case-only duplicates are one
    prompt: a later one is passed over, and the splits keep their sizes."""
    texts = [f"Shared opening words here then story {i} continues" for i in range(6)]
    texts += [t.upper() for t in texts[:3]]  # case-only duplicates
    texts += [f"distinct text number {i}" for i in range(10)]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    task = TaskConfig(
        name="t",
        source=f"file:{path}",
        template="Post: {text}\nTopic:",
        max_words=4,  # "Shared opening words here": one prompt for the first six
        calibration_samples=5,
        heldout_samples=3,
        heal_samples=3,
    )
    for seed in range(5):
        data = load_task(task, seed=seed)
        prompts = [data.prompt(d).casefold() for s in SPLITS for d in data.split(s)]
        assert len(prompts) == 11 and len(set(prompts)) == 11
    crowded = task.model_copy(update={"calibration_samples": 9})
    with pytest.raises(DataError, match="distinct prompts, needs 15"):
        load_task(crowded, seed=0)


def test_a_draw_skips_documents_whose_prompt_a_split_already_shows() -> None:
    used = [Document("u", "The Same Start of an article, then more")]
    pool = [
        Document("a", "the same start of another article entirely"),  # same 4 words
        Document("b", "something else"),
        Document("c", "SOMETHING ELSE"),  # one prompt with b
    ]
    key = functools.partial(prompt_key, "Article: {text}\nTopic:", max_words=4)
    drawn = draw_documents(pool, 3, exclude=used, seed=0, prompt=key)
    assert [d.id for d in drawn] in (["b"], ["c"])
    assert len(draw_documents(pool, 3, exclude=used, seed=0)) == 3  # without: texts only


def test_a_label_no_training_document_has_is_warned_about(tmp_path: Path, caplog) -> None:
    rows = [{"text": f"common text {i}", "label": "a"} for i in range(10)]
    rows += [{"text": "the only rare one", "label": "b"}]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = TaskConfig(
        name="t",
        source=f"file:{path}",
        choices={"a": " a", "b": " b"},
        calibration_samples=3,
        heldout_samples=1,
    )
    seen = {}
    for seed in range(30):
        caplog.clear()
        has_b = "b" in {d.label for d in load_task(task, seed=seed).calibration}
        seen[has_b] = "the label(s) b" in caplog.text
    assert seen == {True: False, False: True}  # warned exactly when b is never trained on
