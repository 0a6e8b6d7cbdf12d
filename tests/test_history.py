"""Change between runs on small hand-made frames: what counts as a change, and the arithmetic."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

from settlements.changes import previous_labels, region_changes, tile_changes
from settlements.export.previous import PreviousRun
from settlements.labels import ClusterLabels

LABELS = ClusterLabels({0: "forest", 1: "water", 2: "forest"}, {0: None, 1: None, 2: None})


def tiles_layer(clusters: list[int]) -> gpd.GeoDataFrame:
    n = len(clusters)
    return gpd.GeoDataFrame({
        "tile_id": np.arange(n), "cluster": clusters, "label": [LABELS.label_of(c) for c in clusters],
        "region_id": "r1", "raster": "a.tif", "row": np.zeros(n, int), "col": np.arange(n),
    }, geometry=[shapely.box(i, 0, i + 1, 1) for i in range(n)], crs="EPSG:3857")


def previous(clusters: list[int], hist: list[tuple[str, int, float]]) -> PreviousRun:
    n = len(clusters)
    tiles = pd.DataFrame({"raster": "a.tif", "row": np.zeros(n, int), "col": np.arange(n), "cluster": clusters,
                          "cx": np.arange(n) + 0.5, "cy": np.full(n, 0.5)})
    h = pd.DataFrame(hist, columns=["region_id", "class", "km2"]).astype({"class": str})
    return PreviousRun("run-1", tiles, h, "EPSG:3857")


def test_tile_changes_list_only_tiles_whose_name_changed() -> None:
    # tile 0: cluster 0 -> 2, both "forest": no change; tile 1: 1 -> 0, water -> forest; tile 2 unchanged
    got = tile_changes(previous([0, 1, 1], []), tiles_layer([2, 0, 1]), LABELS)
    assert got["tile_id"].tolist() == [1]
    assert got["change"].tolist() == ["water -> forest"]
    assert (got["old_cluster"].tolist(), got["new_cluster"].tolist()) == ([1], [0])


def test_tile_changes_ignore_cells_that_moved_and_first_runs() -> None:
    prev = previous([1, 1, 1], [])
    moved = tiles_layer([0, 0, 0])
    moved["geometry"] = moved.geometry.translate(0.5, 0)  # another tiling: same row/col, other place
    assert len(tile_changes(prev, moved, LABELS)) == 0
    assert len(tile_changes(None, tiles_layer([0, 1]), LABELS)) == 0


def test_region_changes_in_fractions_and_km2() -> None:
    regions = gpd.GeoDataFrame({"region_id": ["r1", "r2"], "region_name": ["one", "two"]},
                               geometry=[shapely.box(0, 0, 1, 1), shapely.box(1, 0, 2, 1)], crs="EPSG:3857")
    # before: r1 = 3 km² forest (clusters 0 and 2) + 1 km² water; now: 2 km² forest + 2 km² water
    prev = previous([], [("r1", 0, 2.0), ("r1", 2, 1.0), ("r1", 1, 1.0)])
    now = pd.DataFrame({"region_id": ["r1", "r1", "r1", "r2"], "kind": "cluster", "class": ["0", "1", "2", "1"],
                        "km2": [1.0, 2.0, 1.0, 5.0]})
    got = region_changes(prev, now, regions, LABELS).set_index("region_id")
    assert np.isclose(got.loc["r1", "dfrac_forest"], 0.5 - 0.75)
    assert np.isclose(got.loc["r1", "dfrac_water"], 0.5 - 0.25)
    assert np.isclose(got.loc["r1", "dkm2_forest"], -1.0) and np.isclose(got.loc["r1", "dkm2_water"], 1.0)
    assert np.isclose(got.loc["r1", "changed_share"], 0.25)
    assert got.loc["r1", "largest_gain"] == "water" and got.loc["r1", "largest_loss"] == "forest"
    assert np.isnan(got.loc["r2", "dfrac_water"])  # not in the previous run
    assert got.loc["r1", "previous_run"] == "run-1"


def test_gone_clusters_keep_their_old_name_for_the_comparison() -> None:
    matching = {"matched": True, "gone": [{"id": 1, "name": "water"}, {"id": 2, "name": "cluster 2"}]}
    now = ClusterLabels({0: "forest", 1: "cluster 1", 2: "cluster 2"}, {0: None, 1: None, 2: None})
    before = previous_labels(now, matching)
    assert before.names == {0: "forest", 1: "water", 2: "cluster 2 (before refit)"}
    assert previous_labels(now, None).names == now.names
