"""Scale: the zarr activation store, out-of-core group ICA on dask (threads and a
``distributed.LocalCluster``), and their wiring into recipes and the pipeline.

Tolerances:
- float16 store: every value within half a unit in the last place, |x| * 2**-11 (plus 2**-24
  for subnormals); bfloat16: |x| * 2**-8; float32: exact.
- dask path vs the in-memory GroupICA on planted independent sources (components matched by
  the Hungarian algorithm on |corr| of maps): every matched map |corr| >= 0.99 and mean IoU of
  the matched thresholded networks >= 0.9 (the two differ only by the randomized SVD's sketch
  and float summation order; on this data they agree to |corr| > 0.999). Both paths must also
  find the planted networks (mean IoU >= 0.8 against the truth), so agreement cannot come
  from both failing the same way.
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from conftest import tiny_recipe
from scipy.optimize import linear_sum_assignment

from fbnprune.collect.stage import collect
from fbnprune.collect.store import ActivationStore, StoreError, StoreWriter, decode, encode
from fbnprune.discover.dask_ica import (
    DaskGroupICA,
    discover_input,
    parse_memory,
    row_block,
    use_scheduler,
)
from fbnprune.discover.group_ica import DiscoverError, GroupICA
from fbnprune.pipeline import run_pipeline
from fbnprune.recipe import RecipeError, load_recipe, parse_recipe
from fbnprune.rundir import RunDir
from fbnprune.rundir.context import RunContext
from fbnprune.rundir.runner import fingerprint

# --- planted sources -------------------------------------------------------------------------


def planted(
    n_tokens: int = 3000,
    n_neurons: int = 400,
    k: int = 6,
    seed: int = 0,
    size: int = 12,
    noise: float = 0.5,
):
    """X = S @ A + noise: k heavy-tailed independent sources, each driving its own network of
    ``size`` neurons (disjoint). Returns X (float32) and the true networks (k, n_neurons)."""
    rng = np.random.default_rng(seed)
    sources = rng.laplace(size=(n_tokens, k)) ** 3
    sources /= sources.std(axis=0)
    mixing = np.zeros((k, n_neurons))
    truth = np.zeros((k, n_neurons), dtype=bool)
    members = rng.permutation(n_neurons)[: k * size].reshape(k, size)
    for c in range(k):
        mixing[c, members[c]] = rng.uniform(2.0, 3.0, size)
        truth[c, members[c]] = True
    X = sources @ mixing + noise * rng.normal(size=(n_tokens, n_neurons))
    return X.astype(np.float32), truth


def match(a_maps: np.ndarray, b_maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian matching of rows of ``a_maps`` to rows of ``b_maps`` on |corr|: the matched
    b row for every a row, and its |corr|."""
    k = len(a_maps)
    corr = np.abs(np.corrcoef(a_maps, b_maps)[:k, k:])
    rows, cols = linear_sum_assignment(-corr)
    return cols[np.argsort(rows)], corr[rows, cols][np.argsort(rows)]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def mean_matched_iou(a_nets: np.ndarray, b_nets: np.ndarray, order: np.ndarray) -> float:
    return float(np.mean([iou(a_nets[i], b_nets[j]) for i, j in enumerate(order)]))


def truth_iou(networks: np.ndarray, truth: np.ndarray) -> float:
    scores = np.array([[iou(n, t) for t in truth] for n in networks])
    rows, cols = linear_sum_assignment(-scores)
    return float(scores[rows, cols].mean())


@pytest.fixture(scope="module")
def planted_data():
    X, truth = planted()
    reference = GroupICA(n_components=6, random_state=0).fit(X)
    assert truth_iou(reference.networks_, truth) >= 0.8  # the reference itself finds them
    return X, truth, reference


def assert_same_networks(ica, reference, truth) -> None:
    order, corr = match(reference.maps_, ica.maps_)
    assert corr.min() >= 0.99, corr
    assert mean_matched_iou(reference.networks_, ica.networks_, order) >= 0.9
    assert truth_iou(ica.networks_, truth) >= 0.8
    assert ica.maps_.shape == ica.z_maps_.shape == ica.networks_.shape == reference.maps_.shape
    assert ica.maps_.dtype == ica.z_maps_.dtype == np.float32


# --- the store -------------------------------------------------------------------------------


def write_store(path, X, widths, *, dtype="float16", chunk_tokens=64, batch=50):
    with StoreWriter(
        path,
        n_tokens=len(X),
        layer_widths=widths,
        site="hidden",
        dtype=dtype,
        chunk_tokens=chunk_tokens,
    ) as writer:
        for sample, start in enumerate(range(0, len(X), batch)):
            writer.append(X[start : start + batch], sample)
        return writer.commit(tokens_per_second=123.0)


@pytest.mark.parametrize(
    ("dtype", "rel", "absolute"),
    [
        ("float16", 2**-11, 2**-24),
        ("bfloat16", 2**-8, 0.0),
        ("float32", 0.0, 0.0),
    ],
)
def test_store_round_trips_shape_dtype_sample_index_and_values(tmp_path, dtype, rel, absolute):
    rng = np.random.default_rng(1)
    X = (rng.standard_normal((301, 40)) * np.logspace(-3, 3, 40)).astype(np.float32)
    widths = [10, 20, 10]  # unequal layers: one array each
    store = write_store(tmp_path / "a.zarr", X, widths, dtype=dtype)
    again = ActivationStore(tmp_path / "a.zarr")
    assert again.shape == (301, 40) and again.layer_widths == widths and again.dtype == dtype
    assert again.site == "hidden" and again.tokens_per_second == 123.0
    np.testing.assert_array_equal(again.sample_index, np.arange(301) // 50)
    values = again.numpy()
    assert values.dtype == np.float32 and values.shape == X.shape
    err = np.abs(values - X)
    assert (err <= np.abs(X) * rel + absolute).all(), err.max()
    if dtype != "float32":
        assert err.max() > 0  # the precision was really reduced
    # chunks are tokens x one layer
    start = 0
    for layer, width in enumerate(widths):
        assert store._group[f"layer_{layer:03d}"].chunks == (64, width)
        np.testing.assert_array_equal(again.layer(layer), values[:, start : start + width])
        start += width
    lazy = again.dask(128)
    assert lazy.dtype == np.float32 and lazy.chunks[1] == tuple(widths)
    np.testing.assert_array_equal(lazy.compute(), values)
    np.testing.assert_array_equal(again.numpy(slice(100, 150)), values[100:150])


def test_layer_by_layer_writes_equal_row_writes(tmp_path):
    X = np.random.default_rng(2).standard_normal((200, 30)).astype(np.float32)
    rows = write_store(tmp_path / "rows.zarr", X, [10, 20])
    with StoreWriter(
        tmp_path / "layers.zarr",
        n_tokens=200,
        layer_widths=[10, 20],
        site="hidden",
        chunk_tokens=64,
    ) as writer:
        writer.write_layer(1, 0, X[:, 10:], sample=np.arange(200) // 50)
        writer.write_layer(0, 0, X[:, :10])
        layers = writer.commit()
    np.testing.assert_array_equal(layers.numpy(), rows.numpy())
    np.testing.assert_array_equal(layers.sample_index, rows.sample_index)


def test_an_unfinished_store_leaves_nothing_and_float16_clips(tmp_path):
    X = np.ones((10, 4), dtype=np.float32)
    with (
        pytest.raises(RuntimeError),
        StoreWriter(tmp_path / "a.zarr", n_tokens=10, layer_widths=[4], site="hidden") as writer,
    ):
        writer.append(X[:5], 0)
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with StoreWriter(tmp_path / "a.zarr", n_tokens=10, layer_widths=[4], site="hidden") as w:
        w.append(X[:5], 0)
        with pytest.raises(StoreError, match="never written"):
            w.commit()
    stored, clipped = encode(np.array([1e6, -1e6, 3.0], dtype=np.float32), "float16")
    assert clipped == 2 and np.isfinite(decode(stored, "float16")).all()
    with pytest.raises(StoreError, match="no activation store"):
        ActivationStore(tmp_path / "missing.zarr")
    zarr = pytest.importorskip("zarr")
    zarr.open_group(tmp_path / "other.zarr", mode="w")
    with pytest.raises(StoreError, match="not an fbnprune activation store"):
        ActivationStore(tmp_path / "other.zarr")


# --- the dask path -----------------------------------------------------------------------------


@pytest.mark.parametrize(("memory", "cached"), [("4MiB", False), ("64MiB", True)])
def test_dask_threads_find_the_same_networks_as_in_memory(planted_data, memory, cached):
    """Out of core (4MiB: the 4.8 MB matrix is re-read in blocks by every pass) and held
    (64MiB: read once)."""
    X, truth, reference = planted_data
    ica = DaskGroupICA(n_components=6, random_state=0, memory=memory, threads=1).fit(X)
    assert ica.cached_ is cached
    if not cached:
        assert ica.block_rows_ < len(X)  # the budget really split the matrix into blocks
    assert_same_networks(ica, reference, truth)
    np.testing.assert_allclose(ica.mean_, reference.mean_, atol=1e-4)
    np.testing.assert_allclose(
        ica.explained_variance_ratio_, reference.explained_variance_ratio_, rtol=1e-3
    )
    assert ica.converged_ and ica.scheduler_ == "threads"


def test_dask_standardize_mirrors_group_ica(planted_data):
    X, truth, _ = planted_data
    X = X * np.linspace(0.1, 10, X.shape[1], dtype=np.float32)  # loud and quiet neurons
    reference = GroupICA(n_components=6, standardize=True).fit(X)
    ica = DaskGroupICA(n_components=6, standardize=True, memory="16MiB", threads=1).fit(X)
    np.testing.assert_allclose(ica.scale_, reference.scale_, rtol=1e-4)
    np.testing.assert_allclose(ica.mean_, reference.mean_, atol=1e-4)
    assert_same_networks(ica, reference, truth)


def test_memory_budget_and_errors():
    assert parse_memory("4GiB") == 4 * 2**30 and parse_memory("512MB") == 512 * 10**6
    with pytest.raises(DiscoverError, match="not a size"):
        parse_memory("lots")
    # blocks shrink with the budget and the threads, and are whole stored chunks
    assert row_block(2**30, 1000, 1) > row_block(2**28, 1000, 1) > row_block(2**28, 1000, 4)
    assert row_block(2**30, 1000, 2, store_rows=96) % 96 == 0
    with pytest.raises(DiscoverError, match="needs more than"):
        DaskGroupICA(n_components=8, threads=1).fit(np.zeros((5, 20), dtype=np.float32))


@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        memory_limit="1GiB",
    ) as cluster:
        yield cluster


def test_distributed_cluster_finds_the_same_networks(planted_data, cluster, tmp_path):
    """Two worker processes over loopback TCP read the zarr store themselves."""
    from distributed import get_task_stream

    X, truth, reference = planted_data
    store = write_store(tmp_path / "a.zarr", X, [200, 200], chunk_tokens=256, batch=300)
    with use_scheduler(cluster.scheduler_address) as client:
        with get_task_stream(client) as stream:
            ica = DaskGroupICA(n_components=6, random_state=0, memory="32MiB").fit(store)
        workers = {task["worker"] for task in stream.data}
    assert ica.scheduler_ == cluster.scheduler_address
    assert len(workers) == 2  # both workers computed blocks
    assert_same_networks(ica, reference, truth)


def test_unreachable_scheduler_is_a_clear_error(monkeypatch):
    import fbnprune.discover.dask_ica as scale_discover

    monkeypatch.setattr(scale_discover, "CONNECT_TIMEOUT", "1s")
    with (
        pytest.raises(DiscoverError, match="cannot reach a dask scheduler"),
        use_scheduler("tcp://127.0.0.1:9"),
    ):
        pass


# --- recipes and the pipeline ------------------------------------------------------------------


def test_existing_recipes_keep_their_fingerprints():
    """Stage keys hash the collect and discover sections: the new fields must not enter them
    at their defaults (the values were computed on main before the fields existed)."""
    raw = {
        "model": "some/model",
        "tasks": [{"name": "news", "source": "builtin:bbc_news"}],
        "collect": {"batch_size": 4},
        "discover": {"n_components": 8},
    }
    recipe = parse_recipe(raw)
    assert recipe.fingerprint() == "fc210ca38f389351"
    assert recipe.fingerprint("collect") == "3307dcad8db11e6c"
    assert recipe.fingerprint("discover") == "2b25a76daca1c01b"
    explicit = parse_recipe(
        {
            **raw,
            "collect": {"batch_size": 4, "storage": "memmap"},
            "discover": {"n_components": 8, "engine": "sklearn", "memory": "4GiB"},
        }
    )
    assert explicit.fingerprint() == recipe.fingerprint()
    scaled = parse_recipe(
        {
            **raw,
            "collect": {"batch_size": 4, "storage": "zarr"},
            "discover": {"n_components": 8, "engine": "dask"},
        }
    )
    assert fingerprint(scaled.collect.model_dump()) != fingerprint(recipe.collect.model_dump())
    assert fingerprint(scaled.discover.model_dump()) != fingerprint(recipe.discover.model_dump())
    assert parse_recipe(yaml.safe_load(scaled.to_yaml())) == scaled


def test_recipe_rejects_bad_scale_settings(tmp_path):
    base = {"model": "m", "tasks": [{"name": "t", "source": "builtin:bbc_news"}]}
    for section, value, message in [
        ("collect", {"precision": "float16"}, "needs storage: zarr"),
        ("discover", {"memory": "lots"}, "size such as"),
        ("discover", {"engine": "spark"}, "discover.engine"),
    ]:
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump({**base, section: value}))
        with pytest.raises(RecipeError, match=message):
            load_recipe(path)


def test_pipeline_collects_into_zarr_and_discovers_on_dask(tiny_llama_dir, tmp_path):
    base = parse_recipe(tiny_recipe(tiny_llama_dir))
    scaled = parse_recipe(
        tiny_recipe(
            tiny_llama_dir,
            collect={"storage": "zarr"},
            discover={"engine": "dask", "memory": "64MiB"},
        )
    )
    ref_run = run_pipeline(base, tmp_path / "base", until="select", progress=False)
    scaled_run = run_pipeline(scaled, tmp_path / "scaled", until="select", progress=False)
    assert (tmp_path / "scaled/collect/news/activations.zarr").is_dir()
    assert not (tmp_path / "scaled/collect/news/activations.npy").exists()
    ref = RunContext(base, RunDir.open(tmp_path / "base"), progress=False)
    pipe = RunContext(scaled, RunDir.open(tmp_path / "scaled"), progress=False)
    a, b = collect(ref, "news"), collect(pipe, "news")
    assert discover_input(b) is b.store and "matrix" not in vars(b)  # dask reads the store
    assert b.n_tokens == a.n_tokens and b.layer_widths == a.layer_widths
    # same rows per sample (the store keeps collection order), within float16's precision
    for sample in np.unique(a.sample_index):
        want = np.asarray(a.matrix[a.sample_index == sample])
        got = b.matrix[b.sample_index == sample]
        assert (np.abs(got - want) <= np.abs(want) * 2**-11 + 2**-24).all()
    # the dask engine's PCA agrees with sklearn's on the real activations
    with (
        np.load(ref.layout.discover_file("news")) as x,
        np.load(pipe.layout.discover_file("news")) as y,
    ):
        np.testing.assert_allclose(
            y["explained_variance_ratio"], x["explained_variance_ratio"], rtol=1e-2
        )
        assert y["z_maps"].shape == x["z_maps"].shape
    assert ref_run.plan is not None and scaled_run.plan is not None
    assert sum(scaled_run.plan.kept_per_layer()) == sum(ref_run.plan.kept_per_layer())
    # reused on a second run: nothing recomputed
    again = run_pipeline(scaled, tmp_path / "scaled", until="select", progress=False)
    assert again.executed == []


def test_discover_command_takes_a_scheduler(tiny_llama_dir, tmp_path, cluster, capsys):
    from fbnprune.cli import main

    path = tmp_path / "recipe.yaml"
    path.write_text(
        yaml.safe_dump(
            tiny_recipe(tiny_llama_dir, collect={"storage": "zarr"}, discover={"engine": "dask"})
        )
    )
    transitions = cluster.scheduler.transition_counter
    # the stage subcommands share fbnprune run's arguments (--scheduler) and execution
    code = main(
        [
            "discover",
            str(path),
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
            "--scheduler",
            cluster.scheduler_address,
        ]
    )
    assert code == 0
    assert "discover:news" in capsys.readouterr().out
    assert (tmp_path / "run/discover/news.npz").is_file()
    assert cluster.scheduler.transition_counter > transitions  # the cluster did the work
