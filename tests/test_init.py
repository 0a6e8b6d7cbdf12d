"""``settlements init``: a pipeline written from real rasters in three CRS families (UTM, lon/lat, polar
stereographic made here with rasterio.warp), checked and written once; and a run of such a pipeline without
regions, each raster's extent one region, whose areas, counts and tile sizes are checked on the ground."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyogrio
import pytest
from pyproj import Geod

from settlements.config import load_config
from settlements.rasters import inspect_raster
from settlements.tiling import length_to_pixels
from settlements.validate import metres

from .conftest import run_cli, said, scene
from .test_geometry import footprint, geodesic_km2, warped

GEOD = Geod(ellps="WGS84")

#: case -> (scene, CRS to warp into or None, bands, scaling method, words the bands' note holds)
CASES = {
    "utm": ("olinda_brazil/L7_ETMs.tif", None, [1, 2, 3], "percentile", "not named red, green and blue"),
    "lonlat_alpha": ("swellendam_za/3420B_2010_328_RGB_LATLNG.tif", None, [1, 2, 3], "percentile",
                     "band 4 is alpha"),
    "lonlat_drone": ("kampala_oam/kampala_z19_mosaic_DERIVED.tif", None, [1, 2, 3], "dtype", "red, green, blue as"),
    # warped with a black collar (no nodata): the pixels span 0..255, so 8-bit values are kept as they are
    "polar": ("amsterdam_s2/OudeKerk.tif", "EPSG:3413", [1, 2, 3], "dtype", "red, green, blue as"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_init_writes_a_checked_pipeline_from_the_raster(tmp_path, monkeypatch, capsys, case) -> None:
    rel, crs, bands, method, note = CASES[case]
    path = scene(*rel.split("/"))
    if crs is not None:
        path = warped(tmp_path, path, crs, case)
    target = tmp_path / "pipelines" / f"{case}.yaml"
    code, out, err = run_cli(monkeypatch, capsys, "init", str(path), "-o", str(target))
    assert code == 0, err
    cfg = load_config(target)  # what a run reads
    spec = cfg.rasters[0]
    assert spec.path == path.resolve() and spec.bands == bands and spec.scaling.method == method
    assert cfg.regions == [] and cfg.name == case
    text = target.read_text()
    info = inspect_raster(path, spec)
    assert f"({info.crs.to_string()})" in text and note in text
    assert f"px of {info.pixel_w_m:.3g} x {info.pixel_h_m:.3g} m on the ground" in text
    # a ground length that suits the pixels: 8 to 96 of them, and validate's true metres printed
    size = cfg.tiling.tile_size
    assert size.unit == "m"
    tw, th = length_to_pixels(size.value, "m", info.pixel_w_m, info.pixel_h_m)
    assert 8 <= min(tw, th) and max(tw, th) <= 96, (tw, th)
    assert f"tile {tw} x {th} px ({metres(tw * info.pixel_w_m)} x {metres(th * info.pixel_h_m)} m on the ground)" \
        in out
    assert out.splitlines()[0] == f"wrote {target}" and "regions: 1 (" in out
    assert not [p for p in target.parent.iterdir() if p != target]  # nothing else left beside it


def test_init_replaces_a_file_only_when_asked_and_writes_nothing_for_bad_input(tmp_path, monkeypatch,
                                                                                  capsys) -> None:
    raster = scene("olinda_brazil", "L7_ETMs.tif")
    target = tmp_path / "mine.yaml"
    target.write_text("# my own pipeline\n")
    code, _, err = run_cli(monkeypatch, capsys, "init", str(raster), "-o", str(target))
    assert code == 2 and said(err) == [f"error: {target}: exists; use --force to replace it"]
    assert target.read_text() == "# my own pipeline\n"
    code, _, err = run_cli(monkeypatch, capsys, "init", str(raster), "-o", str(target), "--force")
    assert code == 0 and load_config(target).rasters[0].path == raster.resolve()
    # not a raster, a region file that is none: one error line, no file
    (tmp_path / "notes.tif").write_text("not a raster")
    for args in (["init", str(tmp_path / "notes.tif")],
                 ["init", str(raster), "--regions", str(tmp_path / "notes.tif")]):
        other = tmp_path / "other.yaml"
        code, _, err = run_cli(monkeypatch, capsys, *args, "-o", str(other))
        assert code == 2 and len(said(err)) == 1 and said(err)[0].startswith("error: ") and "notes.tif" in err
        assert not other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.yaml", "notes.tif"]


def test_init_with_a_region_file_names_its_fields(tmp_path, monkeypatch, capsys) -> None:
    raster, tracts = scene("olinda_brazil", "L7_ETMs.tif"), scene("olinda_brazil", "olinda1.shp")
    target = tmp_path / "olinda.yaml"
    code, out, err = run_cli(monkeypatch, capsys, "init", str(raster), "--regions", str(tracts), "-o", str(target))
    assert code == 0, err
    cfg = load_config(target)
    assert [r.path for r in cfg.regions] == [tracts.resolve()]
    assert cfg.regions[0].name_field == "NM_BAIR" and "regions: 470 (" in out
    assert "# 470 region(s) in olinda1.shp; fields: " in target.read_text()


def cell_sides_m(gpkg: Path) -> np.ndarray:
    """Geodesic width and height (m) of every cell of the tiles layer (lon/lat polygons)."""
    tiles = pyogrio.read_dataframe(gpkg, layer="tiles")
    b = tiles.geometry.bounds
    lat = (b["miny"] + b["maxy"]) / 2
    _, _, width = GEOD.inv(b["minx"], lat, b["maxx"], lat)
    _, _, height = GEOD.inv(b["minx"], b["miny"], b["minx"], b["maxy"])
    return np.column_stack([width, height])


@pytest.mark.slow
def test_a_pipeline_without_regions_maps_each_raster_as_a_region(tmp_path, monkeypatch, capsys) -> None:
    """``init`` on the six Kampala drone chips (a glob), then ``run`` as written (smaller CNN input for speed):
    six regions, each its chip's extent, whose areas are the chips' geodesic areas; every tile in its own
    chip's region; label areas add up; and the cells written are as large as ``validate`` said."""
    folder = scene("kampala_oam")
    chips = sorted(folder.glob("OAM-*-19.tif"))
    target = tmp_path / "pipelines" / "chips.yaml"
    code, out, err = run_cli(monkeypatch, capsys, "init", str(folder / "OAM-*-19.tif"), "-o", str(target))
    assert code == 0, err
    said_m = re.search(r"tile \d+ x \d+ px \(([\d.,]+) x ([\d.,]+) m on the ground\)", out)
    assert said_m, out
    with target.open("a") as f:
        f.write("embedding: {input_size: 32, num_workers: 0}\n")
    code, out, err = run_cli(monkeypatch, capsys, "run", str(target))
    assert code == 0, err
    gpkg = tmp_path / "outputs" / "chips" / "chips.gpkg"
    regions = pyogrio.read_dataframe(gpkg, layer="regions").set_index("region_id")
    assert sorted(regions.index) == [c.name for c in chips]
    for chip in chips:
        row = regions.loc[chip.name]
        truth = geodesic_km2(footprint(chip))
        assert row["area_km2"] == pytest.approx(truth, rel=1e-4)
        assert row["imaged_km2"] == pytest.approx(truth, rel=1e-4)  # every pixel is imagery
        assert row["valid_fraction"] == pytest.approx(1.0, abs=1e-6)
        km2 = row[[c for c in regions.columns if c.startswith("km2_") and not re.fullmatch(r"km2_c\d+", c)]]
        assert km2.sum() == pytest.approx(row["mapped_km2"], rel=1e-9)
        assert row["n_tiles"] == 64
    tiles = pyogrio.read_dataframe(gpkg, layer="tiles")
    assert (tiles["region_id"] == tiles["raster"]).all()
    # validate's metres are the metres of the cells written (32 px of 0.3 m: 9.55 m, not 9.6)
    sides = cell_sides_m(gpkg)
    assert np.median(sides[:, 0]) == pytest.approx(float(said_m[1].replace(",", "")), rel=1e-3)
    assert np.median(sides[:, 1]) == pytest.approx(float(said_m[2].replace(",", "")), rel=1e-3)
