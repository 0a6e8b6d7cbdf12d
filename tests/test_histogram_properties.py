"""Properties of the tiling and histogram maths, over random grids, regions and tile tables (hypothesis).

- stride = tile size: the cells of ``tile_plan`` cover the raster exactly, no gap and no double count;
- a region's cell shares add up to the region's area inside the raster, and splitting a region
  splits its shares (areas are additive);
- ``region_histograms``: counts and fractions agree, label and cluster areas add up to the mapped
  area, and merging two regions adds their areas.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import shapely
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pyproj import CRS, Transformer

from settlements.histograms import region_histograms
from settlements.palette import column_keys
from settlements.rasters import RasterInfo
from settlements.regions import cell_region_shares
from settlements.tiling import TileGrid, tile_plan

UTM = CRS.from_epsg(32633)
LAEA = CRS.from_proj4("+proj=laea +lat_0=45 +lon_0=15 +datum=WGS84 +units=m +no_defs")
TO_AREA = Transformer.from_crs(UTM, LAEA, always_xy=True)
FAST = settings(max_examples=60)


def info(width: int, height: int, px: float, x0: float, y0: float) -> RasterInfo:
    return RasterInfo(path=None, crs_wkt=UTM.to_wkt(), transform=(px, 0.0, x0, 0.0, -px, y0),  # type: ignore[arg-type]
                      width=width, height=height, dtype="uint8", bands=(1, 2, 3), nodata=None,
                      pixel_w_m=px, pixel_h_m=px, fingerprint="")


grids = st.tuples(st.integers(1, 60), st.integers(1, 60), st.integers(1, 16),
                  st.sampled_from([1.0, 2.5, 30.0]), st.floats(400_000, 600_000), st.floats(4_900_000, 5_100_000))


@FAST
@given(grids)
def test_cells_cover_the_raster_once_at_stride_equal_to_tile(g) -> None:
    width, height, tile, px, x0, y0 = g
    grid = TileGrid(width, height, tile, tile, tile, tile)
    table = tile_plan(grid, info(width, height, px, x0, y0).affine)
    assert len(table) == grid.n_rows * grid.n_cols
    assert (table["cell_w"] * table["cell_h"]).sum() == width * height  # no pixel twice ...
    cells = shapely.box(table["minx"], table["miny"], table["maxx"], table["maxy"])
    extent = shapely.box(x0, y0 - height * px, x0 + width * px, y0)
    assert shapely.union_all(cells).symmetric_difference(extent).area < 1e-6 * extent.area  # ... and none missed
    # at stride = tile size every tile is its own cell (clipped at the right and bottom edges)
    inner = (table["cell_w"] == tile) & (table["cell_h"] == tile)
    assert (table.loc[inner, "tile_col"] == table.loc[inner, "cell_col"]).all()
    assert (table.loc[inner, "tile_row"] == table.loc[inner, "cell_row"]).all()


def _polygon(draw: st.DrawFn, x0: float, y0: float, w: float, h: float) -> shapely.Geometry:
    """A random simple polygon (convex hull of random points) around the raster, partly outside it."""
    n = draw(st.integers(3, 8))
    xs = draw(st.lists(st.floats(x0 - 0.2 * w, x0 + 1.2 * w), min_size=n, max_size=n))
    ys = draw(st.lists(st.floats(y0 - 1.2 * h, y0 + 0.2 * h), min_size=n, max_size=n))
    return shapely.MultiPoint(list(zip(xs, ys, strict=True))).convex_hull


@st.composite
def scenes(draw: st.DrawFn):
    width, height, tile, px = draw(st.integers(4, 40)), draw(st.integers(4, 40)), draw(st.integers(1, 8)), 30.0
    x0, y0 = 500_000.0, 5_000_000.0
    w, h = width * px, height * px
    regions = [_polygon(draw, x0, y0, w, h) for _ in range(draw(st.integers(1, 4)))]
    cut = draw(st.floats(0.0, 1.0))
    return width, height, tile, px, x0, y0, regions, x0 + cut * w


SLIVER = shapely.Polygon([(500327, 4999549), (499944, 4999860), (500103, 4999732.2)])  # found by hypothesis


@FAST
@given(scenes())
@example((13, 14, 2, 30.0, 500000.0, 5000000.0, [SLIVER], 500390.0))
def test_shares_add_up_to_each_region_inside_the_raster_and_split_additively(scene) -> None:
    width, height, tile, px, x0, y0, regions, cut_x = scene
    table = tile_plan(TileGrid(width, height, tile, tile, tile, tile), info(width, height, px, x0, y0).affine)
    cells = shapely.box(table["minx"], table["miny"], table["maxx"], table["maxy"])
    extent = shapely.box(x0, y0 - height * px, x0 + width * px, y0)
    shares = cell_region_shares(cells, np.array(regions, dtype=object), TO_AREA)
    per_region = shares.groupby("region")["area_m2"].sum().reindex(range(len(regions)), fill_value=0.0)
    tol = 1e-8 * extent.area  # rounding of intersections at UTM coordinates of 5e6 m
    for i, reg in enumerate(regions):
        inside = shapely.segmentize(shapely.intersection(reg, extent), 10.0)  # edges stay straight in UTM
        expected = shapely.area(shapely.transform(inside, lambda xy: np.column_stack(TO_AREA.transform(*xy.T))))
        assert abs(per_region[i] - expected) <= 1e-6 * expected + tol
    assert not shares.duplicated(["cell", "region"]).any()
    # split the first region along x = cut_x: the two halves' shares add up to the whole
    left = shapely.clip_by_rect(regions[0], -1e9, -1e9, cut_x, 1e9)
    right = shapely.clip_by_rect(regions[0], cut_x, -1e9, 1e9, 1e9)
    halves = cell_region_shares(cells, np.array([left, right], dtype=object), TO_AREA)
    assert abs(halves["area_m2"].sum() - per_region[0]) <= 1e-6 * per_region[0] + tol


@st.composite
def tables(draw: st.DrawFn):
    """Tiles (kept or not, valid share, cluster) and shares over a few regions, as the pipeline builds them."""
    k = draw(st.integers(2, 6))
    names = draw(st.lists(st.sampled_from(["water", "forest", "dense city", "fields"]), min_size=k, max_size=k))
    n_tiles = draw(st.integers(1, 30))
    kept = np.array(draw(st.lists(st.booleans(), min_size=n_tiles, max_size=n_tiles)))
    valid = np.array(draw(st.lists(st.floats(0.0, 1.0), min_size=n_tiles, max_size=n_tiles)))
    cluster = np.array(draw(st.lists(st.integers(0, k - 1), min_size=n_tiles, max_size=n_tiles)))
    n_regions = draw(st.integers(1, 4))
    pairs = draw(st.lists(st.tuples(st.integers(0, n_tiles - 1), st.integers(0, n_regions - 1)), min_size=1,
                          max_size=60, unique=True))
    area = draw(st.lists(st.floats(1.0, 1e6), min_size=len(pairs), max_size=len(pairs)))
    tiles = pd.DataFrame({"tile_id": np.arange(n_tiles), "kept": kept, "valid_cell": valid,
                          "cluster": np.where(kept, cluster, -1)})
    tiles["label"] = [names[c] if c >= 0 else None for c in tiles["cluster"]]
    shares = pd.DataFrame({"tile_id": [p[0] for p in pairs], "region": [p[1] for p in pairs], "area_m2": area})
    totals = shares.groupby("region")["area_m2"].sum().reindex(range(n_regions), fill_value=0.0)
    regions = pd.DataFrame({"region": np.arange(n_regions), "region_id": [f"r{i}" for i in range(n_regions)],
                            "region_name": [f"R{i}" for i in range(n_regions)],
                            "area_m2": totals.to_numpy() * draw(st.floats(1.0, 3.0))})
    return tiles, shares, regions, sorted(set(names)), k


@FAST
@given(tables())
def test_histogram_counts_fractions_and_areas_agree(t) -> None:
    tiles, shares, regions, labels, k = t
    wide, long = region_histograms(tiles, shares, regions, column_keys(labels), k)
    s = shares.merge(tiles, on="tile_id")
    for _, row in wide.iterrows():
        mine = s[s["region"] == row["region"]]
        kept = mine[mine["kept"]]
        assert row["n_tiles"] == kept["tile_id"].nunique()
        assert row["n_skipped"] == mine.loc[~mine["kept"], "tile_id"].nunique()
        mapped = (kept["area_m2"] * kept["valid_cell"]).sum() / 1e6
        assert np.isclose(row["mapped_km2"], mapped)
        assert row["mapped_km2"] <= row["imaged_km2"] + 1e-12 and row["imaged_km2"] <= row["area_km2"] + 1e-9
        for names in (list(column_keys(labels).values()), [f"c{c}" for c in range(k)]):
            assert sum(row[f"n_{n}"] for n in names) == row["n_tiles"]  # each kept tile has one class
            assert np.isclose(sum(row[f"km2_{n}"] for n in names), row["mapped_km2"])
            fracs = sum(row[f"frac_{n}"] for n in names)
            assert np.isclose(fracs, 1.0) if row["mapped_km2"] > 0 else fracs == 0.0
    # the long table holds the same numbers
    assert np.isclose(long["km2"].sum(), 2 * wide["mapped_km2"].sum())
    assert long.groupby(["region_id", "kind"])["count"].sum().groupby("region_id").nunique().eq(1).all()


@FAST
@given(tables())
def test_areas_are_additive_across_regions(t) -> None:
    tiles, shares, regions, labels, k = t
    wide, _ = region_histograms(tiles, shares, regions, column_keys(labels), k)
    kept = shares.merge(tiles, on="tile_id")
    kept = kept[kept["kept"]]
    assert np.isclose(wide["mapped_km2"].sum(), (kept["area_m2"] * kept["valid_cell"]).sum() / 1e6)
    # merge every region into region 0: areas add, counts never exceed the sum (a tile may meet both)
    merged_shares = shares.assign(region=0).groupby(["tile_id", "region"], as_index=False)["area_m2"].sum()
    merged_regions = regions.iloc[:1].assign(area_m2=regions["area_m2"].sum())
    merged, _ = region_histograms(tiles, merged_shares, merged_regions, column_keys(labels), k)
    for col in ["area_km2", "imaged_km2", "mapped_km2", *[f"km2_{key}" for key in column_keys(labels).values()]]:
        assert np.isclose(merged[col].iloc[0], wide[col].sum()), col
    for col in ["n_tiles", *[f"n_c{c}" for c in range(k)]]:
        assert wide[col].max() <= merged[col].iloc[0] <= wide[col].sum(), col
