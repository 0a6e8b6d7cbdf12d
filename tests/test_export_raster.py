"""The cluster-map COG and GDAL's own tools on every output of real runs."""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pyogrio
import pytest
import rasterio
from pyproj import CRS
from rio_cogeo.cogeo import cog_validate

from settlements.export.raster import Cells, code_grid
from settlements.palette import NO_DATA_CODE

from .conftest import HANG_GUARD, Ran

SCENES = ["olinda", "swellendam"]


def test_code_grid_paints_one_pixel_per_cell_and_coarser_cells_over_several() -> None:
    crs = CRS.from_epsg(32633)
    fine = Cells(crs, np.array([[0, 90, 10, 100], [0, 80, 10, 90], [10, 90, 20, 100]], float),
                 np.array([1, 3, 2], np.uint8))
    coarse = Cells(crs, np.array([[20, 80, 40, 100]], float), np.array([4], np.uint8))
    grid = code_grid([fine, coarse])
    assert grid.transform.a == 10 and grid.transform.e == -10 and (grid.transform.c, grid.transform.f) == (0, 100)
    np.testing.assert_array_equal(grid.codes, [[1, 2, 4, 4], [3, NO_DATA_CODE, 4, 4]])


def test_code_grid_overlapping_rasters_show_the_first_listed() -> None:
    """As in the histograms, the raster listed first holds the ground where rasters overlap, whether
    its cells are finer or coarser than the later raster's."""
    crs = CRS.from_epsg(32633)
    fine = Cells(crs, np.array([[0, 90, 10, 100], [10, 90, 20, 100], [20, 90, 30, 100]], float),
                 np.array([1, 2, 3], np.uint8))
    coarse = Cells(crs, np.array([[10, 80, 30, 100]], float), np.array([4], np.uint8))
    np.testing.assert_array_equal(code_grid([fine, coarse]).codes, [[1, 2, 3], [NO_DATA_CODE, 4, 4]])
    np.testing.assert_array_equal(code_grid([coarse, fine]).codes, [[1, 4, 4], [NO_DATA_CODE, 4, 4]])


def test_narrow_edge_cells_end_at_the_raster_edge() -> None:
    """A raster 16 units wide in 10-unit cells: the edge cell is 6 wide. It was drawn 10 wide, 4 units
    past the imagery; now the grid is cut into 2-unit pixels and the map ends at 16."""
    crs = CRS.from_epsg(32633)
    fine = Cells(crs, np.array([[0, 90, 10, 100], [10, 90, 16, 100], [0, 80, 10, 90]], float),
                 np.array([1, 2, 3], np.uint8))
    grid = code_grid([fine])
    assert (grid.transform.a, grid.transform.e) == (2, -10)
    assert grid.codes.shape[1] * grid.transform.a == 16
    np.testing.assert_array_equal(grid.codes, [[1] * 5 + [2] * 3, [3] * 5 + [NO_DATA_CODE] * 3])
    # too many pixels to draw the edge exactly: rounded inwards, never past the imagery
    coarse = code_grid([fine], max_pixels=4)
    assert coarse.codes.shape[1] * coarse.transform.a <= 16


@pytest.fixture(params=SCENES)
def ran(request: pytest.FixtureRequest) -> Ran:
    return request.getfixturevalue(request.param)


@pytest.mark.slow
def test_cluster_map_is_a_valid_cog_with_palette_rat_and_mode_overviews(ran: Ran) -> None:
    path = ran.report.outputs["cluster_map"]
    valid, errors, _warnings = cog_validate(str(path))
    assert valid and errors == []
    clusters = pyogrio.read_dataframe(ran.gpkg, layer="clusters")
    palette = dict(zip(clusters["label"], clusters["colour"], strict=True))
    with rasterio.open(path) as src:
        assert src.dtypes[0] == "uint8" and src.nodata == NO_DATA_CODE
        assert src.overviews(1), "no overviews"
        assert src.tags()["OVERVIEW_RESAMPLING"] == "MODE"
        cmap = src.colormap(1)
        codes = src.read(1)
        transform = src.transform
    # every kept tile's cell, and nothing else, is painted: pixel area times pixels is the kept cells' area
    tiles = pd.read_parquet(ran.work / "tiles.parquet").merge(pd.read_parquet(ran.work / "embedded.parquet"),
                                                              on="tile_id")
    kept = tiles[tiles["kept"]]
    cells = ((kept["maxx"] - kept["minx"]) * (kept["maxy"] - kept["miny"])).sum()
    assert int((codes > 0).sum()) * abs(transform.a * transform.e) == pytest.approx(cells, rel=1e-9)
    rat = ET.parse(f"{path}.aux.xml").getroot().find(".//GDALRasterAttributeTable")
    rows = [[f.text for f in row.findall("F")] for row in rat.findall("Row")]
    assert [r[1] for r in rows] == list(palette)
    counts = {int(r[0]): int(r[2]) for r in rows}
    for value, name, _count, red, green, blue, colour in rows:
        assert palette[name] == colour
        assert cmap[int(value)][:3] == (int(red), int(green), int(blue)) == tuple(
            int(colour[i:i + 2], 16) for i in (1, 3, 5))
        assert counts[int(value)] == int((codes == int(value)).sum())
    assert cmap[NO_DATA_CODE][3] == 0  # no data is transparent


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("ogrinfo") is None or shutil.which("gdalinfo") is None,
                    reason="gdal-bin (ogrinfo, gdalinfo) is not installed")
def test_gdal_tools_read_every_output_without_warnings(ran: Ran) -> None:
    out = ran.gpkg.parent
    proc = subprocess.run(["ogrinfo", "-al", "-so", str(ran.gpkg)], capture_output=True, text=True, timeout=HANG_GUARD)
    assert proc.returncode == 0 and "Warning" not in proc.stderr and "ERROR" not in proc.stderr, proc.stderr
    for layer in ("tiles", "regions", "clusters", "histogram", "runs"):
        assert f"Layer name: {layer}" in proc.stdout
    rasters = [ran.report.outputs["cluster_map"], *sorted(Path(out).glob("*.png"))]
    assert len(rasters) == 4
    for path in rasters:
        proc = subprocess.run(["gdalinfo", str(path)], capture_output=True, text=True, timeout=HANG_GUARD)
        assert proc.returncode == 0 and "Warning" not in proc.stderr and "ERROR" not in proc.stderr, (path,
                                                                                                     proc.stderr)
    info = subprocess.run(["gdalinfo", str(ran.report.outputs["cluster_map"])], capture_output=True, text=True,
                          timeout=HANG_GUARD).stdout
    assert "LAYOUT=COG" in info and "ColorInterp=Palette" in info and "Overviews:" in info
    labels = pyogrio.read_dataframe(ran.gpkg, layer="clusters")["label"]
    assert all(f": {name}" in info for name in labels)  # category names


def test_cluster_map_never_reaches_past_the_imagery(olinda: Ran) -> None:
    """Olinda is 349 px wide in 8 px cells: the last column is 5 px. The map ended 3 px (85 m) past the
    scene's right edge; it now ends at the edge, and is the scene's extent exactly."""
    with rasterio.open(olinda.report.outputs["cluster_map"]) as cog, \
            rasterio.open(olinda.cfg.rasters[0].path) as scene:
        assert scene.width % 8 != 0
        np.testing.assert_allclose(tuple(cog.bounds), tuple(scene.bounds), rtol=0, atol=1e-6)
        codes = cog.read(1)
        assert (codes[:, -1] > 0).any()  # the narrow edge cells are drawn
