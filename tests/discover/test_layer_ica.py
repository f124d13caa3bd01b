"""Per-layer ICA (``discover.scope: layer``): planted sources per layer, one layer equals the
group fit, both engines, the recipe setting and the pipeline.

Tolerances:
- planted sources (each layer its own 3 heavy-tailed sources, each driving 8 of that layer's
  units): every planted mixing row is matched (Hungarian, |corr| of the maps within its
  layer) by a map with |corr| >= 0.95, and its network by one of IoU >= 0.8; no unit outside
  a layer's block enters that layer's maps (exactly zero there).
- one layer: ``LayerICA`` and ``GroupICA`` are the same computation, so exactly equal.
- dask engine vs in memory per layer, float32 store: every matched map |corr| >= 0.99 (they
  differ only by the randomized SVD's sketch, as in tests/discover/test_dask_ica.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from conftest import REPO, tiny_recipe
from scipy.optimize import linear_sum_assignment

from fbnprune.collect.store import ActivationStore, StoreWriter
from fbnprune.discover.dask_ica import DaskGroupICA
from fbnprune.discover.group_ica import DiscoverError, GroupICA
from fbnprune.discover.layer_ica import LayerICA, layer_components, read_columns
from fbnprune.pipeline import run_pipeline
from fbnprune.recipe import RecipeError, load_recipe, parse_recipe
from fbnprune.rundir import RunDir
from fbnprune.rundir.context import RunContext

WIDTHS = [300, 400, 250]
RECIPES = REPO / "recipes"


def planted_layers(n_tokens: int = 2500, widths=WIDTHS, k: int = 3, size: int = 8, seed: int = 0):
    """Each layer's units mix that layer's own ``k`` sources (``size`` units each, disjoint)
    plus noise. Returns X (float32) and the mixing rows (n_layers * k, n_neurons)."""
    rng = np.random.default_rng(seed)
    n = sum(widths)
    mixing = np.zeros((len(widths) * k, n))
    start = 0
    for layer, width in enumerate(widths):
        members = start + rng.permutation(width)[: k * size].reshape(k, size)
        for c in range(k):
            mixing[layer * k + c, members[c]] = rng.uniform(2.0, 3.0, size)
        start += width
    sources = rng.laplace(size=(n_tokens, len(mixing))) ** 3
    sources /= sources.std(axis=0)
    X = sources @ mixing + 0.5 * rng.normal(size=(n_tokens, n))
    return X.astype(np.float32), mixing


def best_match(truth: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``truth``, the matched row of ``maps`` and its |corr| (Hungarian)."""
    k = len(truth)
    corr = np.nan_to_num(np.abs(np.corrcoef(truth, maps)[:k, k:]))
    rows, cols = linear_sum_assignment(-corr)
    return cols[np.argsort(rows)], corr[rows, cols][np.argsort(rows)]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / max(1, np.logical_or(a, b).sum()))


@pytest.fixture(scope="module")
def layered():
    X, mixing = planted_layers()
    return X, mixing, LayerICA(estimator=GroupICA(n_components=3), layer_widths=WIDTHS).fit(X)


def test_per_layer_recovers_each_layers_planted_sources(layered):
    X, mixing, ica = layered
    assert ica.converged_ and list(ica.n_components_) == [3, 3, 3]
    assert ica.z_maps_.shape == ica.networks_.shape == (3, sum(WIDTHS))
    bounds = np.cumsum([0, *WIDTHS])
    for layer, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        truth = mixing[3 * layer : 3 * layer + 3, a:b]
        order, corr = best_match(truth, ica.maps_[:, a:b])
        assert corr.min() >= 0.95, (layer, corr)
        for c, j in enumerate(order):
            assert iou(truth[c] > 0, ica.networks_[j, a:b]) >= 0.8
        assert (ica.z_maps_[:, a:b] ** 3).mean(axis=1).min() > 0  # positive skew, per layer
    # a unit's evidence is its own layer's: scores are max |z| over the block layout
    np.testing.assert_array_equal(ica.neuron_scores(), np.abs(ica.z_maps_).max(axis=0))
    assert ica.union().sum() == ica.network_sizes().sum() == (mixing > 0).sum()


def test_one_layer_is_the_group_fit():
    X, _ = planted_layers(n_tokens=800, widths=[200])
    group = GroupICA(n_components=4, random_state=3).fit(X)
    layer = LayerICA(estimator=GroupICA(n_components=4, random_state=3), layer_widths=[200])
    layer.fit(X)
    np.testing.assert_array_equal(layer.z_maps_, group.z_maps_)
    np.testing.assert_array_equal(layer.maps_, group.maps_)
    np.testing.assert_array_equal(layer.networks_, group.networks_)
    np.testing.assert_array_equal(layer.neuron_scores(), group.neuron_scores())
    np.testing.assert_array_equal(
        layer.explained_variance_ratio_[0], group.explained_variance_ratio_
    )


def test_components_shrink_to_what_a_layer_allows():
    assert layer_components(8, 100, [3, 50, 9]) == [2, 8, 8]
    assert layer_components(8, 6, [3, 50]) == [2, 5]
    with pytest.raises(DiscoverError, match="at least 2 tokens and 2 units"):
        layer_components(8, 100, [1, 50])
    X, _ = planted_layers(n_tokens=400, widths=[4, 100], k=1, size=2)
    ica = LayerICA(estimator=GroupICA(n_components=6), layer_widths=[4, 100]).fit(X)
    assert list(ica.n_components_) == [3, 6] and ica.z_maps_.shape == (6, 104)
    assert not ica.z_maps_[3:, :4].any() and not ica.networks_[3:, :4].any()
    assert len(ica.network_sizes()) == 9
    with pytest.warns(RuntimeWarning, match="layer 1: only 100 tokens for 30 ICA components"):
        LayerICA(estimator=GroupICA(n_components=30), layer_widths=[4, 100]).fit(X[:100])
    with pytest.raises(DiscoverError, match="sum to 100"):
        LayerICA(estimator=GroupICA(), layer_widths=[50, 50]).fit(X)


def test_memmap_is_read_one_layer_at_a_time(layered, tmp_path, monkeypatch):
    X, _, reference = layered
    np.save(tmp_path / "x.npy", X)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    import fbnprune.discover.layer_ica as layer_ica

    monkeypatch.setattr(layer_ica, "COPY_BYTES", 4096 * 4)  # many small copies
    np.testing.assert_array_equal(read_columns(mapped, 300, 700), X[:, 300:700])
    seen: list[tuple[int, ...]] = []
    fit = GroupICA.fit

    def spy(self, data, y=None):
        seen.append(tuple(data.shape))
        assert not isinstance(data, np.memmap)  # a copy of the block, not the file
        return fit(self, data)

    monkeypatch.setattr(GroupICA, "fit", spy)
    ica = LayerICA(estimator=GroupICA(n_components=3), layer_widths=WIDTHS).fit(mapped)
    assert seen == [(len(X), w) for w in WIDTHS]
    np.testing.assert_array_equal(ica.z_maps_, reference.z_maps_)


def test_dask_engine_reads_one_chunk_column_per_layer(layered, tmp_path):
    X, _, reference = layered
    with StoreWriter(
        tmp_path / "a.zarr", n_tokens=len(X), layer_widths=WIDTHS, site="hidden", dtype="float32"
    ) as writer:
        for i, start in enumerate(range(0, len(X), 500)):
            writer.append(X[start : start + 500], i)
        store = writer.commit()
    store = ActivationStore(tmp_path / "a.zarr")
    # in memory from a store: one layer's array at a time, the same values exactly
    in_memory = LayerICA(estimator=GroupICA(n_components=3), layer_widths=WIDTHS).fit(store)
    np.testing.assert_array_equal(in_memory.z_maps_, reference.z_maps_)
    dask = LayerICA(
        estimator=DaskGroupICA(n_components=3, memory="4MiB", threads=1), layer_widths=WIDTHS
    ).fit(store)
    bounds = np.cumsum([0, *WIDTHS])
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        _, corr = best_match(reference.maps_[:, a:b], dask.maps_[:, a:b])
        assert corr.min() >= 0.99
    np.testing.assert_allclose(
        dask.explained_variance_ratio_, reference.explained_variance_ratio_, rtol=1e-3
    )


# --- the recipe setting and the pipeline --------------------------------------------------------


def test_shipped_recipes_keep_their_fingerprints():
    """Values computed on the commit before ``discover.scope`` existed."""
    expected = {
        "analyze-gemma3.yaml": ("1b0624ff396b1ec3", "c89255d27ed6a5d2"),
        "analyze-smollm2.yaml": ("be39bafd1c6d3fe7", "c89255d27ed6a5d2"),
        "demo.yaml": ("5a0f165ad6e96d69", "c89255d27ed6a5d2"),
        "gemma3-bbc.yaml": ("2c5adddff7bb4e7b", "c89255d27ed6a5d2"),
        "multitask.yaml": ("fe9fc2a344256f43", "9286310ff59673ff"),
    }
    # the recipes shipped before (later ones, e.g. the small ones, have no earlier key)
    assert set(expected) <= {p.name for p in RECIPES.glob("*.yaml")}
    for name, (whole, discover) in expected.items():
        recipe = load_recipe(RECIPES / name)
        assert (recipe.fingerprint(), recipe.fingerprint("discover")) == (whole, discover)
        raw = yaml.safe_load((RECIPES / name).read_text())
        group = parse_recipe({**raw, "discover": {**raw.get("discover", {}), "scope": "group"}})
        layer = parse_recipe({**raw, "discover": {**raw.get("discover", {}), "scope": "layer"}})
        assert group.fingerprint() == whole
        assert layer.fingerprint("discover") != discover
        assert parse_recipe(yaml.safe_load(layer.to_yaml())) == layer


def test_recipe_rejects_an_unknown_scope(tmp_path):
    path = tmp_path / "r.yaml"
    base = {"model": "m", "tasks": [{"name": "t", "source": "builtin:bbc_news"}]}
    path.write_text(yaml.safe_dump({**base, "discover": {"scope": "neuron"}}))
    with pytest.raises(RecipeError, match="discover.scope"):
        load_recipe(path)


def test_pipeline_runs_end_to_end_with_scope_layer(tiny_llama_dir, tmp_path):
    recipe = parse_recipe(tiny_recipe(tiny_llama_dir, discover={"scope": "layer"}))
    summary = run_pipeline(recipe, tmp_path / "run", progress=False)
    assert summary.plan is not None
    assert summary.plan.provenance["discover_scope"] == "layer"
    assert (tmp_path / "run/parity.json").is_file()
    ctx = RunContext(recipe, RunDir.open(tmp_path / "run"), progress=False)
    with np.load(ctx.layout.discover_file("news")) as data:
        assert str(data["scope"]) == "layer"
        widths = list(data["layer_widths"])
        assert widths == [48, 48, 48] and list(data["components_per_layer"]) == [8, 8, 8]
        assert data["z_maps"].shape == (8, 144)
        np.testing.assert_array_equal(data["scores"], np.abs(data["z_maps"]).max(axis=0))
        assert data["explained_variance_ratio"].shape == (3, 8)
    # the same run on zarr + dask: the same per-layer decomposition, read layer by layer
    scaled = parse_recipe(
        {
            **tiny_recipe(
                tiny_llama_dir, discover={"scope": "layer", "engine": "dask", "memory": "64MiB"}
            ),
            "collect": {"batch_size": 4, "storage": "zarr"},
        }
    )
    dask_run = run_pipeline(scaled, tmp_path / "dask", until="select", progress=False)
    assert dask_run.plan is not None
    assert (tmp_path / "dask/collect/news/activations.zarr").is_dir()
    with np.load(tmp_path / "dask/discover/news.npz") as data:
        assert str(data["scope"]) == "layer" and data["explained_variance_ratio"].shape == (3, 8)
    assert sum(dask_run.plan.kept_per_layer()) == sum(summary.plan.kept_per_layer())


def test_validate_lets_per_layer_fits_lower_their_components(tiny_llama_dir):
    from fbnprune.cli.validate import check_data

    many = tiny_recipe(tiny_llama_dir)
    many["discover"]["n_components"] = 5000  # more than the calibration tokens
    with pytest.raises(RecipeError, match="n_components=5000 needs more than"):
        check_data(parse_recipe(many))
    many["discover"]["scope"] = "layer"
    assert "calibration tokens" in check_data(parse_recipe(many))[0]
