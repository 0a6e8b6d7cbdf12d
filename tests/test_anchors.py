"""Cluster names stay with their clusters when k-means renumbers them: the labels file's anchor tiles."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from settlements.clustering import KMeansClusterer
from settlements.config import load_config
from settlements.errors import ConfigError
from settlements.identity import ANCHORS_PER_CLUSTER, align_to_anchors, anchor_tiles
from settlements.labels import ClusterLabels, read_labels, write_labels
from settlements.pipeline import run

from .reprocess_helpers import kampala_chips


def test_anchors_round_trip_on_one_line(tmp_path: Path) -> None:
    path = tmp_path / "x.labels.yaml"
    labels = ClusterLabels({0: "water", 1: "trees"}, {0: None, 1: "#00ff00"})
    write_labels(path, "x", labels, {0: 5, 1: 7}, {0: [4, 2, 9], 1: [1]})
    text = path.read_text()
    assert "anchors: [4, 2, 9]" in text and "anchors: [1]" in text
    back = read_labels(path, 2)
    assert back.anchors == {0: (4, 2, 9), 1: (1,)} and back.names == labels.names
    write_labels(path, "x", back, {0: 5, 1: 7})  # rewritten without new anchors: the file's are kept
    assert read_labels(path, 2).anchors == back.anchors


@pytest.mark.parametrize("anchors", ["[1, two]", "3", "[true]"])
def test_bad_anchors(tmp_path: Path, anchors: str) -> None:
    path = tmp_path / "bad.labels.yaml"
    path.write_text(f"clusters:\n  0:\n    name: water\n    anchors: {anchors}\n")
    with pytest.raises(ConfigError, match=r"bad\.labels\.yaml: clusters\.0\.anchors: expected a list of tile ids"):
        read_labels(path, 2)


def test_anchor_tiles_are_the_nearest_to_each_centroid() -> None:
    a = pd.DataFrame({"tile_id": np.arange(30), "cluster": np.repeat([0, 1, 2], 10),
                      "distance": np.r_[np.arange(10, 0, -1), np.arange(10), np.full(10, 1.0)]})
    got = anchor_tiles(a, per_cluster=3)
    assert got == {0: [9, 8, 7], 1: [10, 11, 12], 2: [20, 21, 22]}  # ties: lowest tile id first


def test_a_renumbered_fit_takes_the_ids_its_anchors_name(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (4, 16)).astype(np.float32)
    x = np.concatenate([c + rng.normal(0, 0.5, (50, 16)).astype(np.float32) for c in centres])
    kept = pd.DataFrame({"tile_id": np.arange(200) + 1000, "emb_row": np.arange(200)})
    model = KMeansClusterer(k=4, seed=0, sample_size=200).fit(x)
    first, _ = model.predict(x)
    # the analyst named the clusters of a run whose ids were a permutation of these
    perm = np.array([2, 0, 3, 1])
    anchors = {int(perm[c]): (kept["tile_id"].to_numpy()[first == c][:5]).tolist() for c in range(4)}
    path = tmp_path / "l.labels.yaml"
    write_labels(path, "l", ClusterLabels({i: f"n{i}" for i in range(4)}, {i: None for i in range(4)}), {}, anchors)
    result = align_to_anchors(path, model, x, kept)
    assert result == {"anchors": 20, "agreement": 1.0}
    assert np.array_equal(model.predict(x)[0], perm[first])
    assert align_to_anchors(tmp_path / "none.labels.yaml", model, x, kept) is None


@pytest.mark.slow
def test_names_follow_their_clusters_into_a_fresh_work_folder(tmp_path: Path) -> None:
    """A first run writes anchors; the analyst's names then survive clustering afresh, even when the
    fresh fit numbers the clusters otherwise (here: the file's ids permuted, as another machine might)."""
    cfg = load_config(kampala_chips(tmp_path, 2))
    run(cfg)
    data = yaml.safe_load(cfg.labels_path.read_text())
    assert all(len(e["anchors"]) == min(ANCHORS_PER_CLUSTER, e["size"]) for e in data["clusters"].values())
    first = pd.read_parquet(cfg.work_dir / "assignments.parquet").set_index("tile_id")["cluster"]
    # name the clusters, with the entries of ids 0 and 1 (names and anchors) swapped
    names = {0: "dense roofs", 1: "trees", 2: "bare ground", 3: "sparse roofs"}
    swap = {0: 1, 1: 0, 2: 2, 3: 3}
    data["clusters"] = {swap[c]: {**e, "name": names[swap[c]]} for c, e in data["clusters"].items()}
    cfg.labels_path.write_text(yaml.safe_dump(data, sort_keys=False))
    shutil.rmtree(cfg.work_dir)
    run(cfg)
    again = pd.read_parquet(cfg.work_dir / "assignments.parquet").set_index("tile_id")["cluster"]
    assert (again.loc[first.index] == first.map(swap)).mean() > 0.99
    meta = yaml.safe_load((cfg.work_dir / "clusters.json").read_text())
    assert meta["anchored"]["agreement"] == 1.0
    tiles = pd.read_parquet(cfg.work_dir / "assignments.parquet")
    assert set(tiles["cluster"]) == set(range(4))
