"""Bad input, case by case: one error line naming the file or key and the problem, exit code 2,
and no new or changed files (outputs, labels) in the test folder.

Defective rasters are manufactured under tmp_path from the real Olinda Landsat scene. Most cases
fail in the tile stage, before the CNN; the few that need a finished run share one small run.
"""

from __future__ import annotations

import hashlib
import logging
import re
import resource
import sys
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
import torch
from rasterio.control import GroundControlPoint

from settlements.config import load_config
from settlements.pipeline import run, stage_tile
from settlements.store import read_table, workspace

from .conftest import HANG_GUARD, run_cli, said, scene, write_pipeline

SMALL = {"tiling": {"tile_size": "64px"}, "embedding": {"input_size": 32, "num_workers": 0},
         "clustering": {"k": 2}}


# ------------------------------------------------------------------------------------ helpers

def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (work folders aside) with the SHA-256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "work" not in p.relative_to(root).parts}


def expect_error(tmp: Path, monkeypatch, capsys, cfg: Path, pattern: str, command: str = "run") -> str:
    """Run ``command cfg`` with an earlier output in place; assert the clean failure; return the line."""
    earlier = tmp / "outputs" / cfg.stem / f"{cfg.stem}.gpkg"
    if not earlier.exists():
        earlier.parent.mkdir(parents=True, exist_ok=True)
        earlier.write_bytes(b"earlier output")
    before = snapshot(tmp)
    code, _, err = run_cli(monkeypatch, capsys, command, str(cfg))
    lines = said(err)
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    assert snapshot(tmp) == before
    return lines[0]


def bad(tmp: Path, **overrides: object) -> Path:
    return write_pipeline(tmp, "bad", "olinda", **overrides)


def raster_cfg(tmp: Path, path: Path, bands: list[int] | None = None, **overrides: object) -> Path:
    return bad(tmp, rasters=[{"path": str(path), "bands": bands or [3, 2, 1],
                              **overrides.pop("raster", {})}], **overrides)  # type: ignore[dict-item]


@pytest.fixture
def olinda_tif() -> Path:
    return scene("olinda_brazil", "L7_ETMs.tif")


def copy_raster(src_path: Path, dst: Path, **profile: object) -> Path:
    """Rewrite a real raster with profile changes (bands 3, 2, 1 kept as 1, 2, 3)."""
    with rasterio.open(src_path) as src:
        data = src.read([3, 2, 1])
        prof = src.profile | {"count": 3}
    prof.update(profile)
    with rasterio.open(dst, "w", **prof) as out:
        out.write(data.astype(prof["dtype"]))
    return dst


def tiled_copy(olinda_tif: Path, dst: Path) -> Path:
    return copy_raster(olinda_tif, dst, tiled=True, blockxsize=64, blockysize=64, compress="deflate")


def corrupt_block(path: Path, row: int, col: int) -> None:
    """Overwrite one compressed block with garbage, as a broken disk or transfer would."""
    with rasterio.open(path) as src:
        offset = int(src.get_tag_item(f"BLOCK_OFFSET_{col}_{row}", "TIFF", bidx=1))
        size = int(src.get_tag_item(f"BLOCK_SIZE_{col}_{row}", "TIFF", bidx=1))
    data = bytearray(path.read_bytes())
    data[offset:offset + size] = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------ rasters

def test_truncated_geotiff(tmp_path, monkeypatch, capsys, olinda_tif) -> None:
    tif = tiled_copy(olinda_tif, tmp_path / "cut.tif")
    tif.write_bytes(tif.read_bytes()[: tif.stat().st_size * 2 // 3])
    expect_error(tmp_path, monkeypatch, capsys, raster_cfg(tmp_path, tif, [1, 2, 3]),
                 r"cut\.tif: cannot (open raster|read pixels \(truncated or corrupt file\?\))")


def test_corrupt_block_found_while_tiling(tmp_path, monkeypatch, capsys, olinda_tif) -> None:
    tif = tiled_copy(olinda_tif, tmp_path / "flipped.tif")
    corrupt_block(tif, 0, 5)  # not a block the opener samples; the percentile scan reads it
    expect_error(tmp_path, monkeypatch, capsys, raster_cfg(tmp_path, tif, [1, 2, 3]),
                 r"flipped\.tif: cannot read pixels \(truncated or corrupt file\?\): .*IReadBlock failed")


def test_corrupt_block_found_while_embedding(tmp_path, monkeypatch, capsys, olinda_tif) -> None:
    tif = tiled_copy(olinda_tif, tmp_path / "flipped.tif")
    corrupt_block(tif, 0, 5)
    cfg = raster_cfg(tmp_path, tif, [1, 2, 3], raster={"scaling": {"method": "dtype"}},
                     **{**SMALL, "embedding": {"input_size": 32, "num_workers": 1}})
    expect_error(tmp_path, monkeypatch, capsys, cfg,
                 r"^error: \S*flipped\.tif: cannot read pixels \(truncated or corrupt file\?\): .*IReadBlock failed")
    assert (tmp_path / "work" / "bad").is_dir()  # it got past the checks: a failed run commits nothing
    assert sorted(p.name for p in (tmp_path / "work" / "bad").iterdir() if p.is_file()) == [".lock"]


def test_raster_with_gcps_but_no_geotransform(tmp_path, monkeypatch, capsys, olinda_tif) -> None:
    with rasterio.open(olinda_tif) as src:
        b, data, prof = src.bounds, src.read([3, 2, 1]), src.profile
        gcps = [GroundControlPoint(0, 0, b.left, b.top), GroundControlPoint(0, src.width, b.right, b.top),
                GroundControlPoint(src.height, 0, b.left, b.bottom)]
    prof = {k: v for k, v in prof.items() if k not in ("crs", "transform")} | {"count": 3}
    with rasterio.open(tmp_path / "gcps.tif", "w", **prof, gcps=gcps, crs="EPSG:31985") as out:
        out.write(data)
    expect_error(tmp_path, monkeypatch, capsys, raster_cfg(tmp_path, tmp_path / "gcps.tif", [1, 2, 3]),
                 r"gcps\.tif: raster has ground control points but no geotransform \(warp it first")


@pytest.mark.parametrize("dtype", ["int8", "complex64"])
def test_unsupported_dtype(tmp_path, monkeypatch, capsys, olinda_tif, dtype) -> None:
    tif = copy_raster(olinda_tif, tmp_path / f"{dtype}.tif", dtype=dtype)
    expect_error(tmp_path, monkeypatch, capsys, raster_cfg(tmp_path, tif, [1, 2, 3]),
                 rf"{dtype}\.tif: band 1: data type {dtype} is not supported \(use one of float32")


@pytest.mark.parametrize("method", ["percentile", "range"])
def test_all_nodata_raster(tmp_path, monkeypatch, capsys, olinda_tif, method) -> None:
    tif = copy_raster(olinda_tif, tmp_path / "masked.tif")
    with rasterio.open(tif, "r+") as dst:
        dst.write_mask(np.zeros((dst.height, dst.width), dtype=np.uint8))  # real pixels, all masked
    scaling = {"method": method} | ({"min": 0, "max": 255} if method == "range" else {})
    expect_error(tmp_path, monkeypatch, capsys, raster_cfg(tmp_path, tif, [1, 2, 3], raster={"scaling": scaling}),
                 r"masked\.tif: raster holds no valid pixels \(all nodata, masked or non-finite\)")


def test_dtype_scaling_of_a_float_raster(tmp_path, monkeypatch, capsys, olinda_tif) -> None:
    """float64 values 1..2041: 'dtype' would clip every pixel to white (one cluster, empty atlas)."""
    with rasterio.open(olinda_tif) as src:
        data, prof = src.read([3, 2, 1]).astype(np.float64) * 8 + 1, src.profile | {"count": 3, "dtype": "float64"}
    with rasterio.open(tmp_path / "wv.tif", "w", **prof) as dst:
        dst.write(data)
    for command in ("run", "validate"):
        expect_error(tmp_path, monkeypatch, capsys,
                     raster_cfg(tmp_path, tmp_path / "wv.tif", [1, 2, 3], raster={"scaling": {"method": "dtype"}}),
                     r"wv\.tif: rasters\.scaling: method 'dtype' needs an integer raster, this one is float64 "
                     r"\(use method 'percentile', or 'range'", command=command)


@pytest.mark.parametrize("max_invalid", [0.5, 1.0])
def test_constant_band(tmp_path, monkeypatch, capsys, olinda_tif, max_invalid) -> None:
    """A uint16 band holding one value: named as such, never 'no tile has at least 0% valid pixels'."""
    with rasterio.open(olinda_tif) as src:
        data, prof = src.read([3, 2, 1]).astype(np.uint16), src.profile | {"count": 3, "dtype": "uint16"}
    data[1] = 1000
    with rasterio.open(tmp_path / "flat.tif", "w", **prof) as dst:
        dst.write(data)
    cfg = raster_cfg(tmp_path, tmp_path / "flat.tif", [1, 2, 3], tiling={"max_invalid_fraction": max_invalid})
    expect_error(tmp_path, monkeypatch, capsys, cfg, r"flat\.tif: rasters\.scaling: band 2: its percentiles 2 and 98 "
                 r"are both 1000 \(a constant band\?\); use method 'range' with min and max")


@pytest.mark.parametrize(("scaling", "pattern"), [
    ({"method": "range", "min": 255, "max": 0}, r"rasters\.0: scaling: band 3: min 255 must be below max 0"),
    ({"method": "range", "min": [0, 10, 0], "max": [255, 5, 255]},
     r"rasters\.0: scaling: band 2: min 10 must be below max 5"),
    ({"method": "range", "min": [0, 0], "max": 255},
     r"rasters\.0: scaling\.min: 2 value\(s\) for 3 band\(s\) \[3, 2, 1\]; give one per band"),
    ({"method": "range", "min": 0, "max": [255, 255, 255, 255]},
     r"rasters\.0: scaling\.max: 4 value\(s\) for 3 band\(s\) \[3, 2, 1\]; give one per band"),
])
def test_inverted_or_misshapen_range(tmp_path, monkeypatch, capsys, olinda_tif, scaling, pattern) -> None:
    expect_error(tmp_path, monkeypatch, capsys, raster_cfg(tmp_path, olinda_tif, raster={"scaling": scaling}),
                 r"bad\.yaml: invalid config: " + pattern)


def test_rotated_raster(tmp_path, monkeypatch, capsys, olinda_tif) -> None:
    with rasterio.open(olinda_tif) as src:
        t = src.transform
    tif = copy_raster(olinda_tif, tmp_path / "rotated.tif",
                      transform=rasterio.Affine(t.a, 3.0, t.c, 3.0, t.e, t.f))
    expect_error(tmp_path, monkeypatch, capsys, raster_cfg(tmp_path, tif, [1, 2, 3]),
                 r"rotated\.tif: rotated geotransforms are not supported")


def test_raster_path_is_a_folder(tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "scene.tif").mkdir()
    expect_error(tmp_path, monkeypatch, capsys, raster_cfg(tmp_path, tmp_path / "scene.tif"),
                 r"scene\.tif: not a file")


def test_glob_matches_nothing(tmp_path, monkeypatch, capsys) -> None:
    expect_error(tmp_path, monkeypatch, capsys, raster_cfg(tmp_path, tmp_path / "OAM-*-19.tif"),
                 r"OAM-\*-19\.tif: no raster matches this pattern")


# ------------------------------------------------------------------------------------ regions

def regions_cfg(tmp: Path, **regions: object) -> Path:
    return bad(tmp, regions=[regions])


def test_region_file_missing(tmp_path, monkeypatch, capsys) -> None:
    expect_error(tmp_path, monkeypatch, capsys, regions_cfg(tmp_path, path=str(tmp_path / "tracts.shp")),
                 r"tracts\.shp: region file not found")


def test_region_file_without_features(tmp_path, monkeypatch, capsys) -> None:
    tracts = pyogrio.read_dataframe(scene("olinda_brazil", "olinda1.shp"))
    pyogrio.write_dataframe(tracts.iloc[:0], tmp_path / "empty.gpkg", layer="tracts")
    expect_error(tmp_path, monkeypatch, capsys, regions_cfg(tmp_path, path=str(tmp_path / "empty.gpkg")),
                 r"empty\.gpkg: region file holds no features")


def test_region_file_not_vector_data(tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "tracts.shp").write_bytes(b"\x00\x00\x27\x0a" + b"garbage" * 20)
    expect_error(tmp_path, monkeypatch, capsys, regions_cfg(tmp_path, path=str(tmp_path / "tracts.shp")),
                 r"tracts\.shp: cannot read region file")


def test_region_file_without_crs(tmp_path, monkeypatch, capsys) -> None:
    for ext in ("shp", "shx", "dbf"):  # no .prj
        (tmp_path / f"tracts.{ext}").write_bytes(scene("olinda_brazil", f"olinda1.{ext}").read_bytes())
    expect_error(tmp_path, monkeypatch, capsys, regions_cfg(tmp_path, path=str(tmp_path / "tracts.shp")),
                 r"tracts\.shp: region file has no CRS \(add a \.prj, or set regions\.crs\)")


def test_region_file_entirely_outside(tmp_path, monkeypatch, capsys) -> None:
    world = scene("boundaries", "spData_world.gpkg")
    expect_error(tmp_path, monkeypatch, capsys,
                 regions_cfg(tmp_path, path=str(world), where="name_long = 'Fiji'", id_field="iso_a2"),
                 r"spData_world\.gpkg: no region overlaps any input raster \(check the CRS and extent\)")


def test_region_id_field_missing(tmp_path, monkeypatch, capsys) -> None:
    expect_error(tmp_path, monkeypatch, capsys,
                 regions_cfg(tmp_path, path=str(scene("olinda_brazil", "olinda1.shp")), id_field="TRACT"),
                 r"olinda1\.shp: field 'TRACT' not found \(fields: .*CD_GEOCODI")


@pytest.mark.parametrize("how", ["same_file_twice", "two_files_of_one_name"])
def test_a_region_listed_twice(tmp_path, monkeypatch, capsys, how) -> None:
    """The same tracts twice gave 940 rows with 470 ids and doubled changes: an error naming both sources."""
    tracts = scene("olinda_brazil", "olinda1.shp")
    other = tracts
    if how == "two_files_of_one_name":
        (tmp_path / "copy").mkdir()
        other = tmp_path / "copy" / "olinda1.gpkg"
        pyogrio.write_dataframe(pyogrio.read_dataframe(tracts).iloc[:5], other)
    cfg = bad(tmp_path, regions=[{"path": str(tracts), "id_field": "CD_GEOCODI"},
                                 {"path": str(other), "id_field": "CD_GEOCODI"}])
    n = 470 if how == "same_file_twice" else 5
    for command in ("run", "validate"):
        expect_error(tmp_path, monkeypatch, capsys, cfg,
                     rf"regions\[1\] \({re.escape(str(other))}\): region id 'olinda1:\d+' is also in regions\[0\] "
                     rf"\({re.escape(str(tracts))}\) \({n} ids met twice; list each region source once",
                     command=command)


def test_regions_without_geometry_are_reported_and_left_out(tmp_path, monkeypatch, capsys, caplog) -> None:
    """Two NULL and one empty geometry among the 470 tracts: one warning with the count and ids (they were
    dropped without a word), and the other 467 regions are counted."""
    import geopandas as gpd

    tracts = gpd.read_file(scene("olinda_brazil", "olinda1.shp"))
    ids = tracts["CD_GEOCODI"].iloc[[3, 40, 200]].tolist()
    geoms = tracts.geometry.values.copy()
    geoms[[3, 40]] = None
    geoms[200] = shapely.Polygon()
    tracts.set_geometry(geoms).to_file(tmp_path / "holes.gpkg")
    cfg = bad(tmp_path, regions=[{"path": str(tmp_path / "holes.gpkg"), "id_field": "CD_GEOCODI"}])
    with caplog.at_level(logging.WARNING, logger="settlements"):
        assert run_cli(monkeypatch, capsys, "tile", str(cfg))[0] == 0
    ours = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(ours) == 1 and "holes.gpkg: 3 region(s) without geometry (NULL or empty) left out" in ours[0]
    assert all(i in ours[0] for i in ids)
    regions = gpd.read_parquet(tmp_path / "work" / "bad" / "regions.parquet")
    assert len(regions) == 467 and not set(ids) & set(regions["region_id"])


def test_regions_are_lines(tmp_path, monkeypatch, capsys) -> None:
    expect_error(tmp_path, monkeypatch, capsys,
                 regions_cfg(tmp_path, wkt="LINESTRING (-34.9 -8.0, -34.8 -8.05)", crs="EPSG:4326"),
                 r"regions\.wkt: regions must be polygons, found \['LineString'\]")


def test_self_intersecting_regions_are_repaired_and_reported(tmp_path, monkeypatch, capsys, caplog) -> None:
    """Not fatal: a bow-tie and a multipolygon are repaired with make_valid, logged, and counted right."""
    with rasterio.open(scene("olinda_brazil", "L7_ETMs.tif")) as src:
        b = src.bounds
    x0, y0, dx, dy = b.left + 1000, b.bottom + 1000, 3000, 3000
    bowtie = shapely.Polygon([(x0, y0), (x0 + dx, y0 + dy), (x0 + dx, y0), (x0, y0 + dy)])
    multi = shapely.MultiPolygon([shapely.box(x0 + 4000, y0, x0 + 5000, y0 + 1000),
                                  shapely.box(x0 + 6000, y0, x0 + 7000, y0 + 1000)])
    import geopandas as gpd

    gpd.GeoDataFrame({"name": ["bowtie", "pair"]}, geometry=[bowtie, multi], crs="EPSG:31985").to_file(
        tmp_path / "shapes.gpkg")
    assert not bowtie.is_valid
    cfg = write_pipeline(tmp_path, "shapes", "olinda", regions=[{"path": str(tmp_path / "shapes.gpkg"),
                                                                 "name_field": "name"}])
    with caplog.at_level(logging.WARNING, logger="settlements.regions"):
        assert run_cli(monkeypatch, capsys, "tile", str(cfg))[0] == 0
    assert re.search(r"shapes\.gpkg: repaired 1 invalid polygon\(s\) with make_valid: 1", caplog.text)
    c = load_config(cfg)
    shares = read_table(workspace(c).shares, "tile")
    km2 = shares.groupby("region")["area_m2"].sum() / 1e6
    # a bow-tie is two triangles of a quarter of the square each; the pair two 1 km squares (UTM, ~0.1 % scale)
    assert km2[0] == pytest.approx(dx * dy / 2 / 1e6, rel=2e-3)
    assert km2[1] == pytest.approx(2.0, rel=2e-3)


# ------------------------------------------------------------------------------------ tiling, k, config

def test_tile_smaller_than_a_pixel(tmp_path, monkeypatch, capsys) -> None:
    expect_error(tmp_path, monkeypatch, capsys, bad(tmp_path, tiling={"tile_size": "10m"}),
                 r"tiling\.tile_size: 10m is smaller than a pixel of \S*L7_ETMs\.tif \(28\.5 x 28\.5 m\)")


def test_tile_larger_than_the_raster_in_pixels(tmp_path, monkeypatch, capsys) -> None:
    expect_error(tmp_path, monkeypatch, capsys, bad(tmp_path, tiling={"tile_size": "350px"}),
                 r"tiling\.tile_size: 350px \(350 x 350 px\) is larger than \S*L7_ETMs\.tif \(349 x 352 px\)")


def test_k_below_two(tmp_path, monkeypatch, capsys) -> None:
    expect_error(tmp_path, monkeypatch, capsys, bad(tmp_path, clustering={"k": 1}),
                 r"bad\.yaml: invalid config: clustering\.k: Input should be greater than or equal to 2")


def test_k_above_the_tile_count_in_validate(tmp_path, monkeypatch, capsys) -> None:
    expect_error(tmp_path, monkeypatch, capsys, bad(tmp_path, tiling={"tile_size": "100px"}, clustering={"k": 20}),
                 r"clustering\.k: k=20 exceeds the number of tiles \(16\)", command="validate")


def test_wrong_type(tmp_path, monkeypatch, capsys) -> None:
    expect_error(tmp_path, monkeypatch, capsys, bad(tmp_path, clustering={"k": "eight"}),
                 r"bad\.yaml: invalid config: clustering\.k: Input should be a valid integer.*\(got 'eight'\)")


@pytest.mark.parametrize("workers", [-2, "many", True])
def test_worker_count(tmp_path, monkeypatch, capsys, workers: object) -> None:
    expect_error(tmp_path, monkeypatch, capsys, bad(tmp_path, embedding={"num_workers": workers}),
                 rf"bad\.yaml: invalid config: embedding\.num_workers: expected 'auto' or a number of "
                 rf"DataLoader workers >= 0, got {re.escape(repr(workers))}$")


def test_stride_larger_than_tile(tmp_path, monkeypatch, capsys) -> None:
    expect_error(tmp_path, monkeypatch, capsys, bad(tmp_path, tiling={"tile_size": "8px", "stride": "16px"}),
                 r"invalid config: tiling: stride must not exceed tile_size")


def test_stride_below_a_pixel_names_the_stride(tmp_path, monkeypatch, capsys) -> None:
    expect_error(tmp_path, monkeypatch, capsys, bad(tmp_path, tiling={"tile_size": "240m", "stride": "10m"}),
                 r"tiling\.stride: 10m is smaller than a pixel of \S*L7_ETMs\.tif")


def test_sample_smaller_than_k(tmp_path, monkeypatch, capsys) -> None:
    expect_error(tmp_path, monkeypatch, capsys, bad(tmp_path, **{**SMALL, "clustering": {"k": 4, "sample_size": 3}}),
                 r"invalid config: clustering\.sample_size: must be at least k \(4\).*got 3")


def test_duplicate_key_in_the_config(tmp_path, monkeypatch, capsys) -> None:
    cfg = bad(tmp_path, **SMALL)
    cfg.write_text(cfg.read_text() + "clustering:\n  k: 5\n")
    expect_error(tmp_path, monkeypatch, capsys, cfg,
                 r"bad\.yaml: malformed YAML at line \d+, column 1: duplicate key 'clustering' \(first at line \d+\)")


LABELS = "clusters:\n  0: {name: water}\n  1: {name: forest}\n"


@pytest.mark.parametrize(("content", "pattern"), [
    (LABELS + "  0: {name: town}\n", r"bad\.labels\.yaml: malformed YAML at line 4, column 3: duplicate key 0 "
                                     r"\(first at line 2\)"),
    (LABELS.replace("forest", "for\u00eat").encode("latin-1"), r"bad\.labels\.yaml: not UTF-8 text \(byte \d+\)"),
    (None, r"labels: \S*bad\.labels\.yaml is a folder; expected the labels YAML file"),
])
def test_unusable_labels_file(tmp_path, monkeypatch, capsys, content: str | bytes | None, pattern: str) -> None:
    labels = tmp_path / "bad.labels.yaml"
    if content is None:
        labels.mkdir()
        (labels / "keep.txt").write_text("a folder where the labels file should be\n")
    else:
        labels.write_bytes(content.encode() if isinstance(content, str) else content)
    expect_error(tmp_path, monkeypatch, capsys, bad(tmp_path, **SMALL, labels=str(labels)), pattern)


def test_config_is_a_list(tmp_path, monkeypatch, capsys) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("- rasters\n- regions\n")
    expect_error(tmp_path, monkeypatch, capsys, cfg, r"bad\.yaml: expected a mapping of config keys, got list")


def test_config_file_missing(tmp_path, monkeypatch, capsys) -> None:
    expect_error(tmp_path, monkeypatch, capsys, tmp_path / "bad.yaml", r"bad\.yaml: config file not found")


@pytest.mark.parametrize(("crs", "kind"), [("EPSG:4978", "Geocentric CRS"), ("EPSG:4979", "Geographic 3D CRS"),
                                           ("EPSG:4326+5773", "Compound CRS"), ("EPSG:5773", "Vertical CRS")])
def test_output_crs_that_cannot_hold_a_map(tmp_path, monkeypatch, capsys, crs, kind) -> None:
    """Geocentric (x, y, z from the earth's centre), 3D or vertical CRSs were accepted as output.crs."""
    expect_error(tmp_path, monkeypatch, capsys, bad(tmp_path, output={"crs": crs}),
                 rf"output\.crs: '{re.escape(crs)}' is not a 2D geographic or projected CRS \({kind}\)",
                 command="validate")


def test_unknown_output_crs(tmp_path, monkeypatch, capsys) -> None:
    expect_error(tmp_path, monkeypatch, capsys, bad(tmp_path, output={"crs": "EPSG:999999"}),
                 r"output\.crs: cannot understand CRS 'EPSG:999999'")


# ------------------------------------------------------------------------------------ outputs

@pytest.mark.parametrize("key", ["dir", "work_dir"])
def test_output_folder_not_writable(tmp_path, monkeypatch, capsys, key) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file where a folder should be\n")
    cfg = bad(tmp_path)
    text = cfg.read_text().replace(str(tmp_path / ("outputs" if key == "dir" else "work") / "bad"),
                                   str(blocker / "out"))
    cfg.write_text(text)
    expect_error(tmp_path, monkeypatch, capsys, cfg,
                 rf"output\.{key}: cannot create folder \S*blocker/out: \S*blocker is not a folder")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real small run (36 tiles of Olinda, k=2) whose outputs the next tests try to damage."""
    scene("olinda_brazil", "L7_ETMs.tif")
    tmp = tmp_path_factory.mktemp("small")
    cfg = write_pipeline(tmp, "small", "olinda", **SMALL)
    run(load_config(cfg))
    return cfg


def test_disk_full_while_writing_keeps_earlier_outputs(small_run, monkeypatch, capsys) -> None:
    tmp = small_run.parent
    out = tmp / "outputs" / "small"
    before = snapshot(tmp)
    assert {"outputs/small/small.gpkg", "outputs/small/map.png"} <= set(before)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, hard))  # files may not grow past 64 KiB
    try:
        code, _, stderr = run_cli(monkeypatch, capsys, "export", str(small_run))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    err = said(stderr)
    assert code == 2
    assert len(err) == 1 and re.search(
        r"^error: \S*small\.gpkg: cannot write \((disk full|file size limit of 65536 bytes reached)\): ", err[0]), err
    assert snapshot(tmp) == before  # earlier outputs intact, no temporary file left
    assert not [p for p in out.iterdir() if p.name.startswith(".settlements-tmp-")]


# validate finds what a run would: weights are loaded into the backbone there too (no forward pass)
COMMANDS = pytest.mark.parametrize("command", ["run", "validate"])


@COMMANDS
def test_corrupt_weights_file(tmp_path, monkeypatch, capsys, command) -> None:
    weights = tmp_path / "mobilenet_v2.pth"
    weights.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    expect_error(tmp_path, monkeypatch, capsys, bad(tmp_path, embedding={"weights": str(weights)}),
                 r"mobilenet_v2\.pth: corrupt or unreadable weights file", command=command)


@COMMANDS
def test_weights_of_another_architecture(tmp_path, monkeypatch, capsys, command) -> None:
    weights = tmp_path / "squeezenet.pth"
    import torchvision

    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), weights)  # a real, smaller net
    expect_error(tmp_path, monkeypatch, capsys, bad(tmp_path, embedding={"weights": str(weights)}),
                 r"squeezenet\.pth: weights do not fit mobilenet_v2 \(size mismatch for classifier\.1\.weight",
                 command=command)


@COMMANDS
def test_weights_file_missing(tmp_path, monkeypatch, capsys, command) -> None:
    expect_error(tmp_path, monkeypatch, capsys, bad(tmp_path, embedding={"weights": str(tmp_path / "w.pth")}),
                 r"w\.pth: weights file not found", command=command)


@COMMANDS
def test_layer_the_backbone_lacks(tmp_path, monkeypatch, capsys, command) -> None:
    expect_error(tmp_path, monkeypatch, capsys, bad(tmp_path, embedding={"layer": "features.99"}),
                 r"embedding\.layer: mobilenet_v2 has no layer 'features\.99' \(e\.g\. features\.0", command=command)


# ------------------------------------------------------------------------------------ validate

def test_validate_reports_inputs_and_tile_counts(tmp_path, monkeypatch, capsys) -> None:
    cfg = write_pipeline(tmp_path, "check", "olinda", tiling={"tile_size": "32px"})
    before = snapshot(tmp_path)
    code, out, _ = run_cli(monkeypatch, capsys, "validate", str(cfg))
    assert code == 0
    assert f"{cfg}: ok" in out
    assert "regions: 470 (" in out
    # 349 x 352 px in 32 px tiles: 11 x 11 cells
    assert re.search(r"L7_ETMs\.tif: EPSG:31985, 349 x 352 px, bands \[3, 2, 1\] uint8, tile 32 x 32 px "
                     r"\(911\.9 x 911\.9 m on the ground\) -> 121 tiles; meets 470 region\(s\)", out), out
    assert snapshot(tmp_path) == before and not (tmp_path / "work").exists()
    n = stage_tile(load_config(cfg))["tiles"]  # the tile stage agrees with the count
    assert n == 121


@COMMANDS
def test_weights_of_another_backbone_family(tmp_path, monkeypatch, capsys, command) -> None:
    from settlements.embedding.backbones import resolve_weights
    from settlements.errors import WeightsError

    try:
        mobilenet = resolve_weights("mobilenet_v2", allow_download=False).path
    except WeightsError:
        pytest.skip("no offline MobileNetV2 weights")
    cfg = bad(tmp_path, embedding={"backbone": "resnet18", "weights": str(mobilenet)})
    expect_error(tmp_path, monkeypatch, capsys, cfg,
                 r"mobilenet_v2-b0353104\.pth: weights do not fit resnet18 \(\d+ missing, \d+ unexpected keys, "
                 r"e\.g\. conv1\.weight", command=command)


def test_installed_command_prints_one_line_for_a_truncated_raster(tmp_path, olinda_tif) -> None:
    """As a user sees it: no GDAL 'ERROR 1:' chatter or Python warnings around the one error line."""
    import subprocess

    tif = tiled_copy(olinda_tif, tmp_path / "cut.tif")
    tif.write_bytes(tif.read_bytes()[: tif.stat().st_size // 2])
    cfg = raster_cfg(tmp_path, tif, [1, 2, 3])
    before = snapshot(tmp_path)
    exe = Path(sys.executable).with_name("settlements")
    env = {k: v for k, v in __import__("os").environ.items() if k != "CPL_LOG"}
    proc = subprocess.run([str(exe), "run", str(cfg)], capture_output=True, text=True, timeout=HANG_GUARD, env=env)
    assert proc.returncode == 2
    lines = said(proc.stderr)
    assert len(lines) == 1 and re.match(rf"error: {re.escape(str(tif))}: cannot (open raster|read pixels)", lines[0]), \
        proc.stderr
    assert snapshot(tmp_path) == before


def test_validate_reads_the_scaling_sample(tmp_path, monkeypatch, capsys, olinda_tif) -> None:
    """validate runs no CNN but reads what the tile stage reads, so a damaged block shows there too."""
    tif = tiled_copy(olinda_tif, tmp_path / "flipped.tif")
    corrupt_block(tif, 0, 5)
    expect_error(tmp_path, monkeypatch, capsys, raster_cfg(tmp_path, tif, [1, 2, 3]),
                 r"flipped\.tif: cannot read pixels \(truncated or corrupt file\?\)", command="validate")
    assert not (tmp_path / "work").exists()


def test_fuzz_script_runs_clean(capsys) -> None:
    """A short run of benchmarks/fuzz.py: every input (configs, rasters, labels files, edited clusters
    tables) ends as success or a one-line SettlementsError."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz.py"
    spec = importlib.util.spec_from_file_location("settlements_fuzz", path)
    fuzz = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(fuzz)  # type: ignore[union-attr]
    assert fuzz.main(["--examples", "25", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    for target in ("config", "rasters", "labels", "clusters"):
        assert f"{target}: 25 inputs" in out
    assert "total: 100 inputs tried" in out


# ------------------------------------------------------------------ values that once failed late

LOCAL_CS = 'LOCAL_CS["arbitrary",UNIT["metre",1]]'


@COMMANDS
def test_raster_in_an_engineering_crs(tmp_path, monkeypatch, capsys, olinda_tif, command) -> None:
    """A local CRS (scanned maps, CAD) places no pixel on the Earth: one line, not PROJ's traceback."""
    tif = copy_raster(olinda_tif, tmp_path / "local.tif", crs=LOCAL_CS)
    expect_error(tmp_path, monkeypatch, capsys, raster_cfg(tmp_path, tif, [1, 2, 3]),
                 r"local\.tif: its CRS \('arbitrary', Engineering CRS\) does not place it on the Earth; assign a "
                 r"geographic or projected CRS", command=command)


@COMMANDS
@pytest.mark.parametrize(("section", "key"), [("clustering", "seed"), ("training", "top_model.seed"),
                                              ("training", "evaluation.seed"), ("training", "finetune.seed")])
def test_a_negative_seed_is_refused_before_any_work(tmp_path, monkeypatch, capsys, command, section, key) -> None:
    """numpy and scikit-learn take seeds 0 to 2**32 - 1: the schema says so, so `validate` sees it."""
    if section == "clustering":
        cfg = bad(tmp_path, clustering={"seed": -1})
    else:
        part, field = key.split(".")
        cfg = bad(tmp_path, training={"labels": {"source": "clusters"}, part: {field: -1}})
    expect_error(tmp_path, monkeypatch, capsys, cfg,
                 rf"invalid config: {section}\.{re.escape(key)}: Input should be greater than or equal to 0",
                 command=command)


@COMMANDS
def test_regions_in_an_engineering_crs(tmp_path, monkeypatch, capsys, command) -> None:
    tracts = pyogrio.read_dataframe(scene("olinda_brazil", "olinda1.shp"))
    pyogrio.write_dataframe(tracts.set_crs(LOCAL_CS, allow_override=True), tmp_path / "local.gpkg")
    expect_error(tmp_path, monkeypatch, capsys, regions_cfg(tmp_path, path=str(tmp_path / "local.gpkg")),
                 r"local\.gpkg: its CRS \('arbitrary', Engineering CRS\) does not place it on the Earth; reproject",
                 command=command)
