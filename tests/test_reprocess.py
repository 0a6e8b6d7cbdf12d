"""Incremental reruns on real imagery: cache reuse, stable cluster ids and names, refit matching, prune."""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from settlements.clustering import KMeansClusterer, match_centroids
from settlements.config import load_config
from settlements.embedding.cache import EmbeddingCache, folder_bytes
from settlements.pipeline import run

from .conftest import run_cli
from .reprocess_helpers import kampala_chips, layer, name_clusters, snapshot


def tile_clusters(gpkg: Path) -> pd.DataFrame:
    return layer(gpkg, "tiles")[["raster", "row", "col", "cluster", "label"]]


@pytest.mark.slow
def test_incremental_reruns_keep_cluster_ids_and_names(tmp_path: Path, monkeypatch, capsys, caplog) -> None:
    config = kampala_chips(tmp_path, 3)
    cfg = load_config(config)
    first = run(cfg, skip_unchanged=True)
    n3 = first.tiles["tiles"]
    assert first.embedding["tiles_embedded"] == n3 and first.embedding["tiles_reused"] == 0
    gpkg = first.outputs["gpkg"]
    # the 10 k-means restarts (the default) and their agreement with the kept fit, in clusters.json and runs
    restarts = json.loads((cfg.work_dir / "clusters.json").read_text())["restarts"]
    assert restarts == first.clustering["restarts"] and restarts["restarts"] == 10
    assert 0 < restarts["min"] <= restarts["mean"] <= 1
    row = layer(gpkg, "runs").iloc[-1]
    assert (row["restarts"], row["restart_ari_min"], row["restart_ari_mean"]) == (10, restarts["min"], restarts["mean"])

    # unchanged: the scheduler's rerun is a no-op with exit code 3 and leaves every output as it was
    before = snapshot(gpkg.parent)
    code, out, err = run_cli(monkeypatch, capsys, "run", str(config))
    assert code == 3 and "nothing to do" in out
    assert snapshot(gpkg.parent) == before

    # forced, the unchanged rerun re-exports from the cache: no tile is embedded again. Its summary says how
    # much the restarts of the fit in use agree, and warns in one line when that is below the threshold
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="settlements"):
        m.setattr("settlements.clustering.RESTART_AGREEMENT", restarts["mean"] + 0.01)
        caplog.clear()
        code, out, err = run_cli(monkeypatch, capsys, "run", str(config), "--force")
    assert code == 0, out + err
    assert f"k=4 (10 restarts, agreement ARI {restarts['mean']:.2f}); " in out
    warned = [r.getMessage() for r in caplog.records if "k-means restarts agree little" in r.getMessage()]
    assert len(warned) == 1 and "\n" not in warned[0]
    assert f"(mean ARI {restarts['mean']:.2f} with the kept one, below " in warned[0]
    runs = layer(gpkg, "runs")
    assert any("restarts agree little" in w for w in json.loads(runs["warnings"].iloc[-1]))
    assert runs["restart_ari_mean"].iloc[-1] == restarts["mean"]
    assert runs["tiles_embedded"].iloc[-1] == 0 and runs["tiles_reused"].iloc[-1] == n3
    assert json.loads((cfg.work_dir / "embedding.json").read_text())["tiles_embedded"] == 0
    old = tile_clusters(gpkg)

    # the analyst names the clusters and a fourth chip arrives: only its tiles are embedded,
    # old tiles keep their clusters, and the clusters carry the analyst's names
    names = {0: "dense roofs", 1: "trees", 2: "bare ground", 3: "sparse roofs"}
    name_clusters(cfg.labels_path, names)
    config4 = kampala_chips(tmp_path, 4)
    second = run(load_config(config4), skip_unchanged=True)
    tiles = pd.read_parquet(cfg.work_dir / "tiles.parquet")
    assert second.embedding["tiles_embedded"] == int((tiles["raster"] == 3).sum()) > 0
    assert second.embedding["tiles_reused"] == n3
    assert second.clustering["reused_centroids"]
    assert second.clustering["restarts"] == restarts  # the agreement of the fit in use, carried over
    now = tile_clusters(gpkg)
    both = old.merge(now, on=["raster", "row", "col"], suffixes=("_old", "_new"))
    assert len(both) == len(old)
    assert (both["cluster_old"] == both["cluster_new"]).all()
    assert (both["label_new"] == both["cluster_new"].map(names)).all()
    clusters = layer(gpkg, "clusters")
    assert dict(zip(clusters["cluster"], clusters["label"], strict=True)) == names
    assert len(layer(gpkg, "tile_changes")) == 0  # renaming is not a change; no old tile moved
    changes = layer(gpkg, "changes")
    assert changes["previous_run"].iloc[0] == runs["run_id"].iloc[-1]
    assert np.isclose(changes["mapped_km2"] - changes["mapped_km2_before"],
                      sum(changes[c] for c in changes.columns if c.startswith("dkm2_"))).all()

    # --refit: new k-means, Hungarian-matched to the old centroids; matched ids keep their names
    old_model = KMeansClusterer.load(cfg.work_dir / "clusters.npz")
    before_refit = tile_clusters(gpkg)
    code, out, err = run_cli(monkeypatch, capsys, "run", str(config4), "--refit")
    assert code == 0, out + err
    assert "refit: ids kept" in out
    meta = json.loads((cfg.work_dir / "clusters.json").read_text())["matching"]
    assert meta["matched"] and sorted(meta["kept"] + meta["new"]) == [0, 1, 2, 3]
    assert len(meta["kept"]) >= 2
    assert [g["id"] for g in meta["gone"]] == sorted(set(range(4)) - set(meta["kept"]))
    labels = yaml.safe_load(cfg.labels_path.read_text())["clusters"]
    for cid in meta["kept"]:
        assert labels[cid]["name"] == names[cid]
    for cid in meta["new"]:
        assert labels[cid]["name"] == f"cluster {cid}"
    # a kept id means the same cluster: its old tiles mostly stay in it, its centroid is nearest the old one
    after = tile_clusters(gpkg).merge(before_refit, on=["raster", "row", "col"], suffixes=("", "_old"))
    for cid in meta["kept"]:
        members = after[after["cluster_old"] == cid]
        assert members["cluster"].value_counts().idxmax() == cid
    new_model = KMeansClusterer.load(cfg.work_dir / "clusters.npz")
    d = np.linalg.norm(new_model.input_space_centers()[:, None] - old_model.input_space_centers()[None], axis=2)
    for cid in meta["kept"]:
        assert d[cid].argmin() == cid and d[:, cid].argmin() == cid
    runs = layer(gpkg, "runs")
    assert len(runs) == 4 and runs["refit"].tolist() == [0, 0, 0, 1]
    refitted = json.loads((cfg.work_dir / "clusters.json").read_text())["restarts"]
    assert runs[["restart_ari_min", "restart_ari_mean"]].iloc[-1].tolist() == [refitted["min"], refitted["mean"]]
    assert runs["restarts"].tolist() == [10] * 4
    assert json.loads(runs["clusters_kept"].iloc[-1]) == meta["kept"]
    changed = layer(gpkg, "tile_changes")
    assert len(changed) == runs["tiles_changed"].iloc[-1]
    key = ["raster", "row", "col"]
    changed_keys = set(map(tuple, changed[key].to_numpy().tolist()))
    gone = [g["id"] for g in meta["gone"]]
    moved_or_gone = after[(after["cluster"] != after["cluster_old"]) | after["cluster_old"].isin(gone)]
    assert changed_keys <= set(map(tuple, moved_or_gone[key].to_numpy().tolist()))
    kept_moves = after[after["cluster_old"].isin(meta["kept"]) & after["cluster"].isin(meta["kept"])
                       & (after["cluster_old"].map(names) != after["cluster"].map(names))]
    assert set(map(tuple, kept_moves[key].to_numpy().tolist())) <= changed_keys
    con = sqlite3.connect(gpkg)
    try:
        types = con.execute("SELECT DISTINCT typeof(tiles_embedded), typeof(tiles_reused) FROM runs").fetchall()
    finally:
        con.close()
    assert types == [("integer", "integer")]


@pytest.mark.slow
def test_cache_prune_removes_only_shards_the_config_no_longer_uses(tmp_path: Path, monkeypatch, capsys) -> None:
    config = kampala_chips(tmp_path, 2)
    cfg = load_config(config)
    run(cfg)
    cache = EmbeddingCache(cfg.work_dir / "cache")
    keys = set(json.loads((cfg.work_dir / "embedding.json").read_text())["keys"])
    assert {s.name for s in cache.shards()} == keys
    gone = next(s for s in cache.shards() if s.name == json.loads(
        (cfg.work_dir / "embedding.json").read_text())["keys"][1])
    size = folder_bytes(gone)
    config1 = kampala_chips(tmp_path, 1)  # the second chip leaves the pipeline
    code, out, err = run_cli(monkeypatch, capsys, "cache", "prune", str(config1), "--dry-run")
    assert code == 0 and gone.exists() and f"1 shard(s) would be removed, 1 kept; would free {size} bytes" in out
    assert out.rstrip().endswith("nothing was removed (--dry-run)") and "shard(s) removed" not in out
    code, out, err = run_cli(monkeypatch, capsys, "cache", "prune", str(config1))
    assert code == 0 and f"1 shard(s) removed, 1 kept; freed {size} bytes" in out, out
    assert not gone.exists() and {s.name for s in cache.shards()} == keys - {gone.name}
    rerun = run(load_config(config1))
    assert rerun.embedding["tiles_embedded"] == 0  # the shard still in use was kept


def blobs(centres: np.ndarray, n: int = 200, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([c + rng.normal(scale=0.3, size=(n, centres.shape[1])) for c in centres]).astype(np.float32)


def test_match_centroids_keeps_ids_and_reports_new_and_gone() -> None:
    old = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], dtype=np.float32)
    moved = old[[2, 0, 3, 1]] + 0.2  # same clusters, shuffled and shifted a little
    m = match_centroids(old, moved)
    assert m.ids.tolist() == [2, 0, 3, 1] and m.kept == [0, 1, 2, 3] and m.new == [] and m.gone == []
    # cluster 1 vanished, a cluster far from all old ones appeared
    new = np.array([[0.1, 0], [30, 30], [0, 10.2], [10, 10.1]], dtype=np.float32)
    m = match_centroids(old, new)
    assert m.kept == [0, 2, 3] and m.new == [1] and m.gone == [1]
    assert m.ids.tolist() == [0, 1, 2, 3]
    # k grows: the extra cluster is new, all old ids kept
    m = match_centroids(old, np.concatenate([old + 0.1, [[5, 5]]]).astype(np.float32))
    assert m.kept == [0, 1, 2, 3] and m.new == [4] and m.gone == []


def test_reorder_renumbers_a_fitted_model() -> None:
    x = blobs(np.array([[0, 0, 0], [8, 0, 0], [0, 8, 0]], dtype=np.float32))
    km = KMeansClusterer(k=3, seed=0, sample_size=len(x)).fit(x)
    labels, _ = km.predict(x)
    ids = np.array([2, 0, 1])
    relabelled, _ = km.reorder(ids).predict(x)
    assert (relabelled == ids[labels]).all()


def test_pca_centroids_compare_in_embedding_space() -> None:
    x = blobs(np.array([[0, 0, 0, 0], [8, 0, 0, 0], [0, 8, 0, 0]], dtype=np.float32))
    a = KMeansClusterer(k=3, seed=0, sample_size=len(x), pca_dim=2).fit(x)
    b = KMeansClusterer(k=3, seed=1, sample_size=len(x), pca_dim=2).fit(x[::-1].copy())
    m = match_centroids(a.input_space_centers(), b.input_space_centers())
    assert m.kept == [0, 1, 2]
    la, _ = a.predict(x)
    lb, _ = b.reorder(m.ids).predict(x)
    assert (la == lb).mean() > 0.99
