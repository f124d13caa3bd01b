"""fbnprune evaluate: the offline suite, the lm-eval harness in process, results, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from conftest import NEWS_TASK, tiny_model, tiny_recipe, tiny_tokenizer

from fbnprune.cli import main
from fbnprune.data.task_text import Document, load_documents, normalise
from fbnprune.evaluate import SUITE, EvalError, Harness, build_suite, calibration_documents
from fbnprune.evaluate.harness import primary_metric
from fbnprune.evaluate.results import preferred_pruned, results_markdown
from fbnprune.evaluate.suite import (
    BBC_TOPICS,
    default_tasks,
    draw_documents,
    word_problem_record,
)
from fbnprune.pipeline import run_pipeline
from fbnprune.recipe import EvaluateConfig, parse_recipe

SMALL = {"choice_samples": 10, "perplexity_samples": 4, "perplexity_max_words": 48}
VARIANTS = [
    "original",
    "masked",
    "sliced-padded",
    "sliced-compact",
    "checkpoint-padded",
    "checkpoint-compact",
]


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory, monkeypatch):
    """A private HF_HOME, offline, and one torch thread (tiny models gain nothing from more;
    on a busy 2-core machine more threads only contend)."""
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(home / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def recipe_dict(model: str = "unused", **overrides) -> dict:
    """The tiny recipe, magnitude-selected, with a small evaluate section."""
    sections = {
        "name": "tiny-eval",
        "tasks": [{k: v for k, v in NEWS_TASK.items() if k != "template"}],
        "select": {"selector": "magnitude"},
        "evaluate": SMALL,
    }
    return tiny_recipe(model, **{**sections, **overrides})


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- suite: which documents -------------------------------------------------------------------


def test_suite_never_overlaps_calibration(tmp_path):
    """Large calibration sets on three corpora; no eval document shares an id or a text."""
    recipe = parse_recipe(
        recipe_dict(
            tasks=[
                {
                    "name": "news",
                    "source": "builtin:bbc_news",
                    "calibration_samples": 1500,
                    "heldout_samples": 10,
                },
                {
                    "name": "wiki",
                    "source": "builtin:wikipedia",
                    "calibration_samples": 600,
                    "heldout_samples": 10,
                },
                {
                    "name": "math",
                    "source": "builtin:arithmetic",
                    "calibration_samples": 1000,
                    "heldout_samples": 10,
                },
            ],
            evaluate={"choice_samples": 200, "perplexity_samples": 200},
        )
    )
    calibration = calibration_documents(recipe)
    assert len(calibration) == 3130  # calibration and held-out documents of all three
    suite = build_suite(tmp_path / "suite", exclude=calibration, config=recipe.evaluate)
    cal_ids = {d.id for d in calibration}
    cal_texts = {normalise(d.text) for d in calibration}
    by_id = {
        d.id: d
        for src in ("bbc_news", "wikipedia", "python_code", "arithmetic")
        for d in load_documents(f"builtin:{src}")
    }
    for name in SUITE:
        ids = [r["id"] for r in read_jsonl(tmp_path / "suite" / f"{name}.jsonl")]
        assert ids == suite.doc_ids[name] and len(ids) == len(set(ids)) > 0
        assert not set(ids) & cal_ids, name
        assert not {normalise(by_id[i].text) for i in ids} & cal_texts, name
    # the BBC corpus holds 100 duplicate articles under other ids: text matching catches them
    manifest = json.loads((tmp_path / "suite" / "manifest.json").read_text())
    assert manifest["excluded_documents"] == 3130


def test_duplicate_text_under_another_id_is_excluded():
    docs = [
        Document("a", "Same  text\nhere."),
        Document("b", "Same text here."),
        Document("c", "Other text."),
        Document("d", "Other text."),
    ]
    picked = draw_documents(
        docs, 10, exclude=[Document("x", "same text here.".capitalize())], seed=0
    )
    assert [d.id for d in picked] in (["c"], ["d"])  # a and b excluded by text, d dup of c


def test_draw_is_deterministic_stable_and_balanced():
    docs = load_documents("builtin:bbc_news")
    first = draw_documents(docs, 50, exclude=[], seed=0, balance_labels=True)
    assert first == draw_documents(docs, 50, exclude=[], seed=0, balance_labels=True)
    assert {t: sum(d.label == t for d in first) for t in BBC_TOPICS} == dict.fromkeys(
        BBC_TOPICS, 10
    )
    # excluding documents only removes them; the others keep their places
    gone = first[:3]
    second = draw_documents(docs, 200, exclude=gone, seed=0)
    plain = [d for d in draw_documents(docs, 203, exclude=[], seed=0) if d not in gone]
    assert second == plain[:200]
    assert draw_documents(docs, 50, exclude=[], seed=1) != draw_documents(
        docs, 50, exclude=[], seed=0
    )


def test_word_problem_choices():
    docs = load_documents("builtin:arithmetic")[:200]
    for doc in docs:
        rec = word_problem_record(doc, seed=0)
        values = [int(c) for c in rec["choices"]]
        assert len(set(values)) == 4 and min(values) >= 0 and values == sorted(values)
        assert rec["choices"][rec["gold"]] == doc.label
        assert rec["prompt"].endswith("Answer:")
        assert rec == word_problem_record(doc, seed=0)


def test_suite_yaml_is_lm_eval_offline(tmp_path):
    from lm_eval.tasks import TaskManager

    build_suite(tmp_path / "suite", exclude=[], config=EvaluateConfig(**SMALL))
    for name in SUITE:
        spec = yaml.safe_load((tmp_path / "suite" / f"{name}.yaml").read_text())
        data = spec["dataset_kwargs"]["data_files"]["test"]
        assert spec["dataset_path"] == "json" and data.startswith("/") and data.endswith(".jsonl")
    manager = TaskManager(include_path=str(tmp_path / "suite"), include_defaults=False)
    assert set(SUITE) <= set(manager.all_tasks) and "fbnprune_suite" in manager.all_tags
    assert sorted(manager.load(["fbnprune_suite"])["tasks"]) == sorted(SUITE)


def test_bbc_prompt_and_choices(tmp_path):
    build_suite(tmp_path, exclude=[], config=EvaluateConfig(**SMALL), tasks=["bbc_topics"])
    rows = read_jsonl(tmp_path / "bbc_topics.jsonl")
    assert len(rows) == 10
    for row in rows:
        assert row["prompt"].startswith("Article: ") and row["prompt"].endswith("\nTopic:")
        assert len(row["prompt"].split()) <= 120 + 2
        assert row["choices"] == list(BBC_TOPICS)
    assert sorted(r["gold"] for r in rows) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


# --- metric choice ----------------------------------------------------------------------------


def test_acc_is_primary_because_acc_norm_favours_long_labels(tmp_path):
    """lm-eval's acc_norm divides each choice's log-likelihood by its length in characters.
    With single-word labels the log-likelihood does not grow with length, so the division
    hands the win to the longest label ("entertainment", 13 characters) even when the model
    clearly prefers the right short one ("tech": -2.0 vs -5.0 nats)."""
    from lm_eval.tasks import TaskManager

    build_suite(tmp_path, exclude=[], config=EvaluateConfig(**SMALL), tasks=["bbc_topics"])
    task = TaskManager(include_path=str(tmp_path), include_defaults=False).load(["bbc_topics"])[
        "tasks"
    ]["bbc_topics"]
    doc = next(d for d in task.eval_docs if BBC_TOPICS[d["gold"]] == "tech")
    lls = {"business": -6.0, "entertainment": -5.0, "politics": -6.0, "sport": -6.0, "tech": -2.0}
    out = task.process_results(doc, [(lls[c], False) for c in doc["choices"]])
    assert out["acc"] == 1.0 and out["acc_norm"] == 0.0
    assert primary_metric("bbc_topics", {"acc": True, "acc_norm": True}) == "acc"
    assert primary_metric("word_problems", {"acc": True, "acc_norm": True}) == "acc"
    assert primary_metric("hellaswag", {"acc": True, "acc_norm": True}) == "acc"
    assert primary_metric("ppl_news", {"word_perplexity": False}) == "word_perplexity"


def test_pruned_alias_preference():
    assert preferred_pruned(VARIANTS) == "sliced-padded"
    assert preferred_pruned(["original", "masked", "sliced-compact"]) == "sliced-compact"
    assert preferred_pruned(["original", "masked"]) == "masked"
    assert preferred_pruned(["original"]) is None


def test_results_table_names_the_variant_each_card_reports():
    task = {"metric": "acc", "higher_is_better": True, "n_docs": 3, "stderr": {}}
    scores = {"original": 0.5, "checkpoint-compact": 0.3, "pruned": 0.3}
    plain = {"pruned": "checkpoint-compact", "tasks": {"t": {**task, "models": scores}}}
    assert "those of `checkpoint-compact`." in results_markdown(plain)
    healed = {**scores, "checkpoint-compact-healed": 0.6}
    table = results_markdown({**plain, "tasks": {"t": {**task, "models": healed}}})
    assert "(`checkpoint-compact-healed` in the card of an `export --healed`)" in table


def test_unknown_task_is_named(tmp_path):
    build_suite(tmp_path, exclude=[], config=EvaluateConfig(**SMALL), tasks=["bbc_topics"])
    with pytest.raises(EvalError, match="bbc_topics"):
        build_suite(tmp_path, exclude=[], tasks=["bbc_topic"])
    with pytest.raises(EvalError, match="include path not found"):
        Harness(["bbc_topics"], include_paths=[tmp_path / "nowhere"])


def test_evaluate_models_takes_pairs_and_context_factories(tmp_path):
    """The in-process API a benchmark uses: a (model, tokenizer) pair, and a factory whose
    context manager applies a plan by hooks and removes them afterwards."""
    import contextlib

    from fbnprune.evaluate import evaluate_models
    from fbnprune.plan import PrunePlan
    from fbnprune.pruning.mask import masked

    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    widths = [48, 48, 48]
    plan = PrunePlan(
        model="tiny",
        model_type="llama",
        site="hidden",
        fill="zero",
        layer_widths=widths,
        kept=[list(range(0, 48, 4))] * 3,
    )
    entered = []

    @contextlib.contextmanager
    def pruned():
        with masked(model, plan):
            entered.append(True)
            yield model, tokenizer

    build_suite(tmp_path, exclude=[], config=EvaluateConfig(**SMALL), tasks=["ppl_code"])
    scores = evaluate_models(
        {"original": (model, tokenizer), "masked": pruned, "again": (model, tokenizer)},
        ["ppl_code"],
        include_path=tmp_path,
        limit=2,
        batch_size=2,
    )
    assert entered == [True]
    ppl = {name: s["ppl_code"]["word_perplexity"] for name, s in scores.items()}
    assert ppl["again"] == pytest.approx(ppl["original"], rel=1e-6)  # hooks were removed
    assert ppl["masked"] != pytest.approx(ppl["original"], rel=1e-3)
    assert set(scores["original"]["ppl_code"]) >= {"word_perplexity", "bits_per_byte"}


# --- end to end -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished run (plan, parity, padded and compact checkpoints) of a tiny Llama."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eval-run")
    model_dir = root / "tiny-llama"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    recipe = parse_recipe(recipe_dict(str(model_dir)))
    run_pipeline(recipe, root / "run", progress=False)
    torch.set_num_threads(threads)
    return root / "run"


def test_cli_scores_every_variant_on_every_task(tiny_run, capsys):
    assert main(["evaluate", str(tiny_run), "--limit", "4", "--batch-size", "4"]) == 0
    shown = capsys.readouterr().out
    results = json.loads((tiny_run / "eval" / "results.json").read_text())
    assert set(results["tasks"]) == set(SUITE)
    assert results["pruned"] == "sliced-padded"
    assert list(results["models"]) == VARIANTS
    assert results["settings"]["limit"] == 4 and results["settings"]["offline"] is True
    assert results["settings"]["plan"]["kept_fraction"] == pytest.approx(0.25, abs=0.01)
    assert {"lm_eval", "torch", "transformers"} <= set(results["versions"])
    assert (
        results["models"]["sliced-compact"]["parameters"]
        < results["models"]["original"]["parameters"]
    )

    original_differs = False
    for name, task in results["tasks"].items():
        values = task["models"]
        assert set(values) == {*VARIANTS, "pruned"} and values["pruned"] == values["sliced-padded"]
        assert task["n_docs"] == 4
        for model, value in values.items():
            assert value is not None and math.isfinite(value), (name, model)
            if task["metric"] == "acc":
                assert 0.0 <= value <= 1.0
            else:
                assert value > 1.0 and not task["higher_is_better"]
        if task["metric"] == "acc":
            assert set(task["other_metrics"]) == {"acc_norm"}
        else:
            assert set(task["other_metrics"]) == {"byte_perplexity", "bits_per_byte"}
            bpb = task["other_metrics"]["bits_per_byte"]
            assert all(0 < v < 20 for v in bpb.values())
        # masking and slicing are exact, so the pruned variants score the same
        for model in VARIANTS[2:]:
            assert values[model] == pytest.approx(values["masked"], rel=1e-4), (name, model)
        original_differs |= values["original"] != values["masked"]
    assert original_differs, "the plan must change the model"

    table = (tiny_run / "eval" / "results.md").read_text()
    assert all(f"| {name} |" in table for name in SUITE)
    assert "| task | metric | original | masked | sliced-padded |" in table
    assert "| bbc_topics |" in shown and "results.json" in shown
    suite_ids = json.loads((tiny_run / "eval" / "suite" / "manifest.json").read_text())["doc_ids"]
    calibration = set(
        json.loads((tiny_run / "collect" / "news" / "meta.json").read_text())["sample_ids"]
    )
    assert not calibration & set(suite_ids["bbc_topics"]) and not calibration & set(
        suite_ids["ppl_news"]
    )


def test_cli_subset_of_models_and_tasks(tiny_run):
    rc = main(
        [
            "evaluate",
            str(tiny_run),
            "--tasks",
            "bbc_topics",
            "--models",
            "original,checkpoint",
            "--limit",
            "2",
        ]
    )
    assert rc == 0
    results = json.loads((tiny_run / "eval" / "results.json").read_text())
    assert list(results["tasks"]) == ["bbc_topics"]
    assert list(results["models"]) == ["original", "checkpoint-padded", "checkpoint-compact"]
    assert results["pruned"] == "checkpoint-padded"
    assert results["models"]["checkpoint-compact"]["trust_remote_code"] is True


def test_user_yaml_task_via_include_path(tiny_run, tmp_path):
    data = tmp_path / "yesno.jsonl"
    data.write_text(
        "\n".join(json.dumps({"q": f"is {i} even? answer:", "gold": i % 2}) for i in range(6))
        + "\n"
    )
    (tmp_path / "yesno.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "my_yesno",
                "dataset_path": "json",
                "test_split": "test",
                "dataset_kwargs": {
                    "data_files": {"test": str(data)},
                    "cache_dir": str(tmp_path / "c"),
                },
                "output_type": "multiple_choice",
                "doc_to_text": "q",
                "doc_to_choice": ["yes", "no"],
                "doc_to_target": "gold",
                "metric_list": [{"metric": "acc"}],
            }
        )
    )
    rc = main(
        [
            "evaluate",
            str(tiny_run),
            "--tasks",
            "my_yesno,ppl_code",
            "--models",
            "original,masked",
            "--include-path",
            str(tmp_path),
        ]
    )
    assert rc == 0
    results = json.loads((tiny_run / "eval" / "results.json").read_text())
    assert list(results["tasks"]) == ["my_yesno", "ppl_code"]
    assert results["tasks"]["my_yesno"]["metric"] == "acc"
    assert results["tasks"]["my_yesno"]["n_docs"] == 6
    assert results["pruned"] == "masked"


def test_cli_errors_are_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    assert main(["evaluate", str(run)]) == 2
    assert "no recipe.yaml" in capsys.readouterr().err
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe_dict()))
    assert main(["evaluate", str(run)]) == 2
    assert "no plan.json" in capsys.readouterr().err
    assert main(["evaluate", str(run), "--models", "original,pruned"]) == 2
    assert "unknown model kind" in capsys.readouterr().err


def test_recipes_without_evaluate_section_get_defaults():
    recipe = parse_recipe({k: v for k, v in recipe_dict().items() if k != "evaluate"})
    assert recipe.evaluate == EvaluateConfig()
    assert recipe.evaluate.tasks is None  # the recipe's own choice tasks, else the suite
    assert default_tasks(recipe) == list(SUITE)  # this recipe's task has no choices
    with pytest.raises(ValueError, match="unknown key"):
        parse_recipe(recipe_dict(evaluate={"task": ["bbc_topics"]}))


# --- a real model -----------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_bbc_topics_above_chance(tmp_path):
    from fbnprune.models.loading import load_model

    torch.set_num_threads(2)
    model, tokenizer = load_model("smollm2-135m")
    recipe = parse_recipe(
        recipe_dict(
            "smollm2-135m",
            tasks=[
                {
                    "name": "news",
                    "source": "builtin:bbc_news",
                    "calibration_samples": 64,
                    "heldout_samples": 16,
                },
            ],
        )
    )
    build_suite(
        tmp_path,
        exclude=calibration_documents(recipe),
        config=EvaluateConfig(choice_samples=40),
        tasks=["bbc_topics"],
    )
    harness = Harness(["bbc_topics"], include_paths=[tmp_path], batch_size=8)
    scores = harness.score(model, tokenizer)["bbc_topics"]
    assert scores["acc"] > 0.2, f"SmolLM2-135M BBC topics on 40 docs: {scores}"


def test_unknown_lm_eval_task_gets_a_hint():
    from fbnprune.evaluate.harness import _raise_unknown

    with pytest.raises(EvalError, match=r"'bbc_topic' \(did you mean bbc_topics"):
        _raise_unknown(["bbc_topic"], ["bbc_topics", "ppl_news", "hellaswag"])
