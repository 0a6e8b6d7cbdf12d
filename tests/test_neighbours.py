"""A tile's eight neighbours on the ground, and the embeddings k-means and the top model see with them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pyproj import Transformer

from settlements import neighbours
from settlements.config import load_config
from settlements.neighbours import (
    neighbour_mean,
    neighbour_rows,
    tile_neighbours,
    with_neighbours,
    write_with_neighbours,
)
from settlements.pipeline import stage_tile
from settlements.rasters import load_infos
from settlements.store import read_table, workspace
from settlements.tile_tables import kept_tiles

from .conftest import Ran, write_pipeline
from .test_geometry import relabel, write_regions


def grid(rows: int, cols: int, side: float, x0: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    r, c = np.divmod(np.arange(rows * cols), cols)
    return x0 + (c + 0.5) * side, -(r + 0.5) * side


def test_the_ring_of_eight_nearest_first_and_none_across_a_gap() -> None:
    x, y = grid(5, 6, 10.0)
    keep = np.ones(30, bool)
    keep[8] = False  # a hole (a nodata cell) at row 1, col 2
    x2, y2 = grid(2, 2, 10.0, x0=90.0)  # another patch 30 m (3 sides) to the east
    x, y = np.concatenate([x[keep], x2]), np.concatenate([y[keep], y2])
    rows = neighbour_rows(x, y, np.full(len(x), 10.0))
    # brute force: the tiles one grid step away on either axis (a Chebyshev distance of one side)
    cheb = np.maximum(np.abs(x[:, None] - x[None]), np.abs(y[:, None] - y[None]))
    truth = [set(np.flatnonzero(np.isclose(cheb[i], 10.0)).tolist()) for i in range(len(x))]
    assert [set(r[r >= 0].tolist()) for r in rows] == truth
    count = (rows >= 0).sum(axis=1)
    assert count[:29].max() == 8 and count[:29].min() == 3
    assert count[29:].tolist() == [3, 3, 3, 3]  # the other patch: only its own tiles
    next_to_hole = int(np.flatnonzero(np.isclose(x, 25) & np.isclose(y, -5))[0])  # row 0, col 2
    assert count[next_to_hole] == 4
    # nearest first: an inner tile's edge neighbours (10 m) before its corner ones (14.1 m)
    inner = int(np.flatnonzero(np.isclose(x, 45) & np.isclose(y, -35))[0])
    d = np.hypot(x[rows[inner]] - x[inner], y[rows[inner]] - y[inner])
    assert np.allclose(d, [10] * 4 + [10 * np.sqrt(2)] * 4)
    assert inner not in rows[inner]


def test_averaging_by_hand() -> None:
    x = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]], np.float32)  # three tiles in a row
    rows = neighbour_rows(np.array([0.5, 1.5, 2.5]), np.zeros(3), np.ones(3))
    w = 0.25
    got = with_neighbours(x, rows, w, normalise=False)
    np.testing.assert_allclose(got[0], (x[0] + w * x[1]) / (1 + w), rtol=1e-6)
    np.testing.assert_allclose(got[1], (x[1] + w * x[0] + w * x[2]) / (1 + 2 * w), rtol=1e-6)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(with_neighbours(x, rows, w, normalise=True)[2], (unit[2] + w * unit[1]) / (1 + w),
                               rtol=1e-6)
    np.testing.assert_allclose(with_neighbours(x, rows, 0.0, normalise=False), x)
    both = neighbour_mean(x, rows)
    np.testing.assert_allclose(both[:, :2], x)
    np.testing.assert_allclose(both[1, 2:], (x[0] + x[2]) / 2)
    alone = neighbour_mean(x[:1], neighbour_rows(np.zeros(1), np.zeros(1), np.ones(1)))
    np.testing.assert_allclose(alone[0, 2:], x[0])  # no neighbour: its own embedding


def test_written_block_by_block_as_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = grid(30, 40, 50.0)
    emb = np.random.default_rng(0).normal(size=(len(x), 16)).astype(np.float32)
    np.save(tmp_path / "e.npy", emb)
    rows = neighbour_rows(x, y, np.full(len(x), 50.0))
    monkeypatch.setattr(neighbours, "BLOCK_FLOATS", 300 * 8 * 16)  # 300-row blocks (the floor is 256)
    write_with_neighbours(tmp_path / "e.npy", tmp_path / "c.npy", rows, 0.25, True)
    np.testing.assert_allclose(np.load(tmp_path / "c.npy"), with_neighbours(emb, rows, 0.25, True), rtol=1e-6)
    assert {p.name for p in tmp_path.iterdir()} == {"e.npy", "c.npy"}  # no temporary file left
    with pytest.raises(ValueError, match="embeddings for"):
        write_with_neighbours(tmp_path / "e.npy", tmp_path / "d.npy", rows[:-1], 0.25, True)
    assert not (tmp_path / "d.npy").exists()


@pytest.mark.parametrize("crs", ["EPSG:4326", "EPSG:3857", "EPSG:3413"])
def test_neighbours_are_found_in_ground_metres_whatever_the_crs(tmp_path: Path, crs: str) -> None:
    """At 60 N a degree of longitude is half a degree of latitude on the ground, and a Web Mercator unit half a
    metre; near the pole, polar stereographic: tiles of 16 px are still squares on the ground with 8
    neighbours inside the raster."""
    import shapely

    if crs == "EPSG:4326":
        tif = relabel(tmp_path, "lonlat", crs, 10.0, 60.3, 0.00054, 0.00027)
        box = shapely.box(10.0, 60.2, 10.1, 60.3)
    elif crs == "EPSG:3857":
        x0, y0 = Transformer.from_crs(4326, 3857, always_xy=True).transform(10.0, 60.3)
        tif = relabel(tmp_path, "merc", crs, x0, y0, 60.0, 60.0)
        box = shapely.box(10.0, 60.2, 10.1, 60.3)
    else:
        x0, y0 = Transformer.from_crs(4326, 3413, always_xy=True).transform(0.0, 86.5)
        tif = relabel(tmp_path, "polar", crs, x0, y0, 30.0, 30.0)
        box = shapely.box(x0 + 500, y0 - 4_000, x0 + 4_000, y0 - 500)
    regions = write_regions(tmp_path, "box", [box], "EPSG:4326" if crs != "EPSG:3413" else crs)
    cfg = load_config(write_pipeline(tmp_path, "nb", None, rasters=[{"path": str(tif), "bands": [1, 2, 3]}],
                                     regions=[{"path": str(regions), "id_field": "rid"}],
                                     tiling={"tile_size": "16px", "clip_to_regions": True}, clustering={"k": 2}))
    stage_tile(cfg)
    ws = workspace(cfg)
    tiles = read_table(ws.tiles, "tile")
    rows = tile_neighbours(tiles, load_infos(ws))
    count = pd.Series((rows >= 0).sum(axis=1))
    assert count.max() == 8 and count.min() >= 3
    # every neighbour pair is mutual and one grid step apart
    r = np.repeat(np.arange(len(tiles)), 8)[rows.ravel() >= 0]
    j = rows.ravel()[rows.ravel() >= 0]
    assert set(zip(r.tolist(), j.tolist(), strict=True)) == set(zip(j.tolist(), r.tolist(), strict=True))
    steps = np.maximum(np.abs(tiles["row"].to_numpy()[r] - tiles["row"].to_numpy()[j]),
                       np.abs(tiles["col"].to_numpy()[r] - tiles["col"].to_numpy()[j]))
    assert (steps == 1).all()


def test_a_run_clusters_each_tile_with_its_neighbours(olinda: Ran) -> None:
    """``cluster_input.npy`` holds each L2-normalised embedding averaged with its 8 neighbours' at 0.25 each, and
    every tile's cluster is the centroid nearest to that row."""
    from settlements.clustering import KMeansClusterer

    ws = workspace(olinda.cfg)
    c = olinda.cfg.clustering
    assert c.neighbour_weight == 0.25 and c.l2_normalize
    kept = kept_tiles(ws)
    rows = tile_neighbours(kept, load_infos(ws))
    assert ((rows >= 0).sum(axis=1) == 8).mean() > 0.8
    seen = np.load(ws.cluster_input)
    expected = with_neighbours(np.load(ws.embeddings), rows, 0.25, True)
    np.testing.assert_allclose(seen, expected, rtol=1e-5, atol=1e-7)
    model = KMeansClusterer.load(ws.clusters)
    labels, _ = model.predict(seen)
    assign = pd.read_parquet(ws.assignments).set_index("tile_id").loc[kept["tile_id"]]
    assert np.array_equal(labels, assign["cluster"].to_numpy())
    alone, _ = model.predict(np.load(ws.embeddings))
    assert 0 < (alone != labels).mean() < 0.5  # the neighbours move some tiles, not most
