"""Geometry edge cases: the tile stage's areas against independent geodesic areas (pyproj.Geod).

Rasters are real Olinda pixels re-georeferenced under tmp_path (antimeridian, two UTM zones, near
the poles, EPSG:3857 at 60 degrees north); regions come from ../shared/data or are built here.
The truth is computed without the pipeline's equal-area CRS: polygons are densified in their own
CRS, moved to lon/lat, and measured on the WGS84 ellipsoid.
"""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
from pyproj import CRS, Geod, Transformer

from settlements.config import load_config
from settlements.pipeline import stage_tile
from settlements.regions import equal_area_crs, regions_in_crs
from settlements.store import read_table, workspace

from .conftest import scene, write_pipeline

GEOD = Geod(ellps="WGS84")


def lonlat(geom: shapely.Geometry, crs: object) -> shapely.Geometry:
    """``geom`` (straight edges in ``crs``) densified finely and moved to lon/lat."""
    crs = CRS.from_user_input(crs)
    geom = shapely.segmentize(geom, 0.002 if crs.is_geographic else 200.0)
    tr = Transformer.from_crs(crs, 4326, always_xy=True)
    return shapely.transform(geom, lambda xy: np.column_stack(tr.transform(xy[:, 0], xy[:, 1])))


def geodesic_km2(geom_lonlat: shapely.Geometry) -> float:
    return abs(GEOD.geometry_area_perimeter(geom_lonlat)[0]) / 1e6


def relabel(tmp: Path, name: str, crs: str, left: float, top: float, px_w: float, px_h: float) -> Path:
    """Olinda's real pixels (bands 3, 2, 1) under a new CRS and geotransform."""
    with rasterio.open(scene("olinda_brazil", "L7_ETMs.tif")) as src:
        data, prof = src.read([3, 2, 1]), src.profile
    prof.update(count=3, crs=crs, transform=rasterio.Affine(px_w, 0, left, 0, -px_h, top))
    path = tmp / f"{name}.tif"
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(data)
    return path


def write_regions(tmp: Path, name: str, geoms: list, crs: object) -> Path:
    path = tmp / f"{name}.gpkg"
    gpd.GeoDataFrame({"rid": [str(i) for i in range(len(geoms))]}, geometry=geoms, crs=crs).to_file(path)
    return path


def tile_stage(tmp: Path, rasters: list[Path], regions: list[dict],
               tile: str = "16px") -> tuple[pd.Series, gpd.GeoDataFrame, pd.DataFrame]:
    """Run the tile stage; return km2 of cells in each region (by region_id), the regions, the tiles."""
    cfg = load_config(write_pipeline(tmp, "geo", None, rasters=[{"path": str(p), "bands": [1, 2, 3]} for p in rasters],
                                     regions=regions, tiling={"tile_size": tile}, clustering={"k": 2}))
    stage_tile(cfg)
    ws = workspace(cfg)
    regions_df = gpd.read_parquet(ws.regions)
    shares = read_table(ws.shares, "tile").merge(regions_df[["region", "region_id"]], on="region")
    km2 = shares.groupby("region_id")["area_m2"].sum() / 1e6
    return km2.reindex(regions_df["region_id"], fill_value=0.0), regions_df, read_table(ws.tiles, "tile")


def footprint(path: Path) -> shapely.Geometry:
    with rasterio.open(path) as src:
        return lonlat(shapely.box(*src.bounds), src.crs)


# ------------------------------------------------------------------------------ antimeridian

def test_fiji_against_a_raster_reaching_past_180(tmp_path) -> None:
    """A lon/lat raster over 179..181 E: Fiji's parts at -180..-179.8 count as 180..180.2."""
    tif = relabel(tmp_path, "vanua", "EPSG:4326", 179.0, -16.0, 2.0 / 349, 1.0 / 352)
    world = scene("boundaries", "spData_world.gpkg")
    km2, regions, _ = tile_stage(tmp_path, [tif], [{"path": str(world), "where": "name_long = 'Fiji'",
                                                    "id_field": "iso_a2"}])
    fiji = regions.geometry.values[0]
    truth = (geodesic_km2(shapely.intersection(fiji, shapely.box(179.0, -17.0, 180.0, -16.0)))
             + geodesic_km2(shapely.intersection(fiji, shapely.box(-180.0, -17.0, -179.0, -16.0))))
    assert truth > 1000  # both sides of the antimeridian hold land
    assert km2["FJ"] == pytest.approx(truth, rel=1e-3)
    assert regions["area_m2"].iloc[0] / 1e6 == pytest.approx(geodesic_km2(fiji), rel=1e-3)
    lon0 = equal_area_crs(regions).to_dict()["lon_0"]
    assert abs(abs(lon0) - 180) < 3  # centred on Fiji, not on Greenwich


def test_projected_region_across_180_against_rasters_on_both_sides(tmp_path) -> None:
    """A square in UTM 60S straddling 180 degrees becomes two lon/lat parts, not a band round the globe."""
    to_utm = Transformer.from_crs(4326, 32760, always_xy=True)
    cx, cy = to_utm.transform(180.0, -16.5)
    square = shapely.box(cx - 30_000, cy - 30_000, cx + 30_000, cy + 30_000)
    regions = write_regions(tmp_path, "square", [square], "EPSG:32760")
    east = relabel(tmp_path, "east", "EPSG:4326", 179.0, -16.0, 1.0 / 349, 1.0 / 352)
    west = relabel(tmp_path, "west", "EPSG:4326", -180.0, -16.0, 1.0 / 349, 1.0 / 352)
    km2, _, _ = tile_stage(tmp_path, [east, west], [{"path": str(regions), "id_field": "rid"}])
    truth = geodesic_km2(lonlat(square, "EPSG:32760"))  # Geod follows the short way across 180
    assert truth == pytest.approx(3600, rel=0.01)  # UTM scale near the zone edge is about 1.0004
    assert km2["0"] == pytest.approx(truth, rel=1e-3)
    in_lonlat = regions_in_crs(gpd.read_file(regions), CRS.from_epsg(4326)).geometry.values[0]
    assert in_lonlat.bounds[2] - in_lonlat.bounds[0] > 359 and geodesic_km2(in_lonlat) == pytest.approx(truth, 1e-3)


# ------------------------------------------------------------------------------ UTM zones, poles, Mercator

def test_region_across_two_utm_zones(tmp_path) -> None:
    """Raster in UTM 32N reaching east of 12 E; regions in UTM 33N crossing the zone boundary."""
    to32 = Transformer.from_crs(4326, 32632, always_xy=True)
    x0, y0 = to32.transform(12.0, 48.0)
    tif = relabel(tmp_path, "bavaria", "EPSG:32632", x0 - 17_450, y0 + 17_600, 100.0, 100.0)
    to33 = Transformer.from_crs(4326, 32633, always_xy=True)
    cx, cy = to33.transform(12.0, 48.0)
    inside = shapely.Polygon([(cx - 12_000, cy - 9_000), (cx + 11_000, cy - 12_000), (cx + 9_000, cy + 10_000),
                              (cx - 10_000, cy + 12_000)])
    partly = shapely.box(cx + 5_000, cy - 5_000, cx + 40_000, cy + 5_000)  # leaves the raster to the east
    regions = write_regions(tmp_path, "zones", [inside, partly], "EPSG:32633")
    km2, _, _ = tile_stage(tmp_path, [tif], [{"path": str(regions), "id_field": "rid"}])
    assert km2["0"] == pytest.approx(geodesic_km2(lonlat(inside, "EPSG:32633")), rel=1e-3)
    truth = geodesic_km2(shapely.intersection(lonlat(partly, "EPSG:32633"), footprint(tif)))
    assert 100 < truth < geodesic_km2(lonlat(partly, "EPSG:32633")) - 100
    assert km2["1"] == pytest.approx(truth, rel=2e-3)


def test_lonlat_raster_near_the_north_pole(tmp_path) -> None:
    tif = relabel(tmp_path, "arctic", "EPSG:4326", -30.0, 89.0, 60.0 / 349, 5.0 / 352)
    box = shapely.box(-20.0, 85.0, 20.0, 88.0)
    to_ps = Transformer.from_crs(4326, 3413, always_xy=True)
    px, py = to_ps.transform(0.0, 86.5)
    disc = shapely.Point(px, py).buffer(60_000, quad_segs=64)  # polar stereographic, ~11 000 km2
    regions = [{"path": str(write_regions(tmp_path, "box", [box], "EPSG:4326")), "id_field": "rid"},
               {"path": str(write_regions(tmp_path, "disc", [disc], "EPSG:3413")), "id_field": "rid"}]
    km2, regions_df, _ = tile_stage(tmp_path, [tif], regions)
    assert km2["box:0"] == pytest.approx(geodesic_km2(lonlat(box, 4326)), rel=1e-3)
    # the region's own area: its 40-degree edges along parallels are arcs round the pole, not chords
    area = regions_df.set_index("region_id")["area_m2"] / 1e6
    assert area["box:0"] == pytest.approx(geodesic_km2(lonlat(box, 4326)), rel=1e-3)
    assert km2["disc:0"] == pytest.approx(geodesic_km2(lonlat(disc, "EPSG:3413")), rel=1e-3)
    # all cells: the raster's whole footprint, parallels curved round the pole
    assert km2.sum() < geodesic_km2(footprint(tif))


def test_lonlat_raster_over_antarctica(tmp_path) -> None:
    tif = relabel(tmp_path, "antarctic", "EPSG:4326", -30.0, -81.0, 60.0 / 349, 5.0 / 352)
    world = scene("boundaries", "spData_world.gpkg")
    km2, regions, _ = tile_stage(tmp_path, [tif], [{"path": str(world), "where": "name_long = 'Antarctica'",
                                                    "id_field": "iso_a2"}])
    ant = regions.geometry.values[0]
    truth = geodesic_km2(shapely.segmentize(shapely.intersection(ant, shapely.box(-30, -86, 30, -81)), 0.002))
    assert km2["AQ"] == pytest.approx(truth, rel=1e-3)
    assert equal_area_crs(regions).to_dict()["lat_0"] < -75  # centred near the south pole


def test_web_mercator_raster_at_60_north(tmp_path) -> None:
    """EPSG:3857 units are half a metre on the ground at 60 N: areas must not come out 4x too large."""
    x0, y0 = Transformer.from_crs(4326, 3857, always_xy=True).transform(10.0, 60.3)
    tif = relabel(tmp_path, "oslo", "EPSG:3857", x0, y0, 200.0, 200.0)
    box = shapely.box(10.05, 60.02, 10.5, 60.25)
    regions = write_regions(tmp_path, "box", [box], "EPSG:4326")
    km2, regions_df, tiles = tile_stage(tmp_path, [tif], [{"path": str(regions), "id_field": "rid"}])
    truth = geodesic_km2(lonlat(box, 4326))
    assert km2["0"] == pytest.approx(truth, rel=1e-3)
    assert regions_df["area_m2"].iloc[0] / 1e6 == pytest.approx(truth, rel=1e-3)


# ------------------------------------------------------------------------------ EASE-Grid regions

def test_ease_grid_provinces_for_the_swellendam_photo(tmp_path) -> None:
    """RSA provinces in legacy EPSG:3410 (cylindrical equal-area on a sphere) over a lon/lat photo."""
    photo = scene("swellendam_za", "3420B_2010_328_RGB_LATLNG.tif")
    rsa = scene("swellendam_za", "RSA.shp")
    km2, regions, _ = tile_stage(tmp_path, [photo], [{"path": str(rsa), "id_field": "NAME_1"}], tile="64px")
    provinces = gpd.read_file(rsa).set_index("NAME_1")
    wc = lonlat(provinces.geometry["Western Cape"], provinces.crs)
    assert km2.index[km2 > 0].tolist() == ["Western Cape"]  # the photo lies in one province
    assert km2["Western Cape"] == pytest.approx(geodesic_km2(shapely.intersection(wc, footprint(photo))), rel=1e-3)
    area = regions.set_index("region_id")["area_m2"] / 1e6
    for name, geom in provinces.geometry.items():
        assert area[name] == pytest.approx(geodesic_km2(lonlat(geom, provinces.crs)), rel=2e-3), name
    assert area["Western Cape"] == pytest.approx(129_462, rel=0.01)  # Stats SA: 129 462 km2


# ------------------------------------------------------------------------------ overlapping rasters

def olinda_crops(tmp: Path) -> list[Path]:
    """Two 200 x 200 px crops of the Olinda scene (bands 3, 2, 1) overlapping by 40 x 60 px: a.tif, b.tif."""
    with rasterio.open(scene("olinda_brazil", "L7_ETMs.tif")) as src:
        prof = src.profile | {"count": 3}
        crops = []
        for name, (c, r) in {"a": (0, 0), "b": (160, 140)}.items():
            win = rasterio.windows.Window(c, r, 200, 200)
            path = tmp / f"{name}.tif"
            with rasterio.open(path, "w", **(prof | {"width": 200, "height": 200,
                                                      "transform": src.window_transform(win)})) as dst:
                dst.write(src.read([3, 2, 1], window=win))
            crops.append(path)
    return crops


def test_overlapping_rasters_count_ground_once_first_listed_wins(tmp_path) -> None:
    """Two crops of the Olinda scene overlapping by 40 x 60 px: the overlap counts for the first only."""
    crops = olinda_crops(tmp_path)
    tracts = scene("olinda_brazil", "olinda1.shp")
    km2, regions, tiles = tile_stage(tmp_path, crops, [{"path": str(tracts), "id_field": "CD_GEOCODI"}])
    union = shapely.union(footprint(crops[0]), footprint(crops[1]))
    geoms = regions.set_index("region_id").geometry
    truth = pd.Series({rid: geodesic_km2(shapely.intersection(lonlat(g, regions.crs), union))
                       for rid, g in geoms.items()})
    assert km2.sum() == pytest.approx(truth.sum(), rel=1e-3)
    big = truth > 0.05
    np.testing.assert_allclose(km2[big].to_numpy(), truth[big].reindex(km2[big].index).to_numpy(), rtol=5e-3)
    # cells of the second raster wholly inside the first carry no area at all
    ws_shares = read_table(tmp_path / "work" / "geo" / "shares.parquet", "tile")
    second = tiles[tiles["raster"] == 1]
    inner = second[(second["cell_col"] + second["cell_w"] <= 40) & (second["cell_row"] + second["cell_h"] <= 60)]
    assert len(inner) > 0 and not ws_shares["tile_id"].isin(inner["tile_id"]).any()


def test_an_earlier_raster_gives_up_the_ground_where_it_is_nodata(tmp_path) -> None:
    """A scene whose right part is a nodata collar, listed before a full one: the full scene maps the
    collar's ground, and only there; the ground is counted once, as with the full scene alone."""
    src_path = scene("olinda_brazil", "L7_ETMs.tif")
    with rasterio.open(src_path) as src:
        prof = src.profile | {"count": 3}
        data = src.read([3, 2, 1])
    assert (data > 0).all()  # so 0 can be the collar's nodata
    collar = data.copy()
    collar[:, :, 160:] = 0  # ten 16 px cells of imagery, then nodata
    paths = {}
    for name, pixels, nodata in (("collar", collar, 0), ("full", data, None)):
        paths[name] = tmp_path / f"{name}.tif"
        with rasterio.open(paths[name], "w", **(prof | {"nodata": nodata})) as dst:
            dst.write(pixels)
    tracts = [{"path": str(scene("olinda_brazil", "olinda1.shp")), "id_field": "CD_GEOCODI"}]

    for sub in ("alone", "both"):
        (tmp_path / sub).mkdir()
    alone_km2, _, alone_tiles = tile_stage(tmp_path / "alone", [paths["full"]], tracts)
    km2, _, tiles = tile_stage(tmp_path / "both", [paths["collar"], paths["full"]], tracts)
    shares = read_table(tmp_path / "both" / "work" / "geo" / "shares.parquet", "tile").merge(tiles, on="tile_id")
    first, second = shares[shares["raster"] == 0], shares[shares["raster"] == 1]
    assert not second.empty, "the full scene lost all its ground to the collar's extent"
    assert (second["cell_col"] >= 160).all()  # nothing where the first holds imagery
    # the collar's imaged cells plus the full scene's cells cover the ground once, exactly as the full scene alone
    imaged = first[first["cell_col"] + first["cell_w"] <= 160]["area_m2"].sum() + second["area_m2"].sum()
    assert imaged == pytest.approx(alone_km2.sum() * 1e6, rel=1e-9)
    # the full scene's cells in the collar keep their whole area, cell for cell
    key = ["cell_col", "cell_row"]
    alone = read_table(tmp_path / "alone" / "work" / "geo" / "shares.parquet", "tile").merge(alone_tiles, on="tile_id")
    got = second.groupby(key)["area_m2"].sum()
    want = alone[alone["cell_col"] >= 160].groupby(key)["area_m2"].sum()
    pd.testing.assert_series_equal(got.sort_index(), want.sort_index(), rtol=1e-9)
    assert km2.sum() > alone_km2.sum()  # the collar's own nodata cells still carry area (valid_cell 0 later)


def test_without_regions_each_raster_is_a_region_and_its_ground_counts_once(tmp_path) -> None:
    """No ``regions``: two overlapping crops of the Olinda scene (UTM) and, listed last, the whole scene warped to
    lon/lat. Each raster's extent is a region whose area is the geodesic area of the raster's footprint, and
    the cells inside it, from whichever raster, add up to exactly that area: the overlaps counted once."""
    crops = olinda_crops(tmp_path)
    rasters = [*crops, warped(tmp_path, scene("olinda_brazil", "L7_ETMs.tif"), "EPSG:4326", "lonlat")]
    km2, regions, tiles = tile_stage(tmp_path, rasters, [])
    assert list(regions["region_id"]) == ["a.tif", "b.tif", "lonlat.tif"]
    assert set(regions["source"]) == {"rasters"}
    truth = pd.Series({p.name: geodesic_km2(footprint(p)) for p in rasters})
    area = regions.set_index("region_id")["area_m2"] / 1e6
    np.testing.assert_allclose(area.to_numpy(), truth.to_numpy(), rtol=1e-4)
    np.testing.assert_allclose(km2.to_numpy(), truth.to_numpy(), rtol=1e-4)  # the ground inside, counted once
    # the second crop's region holds the first crop's cells where the first wins, and its own elsewhere
    shares = read_table(tmp_path / "work" / "geo" / "shares.parquet", "tile").merge(tiles, on="tile_id")
    in_b = shares[shares["region"] == 1].groupby("raster")["area_m2"].sum() / 1e6
    assert in_b[0] > 1 and in_b[1] > 20 and in_b.sum() == pytest.approx(truth["b.tif"], rel=1e-4)
    assert in_b.get(2, 0.0) < 5e-5 * in_b.sum()  # the warped scene: slivers centimetres wide along the crops' edges


def test_valid_footprint_traces_imagery_not_the_extent(tmp_path) -> None:
    from settlements.rasters import inspect_raster, valid_footprint

    src_path = scene("olinda_brazil", "L7_ETMs.tif")
    with rasterio.open(src_path) as src:
        prof = src.profile | {"count": 3, "nodata": 0}
        data = src.read([3, 2, 1])
        res, bounds = src.res[0], src.bounds
    data[:, 100:200, 50:150] = 0  # a nodata hole of 100 x 100 px
    data[:, :, 300:] = 0  # and a collar on the right
    path = tmp_path / "holes.tif"
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(data)
    from settlements.config import RasterInput

    info = inspect_raster(path, RasterInput(path=path, bands=[1, 2, 3]))
    fp = valid_footprint(info)
    assert fp.area == pytest.approx((data > 0).all(axis=0).sum() * res * res, rel=1e-9)
    assert not fp.contains(shapely.Point(bounds.left + 100 * res, bounds.top - 150 * res))  # in the hole
    coarse = valid_footprint(info, cells=64)  # decimated: true to within a coarse cell (352 / 64 = 5.5 px)
    assert shapely.symmetric_difference(coarse, fp).area < 2 * (100 * 4 + 352) * 6 * res * res
    plain = inspect_raster(src_path, RasterInput(path=src_path, bands=[3, 2, 1]))
    assert valid_footprint(plain).equals(shapely.box(*bounds))  # no mask, alpha or nodata: the extent


# ------------------------------------------------------------------------------ ground metres

def warped(tmp: Path, src_path: Path, crs: str, name: str) -> Path:
    """A real scene reprojected into ``crs`` as gdalwarp would (rasterio.warp; bands 1-3, nearest)."""
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    with rasterio.open(src_path) as src:
        transform, w, h = calculate_default_transform(src.crs, crs, src.width, src.height, *src.bounds)
        prof = {"driver": "GTiff", "dtype": src.dtypes[0], "count": 3, "crs": crs, "transform": transform,
                "width": w, "height": h}
        out = tmp / f"{name}.tif"
        with rasterio.open(out, "w", **prof) as dst:
            for b in (1, 2, 3):
                reproject(rasterio.band(src, b), rasterio.band(dst, b), resampling=Resampling.nearest)
    return out


GROUND_CASES = {  # scene, CRS, tile side in metres; how far map units are from ground metres at the scene
    "web_mercator": ("amsterdam_s2/OudeKerk.tif", "EPSG:3857", 1000.0),  # 52.4 N: a map unit is 0.61 m
    "polar_stereographic": ("amsterdam_s2/OudeKerk.tif", "EPSG:3413", 1000.0),  # true scale at 70 N: 8 % off
    "utm_far_from_its_meridian": ("olinda_brazil/L7_ETMs.tif", "EPSG:32728", 2000.0),  # 20 degrees off: 6 %
    "lonlat": ("amsterdam_s2/OudeKerk.tif", "EPSG:4326", 1000.0),
}


@pytest.mark.parametrize("case", list(GROUND_CASES))
def test_tile_size_in_metres_is_ground_metres_in_any_crs(tmp_path, case) -> None:
    """A tile of ``side`` metres at the raster's centre is that long on the ellipsoid, side by side, and its area
    is side² (Olinda's 28.5 m pixels take 2 km tiles, so rounding to whole pixels stays within 1 %)."""
    from settlements.config import RasterInput
    from settlements.rasters import inspect_raster
    from settlements.tiling import length_to_pixels

    rel, crs, side = GROUND_CASES[case]
    path = warped(tmp_path, scene(*rel.split("/")), crs, case)
    info = inspect_raster(path, RasterInput(path=path, bands=[1, 2, 3]))
    tw, th = length_to_pixels(side, "m", info.pixel_w_m, info.pixel_h_m)
    assert min(tw, th) >= 50
    c, r = info.width / 2, info.height / 2
    corners = [(c - tw / 2, r - th / 2), (c + tw / 2, r - th / 2), (c + tw / 2, r + th / 2), (c - tw / 2, r + th / 2)]
    xs, ys = zip(*(info.affine * p for p in corners), strict=True)
    lon, lat = Transformer.from_crs(info.crs, 4326, always_xy=True).transform(xs, ys)
    _, _, sides = GEOD.inv(lon, lat, np.roll(lon, -1), np.roll(lat, -1))
    np.testing.assert_allclose(sides, side, rtol=0.01)
    tile = lonlat(shapely.Polygon(list(zip(xs, ys, strict=True))), info.crs)
    assert geodesic_km2(tile) == pytest.approx((side / 1000) ** 2, rel=0.02)


def test_validate_prints_the_tile_in_ground_metres(tmp_path, monkeypatch, capsys) -> None:
    """EPSG:3857 at 52 N: 1 km is 61 ground pixels of 16.4 map units, and validate says 1,000 m."""
    import re

    from .conftest import run_cli

    path = warped(tmp_path, scene("amsterdam_s2", "OudeKerk.tif"), "EPSG:3857", "mercator")
    with rasterio.open(path) as src:
        b = src.bounds
    region = f"POLYGON (({b.left} {b.bottom}, {b.right} {b.bottom}, {b.right} {b.top}, {b.left} {b.top}, " \
             f"{b.left} {b.bottom}))"
    cfg = write_pipeline(tmp_path, "merc", None, rasters=[{"path": str(path), "bands": [1, 2, 3]}],
                         regions=[{"wkt": region, "crs": "EPSG:3857"}], tiling={"tile_size": "1km"},
                         clustering={"k": 2})
    code, out, _ = run_cli(monkeypatch, capsys, "validate", str(cfg))
    assert code == 0, out
    m = re.search(r"tile (\d+) x (\d+) px \(([\d,.]+) x ([\d,.]+) m on the ground\)", out)
    assert m, out
    px, metres = int(m.group(1)), float(m.group(3).replace(",", ""))
    assert metres == pytest.approx(1000, rel=0.01)
    assert px * src.res[0] == pytest.approx(1000 / np.cos(np.radians(52.37)), rel=0.02)  # map units, not metres
