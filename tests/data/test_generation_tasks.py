"""Generation tasks (issue 28): the recipe's ``generation`` block, targets read from .jsonl,
built-ins and lm-eval ``generate_until`` tasks, prompts and targets split like choices,
exact match's normalisation, chrF, and the evaluation suite's ``generate_until`` YAML."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import task_recipe, tiny_model, tiny_tokenizer

from fbnprune.data.document import DataError
from fbnprune.data.task_text import SPLITS, load_task
from fbnprune.evaluate.generation import (
    GenerationTask,
    exact_match,
    generation_flags,
    normalise_answer,
    score_answers,
)
from fbnprune.evaluate.suite import build_suite, calibration_documents
from fbnprune.heal.distill import IGNORE, prepare_targets
from fbnprune.recipe import GenerationConfig, HealConfig, TaskConfig


def capitals(tmp_path: Path, n: int = 40, target: bool = True) -> Path:
    """A .jsonl generation task: ``text`` a question, ``answer`` what the model must write."""
    rows = [{"text": f"What is {i} plus one?", "answer": i + 1} for i in range(n)]
    if not target:
        rows[3].pop("answer")
    file = tmp_path / "sums.jsonl"
    file.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return file


def task_config(file: Path, **overrides) -> TaskConfig:
    spec = {
        "name": "sums",
        "source": f"file:{file}",
        "template": "Q: {text}\nA:",
        "generation": {"target_field": "answer", "stop": ["\n"], "max_new_tokens": 4},
        "calibration_samples": 8,
        "heldout_samples": 4,
        "heal_samples": 6,
        **overrides,
    }
    return TaskConfig.model_validate(spec)


def test_a_task_has_choices_or_generation_and_a_target_slot() -> None:
    base = {"name": "t", "source": "builtin:arithmetic_items", "generation": {}}
    with pytest.raises(ValueError, match="not both"):
        TaskConfig.model_validate({**base, "choices": {"a": " a", "b": " b"}})
    with pytest.raises(ValueError, match="one template"):
        wording = {"name": "w", "template": "{text}", "choices": {"a": " a", "b": " b"}}
        TaskConfig.model_validate({**base, "wordings": [wording]})
    with pytest.raises(ValueError, match="placeholder"):
        TaskConfig.model_validate({**base, "generation": {"target_template": " answer"}})
    with pytest.raises(ValueError, match="must not be empty"):
        TaskConfig.model_validate({**base, "generation": {"stop": [""]}})
    with pytest.raises(ValueError, match="exact_match"):
        TaskConfig.model_validate({**base, "generation": {"metric": "bleu"}})
    # left out of dumps while None: earlier recipes keep their fingerprints
    assert "generation" not in TaskConfig(name="t", source="builtin:bbc_news").model_dump()


def test_targets_are_read_and_split_like_choices(tmp_path: Path) -> None:
    data = load_task(task_config(capitals(tmp_path)), seed=0)
    ids = [{d.id for d in data.split(s)} for s in SPLITS]
    assert [len(i) for i in ids] == [8, 4, 6] and not (ids[0] & ids[1] or ids[1] & ids[2])
    for doc in data.calibration:
        n = int(doc.text.split()[2])
        assert data.target(doc) == f" {n + 1}" and data.gold_answer(doc) is None
    prompts, texts = data.prompts("calibration"), data.texts("calibration")
    # calibration reads the prompt and the target: the tokens the model must write
    assert texts == [p + data.target(d) for p, d in zip(prompts, data.calibration, strict=True)]
    assert prompts[0].startswith("Q: What is ") and prompts[0].endswith("\nA:")
    # the targets are part of the task's fingerprint (collect and heal run again on a change)
    other = capitals(tmp_path)
    rows = [json.loads(line) for line in other.read_text().splitlines()]
    other.write_text("\n".join(json.dumps({**r, "answer": 0}) for r in rows) + "\n")
    assert load_task(task_config(other), seed=0).fingerprint() != data.fingerprint()


def test_a_document_without_a_target_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="has no target for the target template"):
        load_task(task_config(capitals(tmp_path, target=False)), seed=0)
    rows = [{"text": f"q{i}", "answer": {"nested": i}} for i in range(20)]
    (tmp_path / "bad.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match="must be text or a number"):
        load_task(task_config(tmp_path / "bad.jsonl"), seed=0)
    txt = tmp_path / "plain.txt"
    txt.write_text("one\n\ntwo\n")
    with pytest.raises(DataError, match="use a .jsonl file"):
        load_task(task_config(txt), seed=0)


def test_builtin_generation_tasks_carry_their_targets() -> None:
    items = TaskConfig(name="items", source="builtin:arithmetic_items", generation={})
    data = load_task(items, seed=0)
    for doc in data.calibration:
        word = data.target(doc).strip()
        assert word in doc.text.split() or f"{word}." in doc.text.split()
    headlines = TaskConfig(
        name="h", source="builtin:bbc_headlines", generation={"metric": "chrf"}, max_words=20
    )
    doc = load_task(headlines, seed=0).calibration[0]
    assert doc.id.startswith("bbc_headlines/") and doc.label and doc.label not in doc.text


@pytest.mark.parametrize(
    ("prediction", "gold", "same"),
    [
        (" Marbles", "marbles", True),
        ("marbles.", " marbles", True),
        ('"Paris"', "paris", True),
        ("New  York", "new york", True),
        ("1,000", "1000", True),
        ("+7", "7", True),
        ("7.0", "7", True),
        ("007", "7", True),
        ("-12.", "-12", True),
        ("12", "-12", False),
        ("1,2", "12", False),
        ("marble", "marbles", False),
        ("marbles and coins", "marbles", False),
    ],
)
def test_exact_match_normalises_case_space_punctuation_and_numbers(
    prediction: str, gold: str, same: bool
) -> None:
    assert exact_match(prediction, gold) == float(same)
    assert (normalise_answer(prediction) == normalise_answer(gold)) is same


def test_chrf_and_the_constant_answer() -> None:
    score, each = score_answers(["the cat sat", "a dog"], ["the cat sat", "the dog ran"], "chrf")
    assert each[0] == pytest.approx(100.0) and 0 < each[1] < 100 and 0 < score < 100
    assert score_answers(["x"], ["x"], "exact_match") == (1.0, [1.0])
    with pytest.raises(ValueError, match="unknown metric"):
        score_answers(["x"], ["x"], "bleu")
    from fbnprune.data.document import Document

    docs = [Document(str(i), f"text {i}", "a" if i < 3 else "b") for i in range(4)]
    task = GenerationTask("t", "t", "{text}:", None, GenerationConfig(), docs)
    assert task.constant_answer() == (" a", 0.75)
    stats = task.score([" a", " a", " a", " a"])
    assert stats["score"] == 0.75 and stats["top_share"] == 1.0 and stats["distinct"] == 1
    flags = generation_flags("t", "healed", stats, 0.75)
    assert len(flags) == 2 and "constant answerer" in flags[0] and "no better" in flags[1]
    assert generation_flags("t", "healed", task.score([" a", " a", " a", " b"]), 0.75) == []


def test_healing_weights_every_target_position() -> None:
    """The target is appended to its prompt; each position that predicts one of its tokens
    weighs answer_weight, the others 1; a plain text beside it is untouched."""
    cfg = HealConfig(max_length=32, batch_size=4, top_k=4, answer_weight=3.0)
    texts = ["Q: 1 + 1\nA:", "some plain text"]
    train, _ = prepare_targets(
        tiny_model("llama"),
        tiny_tokenizer(),
        texts,
        cfg,
        questions=[True, False],
        targets=[" two", None],
    )
    (batch,) = train
    assert batch.labels is not None and batch.weights is not None
    row = int((batch.labels != IGNORE).any(dim=1).nonzero()[0])
    assert int((batch.labels[row] != IGNORE).sum()) == len(" two")  # one token a character
    assert int((batch.weights == 3.0).sum()) == len(" two")
    plain = 1 - row
    assert int(batch.attention_mask[plain].sum()) == len("some plain text")


def generate_until_yaml(tmp_path: Path) -> Path:
    """A local lm-eval ``generate_until`` task over a local JSONL file (offline)."""
    rows = [
        {"id": f"q{n}", "question": f"What is {n} plus one?", "answer": n + 1} for n in range(40)
    ]
    (tmp_path / "plus.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    spec = {
        "task": "tiny_plus_one",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": "plus.jsonl"}, "cache_dir": str(tmp_path / "c")},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n", "."], "max_gen_toks": 5, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "ignore_case": True}],
    }
    file = tmp_path / "plus.yaml"
    file.write_text(json.dumps(spec))  # JSON is YAML
    return file


def test_an_lmeval_generate_until_task_loads_and_evaluates(tmp_path: Path, monkeypatch) -> None:
    """A local generate_until YAML gives documents with targets and its generation settings;
    the evaluation suite writes it back as a generate_until task that lm-eval scores."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    file = generate_until_yaml(tmp_path)
    task = TaskConfig(
        name="plus", source=f"lmeval:{file}", calibration_samples=8, heldout_samples=4
    )
    data = load_task(task, seed=0)
    assert data.choices is None and data.generation is not None
    assert data.generation.stop == ["\n", "."] and data.generation.max_new_tokens == 5
    assert data.generation.metric == "exact_match"
    doc = data.calibration[0]
    n = int(doc.id.rsplit("q", 1)[1])
    assert data.target(doc) == f" {n + 1}"  # lm-eval's delimiter, then the target
    assert data.prompts("calibration")[0] == doc.text and doc.text.endswith("\nAnswer:")

    r = task_recipe(tasks=[task.model_dump()], evaluate={"choice_samples": 12})
    suite = build_suite(
        tmp_path / "suite",
        exclude=calibration_documents(r),
        config=r.evaluate,
        recipe=r,
        tasks=["plus"],
    )
    rows = [json.loads(x) for x in (tmp_path / "suite" / "plus.jsonl").read_text().splitlines()]
    used = {d.id for s in SPLITS for d in data.split(s)}
    assert len(rows) == 12 and not {row["id"] for row in rows} & used
    from fbnprune.evaluate.harness import Harness

    harness = Harness(["plus"], include_paths=[suite.directory], limit=12, batch_size=4)
    assert harness.tasks["plus"].metric == "exact_match"
    scores = harness.score(tiny_model("llama"), tiny_tokenizer())
    assert 0.0 <= scores["plus"]["exact_match"] <= 1.0
    written = harness.answers[-1]["plus"]  # what the model wrote, kept per score()
    assert [r["id"] for r in written] == [row["id"] for row in rows]
    assert all(isinstance(r["answer"], str) for r in written)
    assert [r["target"] for r in written] == [row["target"] for row in rows]


def test_a_target_that_truncation_would_cut_is_refused(tmp_path: Path) -> None:
    """The target is measured after its prompt: a prompt that fits alone but not with its
    target is refused with the numbers (one token a character with the tiny tokenizer)."""
    from fbnprune.data.fit import question_cut

    data = load_task(task_config(capitals(tmp_path), template="{text}"), seed=0)
    longest = max(len(p) for s in SPLITS for p in data.prompts(s))
    assert question_cut(data, tiny_tokenizer(), longest + 4) is None  # " 40" fits after it
    message = question_cut(data, tiny_tokenizer(), longest)
    assert message is not None and "the target the model must write" in message


def test_an_lmeval_generate_until_task_validates_and_runs(
    tiny_llama_dir: str, tmp_path: Path, monkeypatch
) -> None:
    """The same YAML, unchanged, as a recipe's task: ``validate --data`` accepts it and a
    run's verdict writes and scores every model's answers."""
    from conftest import tiny_recipe, write_recipe

    from fbnprune.cli import main
    from fbnprune.pipeline import run_pipeline
    from fbnprune.recipe import load_recipe
    from fbnprune.rundir import RunLayout

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    task = {
        "name": "plus",
        "source": f"lmeval:{generate_until_yaml(tmp_path)}",
        "calibration_samples": 8,
        "heldout_samples": 4,
        "max_length": 48,
    }
    data = tiny_recipe(tiny_llama_dir, tasks=[task], verdict={"limit": 6})
    path = write_recipe(tmp_path / "recipe.yaml", data)
    assert main(["-q", "validate", "--data", str(path)]) == 0
    run_pipeline(load_recipe(path), tmp_path / "run", progress=False)
    verdict = RunLayout(tmp_path / "run").read_verdict()
    assert verdict is not None
    entry = verdict["generation"]["plus"]
    assert entry["n"] == 6 and entry["metric"] == "exact_match" and "original" in entry["models"]


def test_the_budget_search_needs_a_multiple_choice_task() -> None:
    from fbnprune.recipe import RecipeError, parse_recipe

    task = {"name": "items", "source": "builtin:arithmetic_items", "generation": {}}
    base = {"model": "unused", "tasks": [task], "select": {"budget": "auto"}}
    with pytest.raises(RecipeError, match="generation tasks are not searched yet"):
        parse_recipe(base)


def test_a_target_template_reads_the_documents_fields(tmp_path: Path) -> None:
    """``{NAME}`` in the target template is the .jsonl record's field NAME; a record
    without it is refused by name."""
    rows = [{"text": f"How far is town {i}?", "km": i, "unit": "km"} for i in range(30)]
    file = tmp_path / "far.jsonl"
    file.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    generation = {"target_field": "km", "target_template": " {target} {unit}"}
    data = load_task(task_config(file, generation=generation), seed=0)
    for doc in data.calibration:
        n = int(doc.text.split()[-1].rstrip("?"))
        assert data.target(doc) == f" {n} km"
    generation["target_template"] = " {target} {miles}"
    with pytest.raises(DataError, match="no field 'miles'"):
        load_task(task_config(file, generation=generation), seed=0)
