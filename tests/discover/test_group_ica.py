"""GroupICA: recovers planted networks, deterministic for a seed, clear errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from fbnprune.discover.group_ica import GroupICA


def planted(n_tokens=2000, n_neurons=300, seed=0):
    """Tokens x neurons data made of 3 sparse sources, each driving its own neuron group."""
    rng = np.random.default_rng(seed)
    sources = rng.laplace(size=(n_tokens, 3)) ** 3  # heavy-tailed, non-Gaussian
    groups = [np.arange(0, 10), np.arange(100, 115), np.arange(200, 208)]
    mixing = np.zeros((3, n_neurons))
    for k, g in enumerate(groups):
        mixing[k, g] = rng.uniform(1.8, 2.0, len(g))
    X = sources @ mixing + 0.05 * rng.normal(size=(n_tokens, n_neurons))
    return X.astype(np.float32), groups


def test_recovers_planted_networks():
    X, groups = planted()
    ica = GroupICA(n_components=3, threshold=3.6, random_state=0).fit(X)
    assert ica.maps_.shape == ica.z_maps_.shape == (3, 300)
    assert ica.converged_
    for group in groups:  # each planted group is one network, nearly all of it, little else
        best = max(ica.networks_, key=lambda net: np.isin(np.flatnonzero(net), group).sum())
        members = set(np.flatnonzero(best))
        assert len(members & set(group)) >= 0.8 * len(group)
        assert len(members - set(group)) <= 1
    assert ica.union().sum() <= 35
    assert (ica.z_maps_**3).mean(axis=1).min() > 0  # sign convention: positive skew


def test_deterministic_for_a_seed_and_seed_matters():
    X, _ = planted(n_tokens=600)
    a = GroupICA(n_components=5, random_state=1).fit(X)
    b = GroupICA(n_components=5, random_state=1).fit(X)
    np.testing.assert_array_equal(a.z_maps_, b.z_maps_)
    np.testing.assert_array_equal(a.neuron_scores(), b.neuron_scores())
    # another seed starts FastICA (and the randomized PCA) elsewhere: other maps, bit for bit
    c = GroupICA(n_components=5, random_state=2).fit(X)
    assert not np.array_equal(a.z_maps_, c.z_maps_)


def test_too_few_tokens_for_components():
    X, _ = planted(n_tokens=50)
    with pytest.raises(ValueError, match="needs more than 64 tokens"):
        GroupICA(n_components=64).fit(X)


def test_fit_returns_self_and_params_are_keyword_only():
    X, _ = planted(n_tokens=300)
    ica = GroupICA(n_components=4)
    assert ica.fit(X) is ica
    with pytest.raises(TypeError):
        GroupICA(4)  # type: ignore[misc]


@pytest.mark.parametrize("standardize", [False, True])
def test_fitting_in_place_gives_the_same_maps_and_copy_keeps_the_input(standardize, tmp_path):
    X, _ = planted(n_tokens=600)
    kept = X.copy()
    a = GroupICA(n_components=5, standardize=standardize).fit(X)
    np.testing.assert_array_equal(X, kept)  # copy=True (the default) leaves X as it was
    b = GroupICA(n_components=5, standardize=standardize, copy=False).fit(X)
    assert not np.array_equal(X, kept)  # overwritten: centred in place, not copied
    for name in ("z_maps_", "maps_", "explained_variance_ratio_", "mean_"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    # a read-only memmap is never written: copy=False copies it
    np.save(tmp_path / "m.npy", kept)
    mapped = np.load(tmp_path / "m.npy", mmap_mode="r")
    c = GroupICA(n_components=5, standardize=standardize, copy=False).fit(mapped)
    np.testing.assert_array_equal(a.z_maps_, c.z_maps_)
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), kept)


def test_read_matrix_is_an_array_of_its_own_read_from_the_file(tmp_path):
    from fbnprune.collect.activations import Activations

    X, _ = planted(n_tokens=100)
    np.save(tmp_path / "m.npy", X)
    mapped = np.load(tmp_path / "m.npy", mmap_mode="r")
    acts = Activations(mapped, np.zeros(100, dtype=np.int64), [300], "hidden")
    read = acts.read_matrix()
    assert not isinstance(read, np.memmap) and read.flags.writeable
    np.testing.assert_array_equal(read, X)
    in_memory = Activations(X, np.zeros(100, dtype=np.int64), [300], "hidden")
    assert not np.may_share_memory(in_memory.read_matrix(), X)  # the caller's is never touched


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS of mapped pages: Linux")
def test_released_pages_leave_resident_memory_and_the_matrix_reads_the_same(tmp_path):
    import psutil

    from fbnprune.collect.activations import Activations

    rows = np.random.default_rng(0).normal(size=(4096, 4096)).astype(np.float32)  # 64 MiB
    np.save(tmp_path / "m.npy", rows)
    acts = Activations(
        np.load(tmp_path / "m.npy", mmap_mode="r"), np.zeros(4096, dtype=np.int64), [4096], "hidden"
    )
    rss = psutil.Process().memory_info
    before = rss().rss
    total = float(acts.matrix.sum(dtype=np.float64))  # every page touched: resident
    touched = rss().rss
    acts.release_pages()
    released = rss().rss
    assert touched - before > 48 * 2**20 and touched - released > 48 * 2**20
    assert float(acts.matrix.sum(dtype=np.float64)) == total  # read again from the file
    Activations(rows, acts.sample_index, [4096], "hidden").release_pages()  # in memory: no-op
