"""Tasks that know their question and answers: prompts, splits (healing documents), the
evaluation generated from the task's own definition, the recorded document ids, and healing
that weighs the answer position and stops early."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import BBC_ALT, BBC_CHOICES, bbc_task, task_recipe, tiny_model, tiny_tokenizer

from fbnprune.collect.activations import token_batches
from fbnprune.data.task_text import DataError, cut_words, load_task, normalise
from fbnprune.evaluate.suite import (
    build_suite,
    calibration_documents,
    default_tasks,
    recipe_tasks,
)
from fbnprune.heal.distill import distillation_loss, teacher_targets
from fbnprune.heal.train import heal_model
from fbnprune.pipeline import run_pipeline
from fbnprune.plan import PrunePlan
from fbnprune.pruning.slicing import slice_model
from fbnprune.recipe import HealConfig, RecipeError, TaskConfig


def test_the_document_is_cut_never_the_question():
    data = load_task(TaskConfig(**bbc_task()), seed=0)
    for doc, prompt in zip(data.calibration, data.prompts("calibration"), strict=True):
        assert prompt.endswith("\nTopic:")
        assert prompt == f"Article: {cut_words(doc.text, 4)}\nTopic:"
        assert len(prompt.split()) <= 4 + 2


def test_healing_documents_are_a_third_disjoint_split_that_changes_no_other():
    plain = load_task(TaskConfig(**bbc_task(heal_samples=0)), seed=3)
    with_heal = load_task(TaskConfig(**bbc_task(heal_samples=50)), seed=3)
    assert with_heal.calibration == plain.calibration and with_heal.heldout == plain.heldout
    assert len(with_heal.heal) == 50
    ids = [set(with_heal.document_ids()[s]) for s in ("calibration", "heldout", "heal")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    texts = [
        {normalise(d.text) for d in with_heal.split(s)} for s in ("calibration", "heldout", "heal")
    ]
    assert not (texts[0] & texts[2] or texts[1] & texts[2])


def test_labels_no_choice_answers_are_refused(tmp_path):
    file = tmp_path / "docs.jsonl"
    rows = [{"text": f"doc {i}", "topic": "yes" if i % 2 else "maybe"} for i in range(10)]
    file.write_text("\n".join(json.dumps(r) for r in rows))
    task = TaskConfig(
        name="t",
        source=f"file:{file}",
        label_field="topic",
        choices={"yes": " yes", "no": " no"},
        calibration_samples=4,
        heldout_samples=2,
    )
    with pytest.raises(DataError, match="no choice answers"):
        load_task(task, seed=0)
    ok = task.model_copy(update={"choices": {"yes": " yes", "maybe": " maybe"}})
    assert {d.label for d in load_task(ok, seed=0).calibration} <= {"yes", "maybe"}


def test_a_wording_must_answer_the_same_labels():
    with pytest.raises(RecipeError, match="wording 'alt'"):
        task_recipe(
            tasks=[
                bbc_task(
                    wordings=[
                        {
                            "name": "alt",
                            "template": "{text}?",
                            "choices": {"business": " b", "sport": " s"},
                        }
                    ]
                )
            ]
        )


def test_the_suite_is_generated_from_the_tasks_own_definition(tmp_path):
    r = task_recipe()
    assert list(recipe_tasks(r)) == ["bbc_news", "bbc_news_alt"]
    assert default_tasks(r)[:2] == ["bbc_news", "bbc_news_alt"]
    exclude = calibration_documents(r)
    suite = build_suite(
        tmp_path, exclude=exclude, config=r.evaluate, recipe=r, tasks=["bbc_news", "bbc_news_alt"]
    )
    first = [json.loads(line) for line in (tmp_path / "bbc_news.jsonl").read_text().splitlines()]
    alt = [json.loads(line) for line in (tmp_path / "bbc_news_alt.jsonl").read_text().splitlines()]
    assert len(first) == len(alt) == 10
    assert [r["id"] for r in first] == [r["id"] for r in alt]  # same documents, two wordings
    labels = list(BBC_CHOICES)
    assert first[0]["choices"] == list(BBC_CHOICES.values())
    assert alt[0]["choices"] == [BBC_ALT[t] for t in labels]
    assert first[0]["prompt"].startswith("Article: ") and first[0]["prompt"].endswith("\nTopic:")
    assert alt[0]["prompt"].startswith("Story: ") and alt[0]["prompt"].endswith("\nSection:")
    assert sorted(r["gold"] for r in first) == sorted([0, 1, 2, 3, 4] * 2)  # balanced
    spec = (tmp_path / "bbc_news.yaml").read_text()
    assert "target_delimiter: ''" in spec  # the answers carry their own space
    # every document the run uses, of every split, is kept out of the evaluation
    used = {d.id for d in exclude}
    data = load_task(r.tasks[0], seed=r.seed)
    assert used == {d.id for s in ("calibration", "heldout", "heal") for d in data.split(s)}
    assert not set(suite.doc_ids["bbc_news"]) & used


def test_a_run_records_the_documents_it_used(tiny_llama_dir, tmp_path):
    r = task_recipe(model=tiny_llama_dir)
    run_pipeline(r, tmp_path / "run", until="select", progress=False)
    recorded = json.loads((tmp_path / "run" / "documents.json").read_text())["tasks"]["bbc-news"]
    data = load_task(r.tasks[0], seed=r.seed)
    assert recorded == data.document_ids()
    collected = json.loads((tmp_path / "run" / "collect" / "bbc-news" / "meta.json").read_text())
    assert collected["sample_ids"] == recorded["calibration"]  # only calibration is collected
    exclude = calibration_documents(r, tmp_path / "run")
    assert {d.id for d in exclude} >= {i for ids in recorded.values() for i in ids}


# --- healing on the task's prompts ---------------------------------------------------------


PROMPTS = [f"item {i} costs {i * 3} coins. price:" for i in range(8)]


def test_the_answer_position_weighs_as_asked():
    teacher, student = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    batches = token_batches(tiny_tokenizer(), PROMPTS, 48, 4)
    plain = teacher_targets(teacher, batches, top_k=16)
    weighted = teacher_targets(
        teacher, batches, top_k=16, last_weights=[torch.full((4,), 1000.0)] * len(batches)
    )
    target = weighted[0]
    ends = target.attention_mask.sum(1) - 1
    assert target.weights is not None and float(target.weights.max()) == 1000.0
    assert int((target.weights == 1000.0).sum()) == len(ends)  # one answer position per row
    with torch.no_grad():
        logits = student(input_ids=target.input_ids, attention_mask=target.attention_mask).logits
    loss_plain = float(distillation_loss(logits, plain[0]))
    loss_weighted = float(distillation_loss(logits, target))
    # nearly all weight on the last positions: the loss is their mean KL
    rows = torch.arange(len(ends))
    last_only = copy.copy(plain[0])
    mask = torch.zeros_like(target.attention_mask)
    mask[rows, ends] = 1
    keep = mask[target.attention_mask.bool()].bool()
    last_only.top_ids, last_only.top_logprobs = plain[0].top_ids[keep], plain[0].top_logprobs[keep]
    last_only.attention_mask = mask
    expected = float(distillation_loss(logits, last_only))
    assert loss_weighted == pytest.approx(expected, rel=0.05)
    assert loss_weighted != pytest.approx(loss_plain, rel=1e-3)


def half_slice(model):
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    plan = PrunePlan(
        model="tiny",
        model_type="llama",
        site="hidden",
        fill="zero",
        layer_widths=widths,
        kept=[list(range(0, w, 2)) for w in widths],
    )
    return slice_model(copy.deepcopy(model), plan, layout="compact")


def test_healing_stops_on_its_token_budget():
    teacher = tiny_model("llama")
    cfg = HealConfig(
        steps=50, batch_size=4, max_length=48, lr=1e-3, top_k=16, max_minutes=None, max_tokens=200
    )
    _, log = heal_model(
        half_slice(teacher), teacher, tiny_tokenizer(), PROMPTS, cfg, progress=False
    )
    assert log.stopped_by == "tokens" and 200 <= log.tokens < 200 + 4 * 48
    assert log.steps < 50


def test_early_stopping_keeps_the_best_weights():
    teacher = tiny_model("llama")
    # a learning rate far too high: the validation loss gets worse after the first steps
    cfg = HealConfig(
        steps=60,
        batch_size=4,
        max_length=48,
        lr=0.05,
        top_k=16,
        max_minutes=None,
        eval_every=2,
        patience=2,
        warmup=0.0,
    )
    healed, log = heal_model(
        half_slice(teacher),
        teacher,
        tiny_tokenizer(),
        PROMPTS,
        cfg,
        validation=PROMPTS[:4],
        progress=False,
    )
    assert log.stopped_by == "patience" and log.steps < 60
    best_step, best_loss = min(log.validation, key=lambda sv: sv[1])
    assert log.best_step == best_step
    batches = token_batches(tiny_tokenizer(), PROMPTS[:4], 48, 4)
    target = teacher_targets(teacher, batches, top_k=16)[0]
    with torch.no_grad():
        logits = healed(input_ids=target.input_ids, attention_mask=target.attention_mask).logits
    assert float(distillation_loss(logits, target)) == pytest.approx(best_loss, rel=1e-4)


@pytest.mark.parametrize("budget", [{"max_tokens": 300}, {"max_minutes": 1e-9}])
def test_a_budget_that_ends_before_the_first_evaluation_keeps_the_trained_weights(budget):
    """Stopped by tokens or time before any scheduled evaluation: the last weights are
    evaluated and kept when better, never the unhealed step-0 weights put back."""
    teacher = tiny_model("llama")
    cfg = HealConfig(
        steps=60,
        batch_size=4,
        max_length=48,
        lr=3e-3,
        top_k=16,
        eval_every=50,
        patience=2,
        **{"max_minutes": None, **budget},
    )
    student = half_slice(teacher)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    healed, log = heal_model(
        student, teacher, tiny_tokenizer(), PROMPTS, cfg, validation=PROMPTS[:4], progress=False
    )
    assert log.stopped_by in ("tokens", "time") and log.steps < 50
    assert [step for step, _ in log.validation] == [0, log.steps]
    assert log.validation[1][1] < log.validation[0][1] and log.best_step == log.steps
    assert any(not torch.equal(before[n], p) for n, p in healed.named_parameters())


@pytest.mark.parametrize("plain_text", [0.0, 0.5])
def test_healing_trains_on_calibration_and_healing_documents_only(
    tiny_llama_dir, tmp_path, monkeypatch, plain_text
):
    """The task's prompts of the calibration and healing documents, and with
    ``heal.plain_text`` a share of those documents as plain text (no answer position);
    never a held-out document."""
    import fbnprune.heal.distill

    seen: dict = {}
    real = fbnprune.heal.distill.prepare_targets

    def spy(teacher, tokenizer, texts, cfg, **kwargs):  # the teacher labels what is trained on
        seen.update(
            texts=list(texts),
            validation=list(kwargs["validation"]),
            questions=list(kwargs["questions"]),
        )
        return real(teacher, tokenizer, texts, cfg, **kwargs)

    monkeypatch.setattr(fbnprune.heal.distill, "prepare_targets", spy)
    r = task_recipe(
        model=tiny_llama_dir,
        heal={
            "enabled": True,
            "steps": 2,
            "batch_size": 4,
            "max_length": 48,
            "top_k": 8,
            "answer_weight": 5,
            "plain_text": plain_text,
        },
    )
    run_pipeline(r, tmp_path / "run", progress=False)
    data = load_task(r.tasks[0], seed=r.seed)
    prompts = data.prompts("calibration") + data.prompts("heal")
    docs = [d.text for d in data.calibration + data.heal]
    plain = docs[1::2] if plain_text else []  # every other document: a share of 0.5
    assert seen["texts"] == prompts + plain
    assert seen["validation"] == data.prompts("heldout")
    assert not set(seen["texts"]) & set(seen["validation"])
    assert not set(seen["texts"]) & {d.text for d in data.heldout}
    assert seen["questions"] == [True] * len(prompts) + [False] * len(plain)
    assert (tmp_path / "run" / "checkpoint-compact-healed" / "config.json").is_file()


def lmeval_yaml(tmp_path) -> str:
    """A local lm-eval multiple-choice task over a local JSONL file (offline)."""
    rows = [{"question": f"Is {n} an even number?", "answer": int(n % 2)} for n in range(40)]
    data = tmp_path / "parity.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    spec = {
        "task": "tiny_parity",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(tmp_path / "cache")},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": ["yes", "no"],
        "doc_to_target": "answer",
        "metric_list": [{"metric": "acc"}],
    }
    file = tmp_path / "tiny_parity.yaml"
    file.write_text(json.dumps(spec))  # JSON is YAML
    return str(file)


def test_an_lmeval_task_drives_calibration_and_evaluation(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    spec = lmeval_yaml(tmp_path)
    task = TaskConfig(
        name="parity",
        source=f"lmeval:{spec}",
        calibration_samples=10,
        heldout_samples=4,
        heal_samples=6,
    )
    data = load_task(task, seed=0)
    assert data.choices == {"yes": " yes", "no": " no"}  # lm-eval's delimiter, then the answer
    prompt = data.prompts("calibration")[0]
    assert prompt.startswith("Question: Is ") and prompt.endswith("?\nAnswer:")
    for doc in data.calibration:
        n = int(doc.text.split()[2])
        assert doc.label == ("yes" if n % 2 == 0 else "no")
    r = task_recipe(tasks=[task.model_dump()], evaluate={"choice_samples": 20})
    build_suite(
        tmp_path / "suite",
        exclude=calibration_documents(r),
        config=r.evaluate,
        recipe=r,
        tasks=["parity"],
    )
    rows = [
        json.loads(line) for line in (tmp_path / "suite" / "parity.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 20 and rows[0]["choices"] == [" yes", " no"]
    used = {d.id for s in ("calibration", "heldout", "heal") for d in data.split(s)}
    assert not {row["id"] for row in rows} & used


def test_an_lmeval_task_reads_its_files_beside_its_yaml_and_keeps_its_ids(tmp_path, monkeypatch):
    """Relative ``data_files`` are the YAML folder's, whatever the working directory; a
    document's own ``id`` names it; ``max_words`` would cut the question, so it is refused
    (issue 29, D2)."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    folder = tmp_path / "task"
    folder.mkdir()
    rows = [{"id": f"q{n}", "question": f"Is {n} even?", "answer": n % 2} for n in range(12)]
    (folder / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    spec = json.loads(Path(lmeval_yaml(tmp_path)).read_text())
    spec["task"] = "tiny_relative"
    spec["dataset_kwargs"] = {
        "data_files": {"test": "rows.jsonl"},
        "cache_dir": str(tmp_path / "c"),
    }
    (folder / "relative.yaml").write_text(json.dumps(spec))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    source = f"lmeval:{folder / 'relative.yaml'}"
    data = load_task(
        TaskConfig(name="rel", source=source, calibration_samples=4, heldout_samples=2), seed=0
    )
    ids = {d.id for d in data.calibration + data.heldout}
    assert ids <= {f"tiny_relative/test/q{n}" for n in range(12)} and len(ids) == 6
    with pytest.raises(ValueError, match="would cut the question"):
        TaskConfig(name="rel", source=source, max_words=10)


def test_a_non_choice_lmeval_task_is_refused(tmp_path):
    spec = json.loads(Path(lmeval_yaml(tmp_path)).read_text())
    spec.update(task="tiny_rolling", output_type="loglikelihood_rolling", doc_to_target="question")
    spec.pop("doc_to_choice")
    file = tmp_path / "rolling.yaml"
    file.write_text(json.dumps(spec))
    with pytest.raises(DataError, match="multiple_choice"):
        load_task(
            TaskConfig(name="r", source=f"lmeval:{file}", calibration_samples=2, heldout_samples=1),
            seed=0,
        )


def test_more_healing_documents_reuse_collection_and_plan(tiny_llama_dir, tmp_path):
    first = run_pipeline(
        task_recipe(model=tiny_llama_dir), tmp_path / "run", until="select", progress=False
    )
    more = task_recipe(model=tiny_llama_dir, tasks=[bbc_task(heal_samples=12)])
    again = run_pipeline(more, tmp_path / "run", until="select", progress=False)
    for stage in ("collect:bbc-news", "select"):
        assert again.stages[stage].finished == first.stages[stage].finished  # reused
    recorded = json.loads((tmp_path / "run" / "documents.json").read_text())
    assert len(recorded["tasks"]["bbc-news"]["heal"]) == 12


def test_numeric_labels_match_and_boolean_labels_are_refused(tmp_path):
    """YAML reads ``0:`` as a number and a .jsonl label 0 becomes "0": they match. ``yes:``
    is a boolean to YAML: refused with the fix."""
    data = tmp_path / "posts.jsonl"
    rows = [{"text": f"post number {i} about things", "label": i % 2} for i in range(30)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = TaskConfig.model_validate(
        {
            "name": "posts",
            "source": f"file:{data}",
            "template": "Post: {text}\nGood:",
            "choices": {0: " no", 1: " yes"},
            "calibration_samples": 8,
            "heldout_samples": 4,
        }
    )
    assert task.choices == {"0": " no", "1": " yes"}
    loaded = load_task(task, seed=0)
    assert {d.label for d in loaded.calibration} <= {"0", "1"}
    assert loaded.gold_answer(loaded.calibration[0]) in (" no", " yes")
    with pytest.raises(ValueError, match="quote the label"):
        TaskConfig.model_validate(
            {"name": "t", "source": "builtin:bbc_news", "choices": {True: " yes", False: " no"}}
        )
