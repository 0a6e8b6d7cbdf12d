"""The cluster map: a Cloud-Optimised GeoTIFF of label codes, one pixel per tile cell.

Each kept tile's stride cell is painted with its label's palette code (1..n); pixels with no
valid tile are 0, the nodata value. The file carries the palette as a GDAL colour table, a raster
attribute table and category names in its ``.aux.xml`` (GDAL's sidecar for them), and a ``.qml``
sidecar so QGIS opens it paletted with the class names. Overviews use mode resampling, so a
zoomed-out view shows the commonest class, never an average of codes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import pandas as pd
import rasterio
from affine import Affine
from pyproj import CRS, Transformer
from rasterio.io import MemoryFile
from rio_cogeo.cogeo import cog_translate
from rio_cogeo.profiles import cog_profiles

from ..errors import OutputError
from ..palette import NO_DATA_CODE, Palette, hex_to_rgb
from ..store import atomic_path, write_atomic
from .styles import raster_qml

log = logging.getLogger(__name__)

#: GDAL raster attribute table field types and usages (gdal.h GDALRATFieldType / GDALRATFieldUsage).
_GFT_INTEGER, _GFT_STRING = 0, 2
_GFU_GENERIC, _GFU_PIXELCOUNT, _GFU_NAME, _GFU_MINMAX, _GFU_RED, _GFU_GREEN, _GFU_BLUE = 0, 1, 2, 5, 6, 7, 8


@dataclass(frozen=True)
class Cells:
    """Stride cells of one raster: bounds (n, 4: minx, miny, maxx, maxy) in ``crs`` and label codes."""

    crs: CRS
    bounds: np.ndarray
    codes: np.ndarray


@dataclass(frozen=True)
class CodeGrid:
    """A label-code array on a north-up grid."""

    codes: np.ndarray
    transform: Affine
    crs: CRS


def tile_cells(tiles: pd.DataFrame, crss: list[CRS], palette: Palette) -> list[Cells]:
    """Kept tiles (columns raster, kept, label, minx, miny, maxx, maxy) as coded cells per raster."""
    kept = tiles[tiles["kept"].astype(bool)]
    parts = []
    for r, crs in enumerate(crss):
        k = kept[kept["raster"] == r]
        codes = np.array([palette.code(lb) for lb in k["label"]], dtype=np.uint8)
        parts.append(Cells(crs, k[["minx", "miny", "maxx", "maxy"]].to_numpy(np.float64), codes))
    return parts


def _in_crs(cells: Cells, crs: CRS) -> np.ndarray:
    """Cell bounds in ``crs`` (the envelope of each reprojected cell when the CRS differs)."""
    if cells.crs == crs:
        return np.asarray(cells.bounds, dtype=np.float64)
    tr = Transformer.from_crs(cells.crs, crs, always_xy=True)
    b = np.asarray(cells.bounds, dtype=np.float64)
    xs = np.stack([b[:, 0], b[:, 2], b[:, 2], b[:, 0]], axis=1)
    ys = np.stack([b[:, 1], b[:, 1], b[:, 3], b[:, 3]], axis=1)
    x, y = tr.transform(xs, ys)
    return np.stack([x.min(1), y.min(1), x.max(1), y.max(1)], axis=1)


def code_grid(parts: list[Cells]) -> CodeGrid:
    """Paint every cell onto one grid in the first raster's CRS at the finest cell size.

    For one raster (the usual case) the grid is its stride-cell grid, one pixel per cell exactly;
    edge cells narrower than a stride still get their pixel. Where rasters overlap, the one listed
    first wins, as in the histograms: parts are painted last to first.
    """
    crs = parts[0].crs
    parts = [p for p in parts if len(p.codes)]
    boxes = [_in_crs(p, crs) for p in parts]
    if not boxes:
        raise OutputError("cluster map: no kept tile to draw")
    res_x = min(float((b[:, 2] - b[:, 0]).max()) for b in boxes)
    res_y = min(float((b[:, 3] - b[:, 1]).max()) for b in boxes)
    allb = np.concatenate(boxes)
    x0, y0 = float(allb[:, 0].min()), float(allb[:, 3].max())
    c0 = np.rint((allb[:, 0] - x0) / res_x).astype(np.int64)
    c1 = np.maximum(c0 + 1, np.rint((allb[:, 2] - x0) / res_x).astype(np.int64))
    r0 = np.rint((y0 - allb[:, 3]) / res_y).astype(np.int64)
    r1 = np.maximum(r0 + 1, np.rint((y0 - allb[:, 1]) / res_y).astype(np.int64))
    grid = np.full((int(r1.max()), int(c1.max())), NO_DATA_CODE, dtype=np.uint8)
    starts = np.cumsum([0, *(len(b) for b in boxes)])
    for p in reversed(range(len(parts))):
        sl = slice(int(starts[p]), int(starts[p + 1]))
        codes = parts[p].codes.astype(np.uint8)
        single = (c1[sl] - c0[sl] == 1) & (r1[sl] - r0[sl] == 1)
        grid[r0[sl][single], c0[sl][single]] = codes[single]
        for i in np.flatnonzero(~single):  # cells of a coarser raster span several pixels
            grid[r0[sl][i]:r1[sl][i], c0[sl][i]:c1[sl][i]] = codes[i]
    return CodeGrid(grid, Affine(res_x, 0, x0, 0, -res_y, y0), crs)


def _block_size(width: int, height: int) -> int:
    """The largest COG block (16..512) that the shorter side still spans twice (room for an overview)."""
    size = 16
    while size < 512 and min(width, height) >= 4 * size:
        size *= 2
    return size


def _overview_levels(width: int, height: int, block: int) -> int:
    """Halvings until the longer side fits one block: every zoom level gets an overview, at least one."""
    levels, side = 0, max(width, height)
    while side > block or levels == 0 and side > 1:
        side, levels = (side + 1) // 2, levels + 1
    return levels


def aux_xml(palette: Palette, counts: dict[int, int]) -> str:
    """GDAL PAM sidecar: category names and a thematic raster attribute table (value, name, count, RGB)."""
    names = palette.class_names()
    top = max(names)
    cats = "\n      ".join(f"<Category>{escape(names.get(v, ''))}</Category>" for v in range(top + 1))
    fields = [("Value", _GFT_INTEGER, _GFU_MINMAX), ("Class", _GFT_STRING, _GFU_NAME),
              ("Count", _GFT_INTEGER, _GFU_PIXELCOUNT), ("Red", _GFT_INTEGER, _GFU_RED),
              ("Green", _GFT_INTEGER, _GFU_GREEN), ("Blue", _GFT_INTEGER, _GFU_BLUE),
              ("Colour", _GFT_STRING, _GFU_GENERIC)]
    defs = "\n      ".join(f'<FieldDefn index="{i}"><Name>{n}</Name><Type>{t}</Type><Usage>{u}</Usage></FieldDefn>'
                           for i, (n, t, u) in enumerate(fields))
    rows = []
    for i, lb in enumerate(palette.labels):
        code, colour = palette.code(lb), palette.colour(lb)
        r, g, b = hex_to_rgb(colour)
        values = [code, escape(lb), counts.get(code, 0), r, g, b, colour]
        rows.append(f'<Row index="{i}">' + "".join(f"<F>{v}</F>" for v in values) + "</Row>")
    body = "\n      ".join(rows)
    return f"""<PAMDataset>
  <PAMRasterBand band="1">
    <CategoryNames>
      {cats}
    </CategoryNames>
    <GDALRasterAttributeTable>
      {defs}
      {body}
    </GDALRasterAttributeTable>
  </PAMRasterBand>
</PAMDataset>
"""


class _ModeOverviewsOnPalette(logging.Filter):
    """GDAL warns when building overviews of palette indexes; with mode resampling (the commonest index)
    that is exactly what is wanted, so the note is dropped rather than shown to the user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "overviews on palette index" not in record.getMessage()


def write_cluster_map(path: Path, grid: CodeGrid, palette: Palette) -> Path:
    """Write the COG (atomically) with its colour table, plus the ``.aux.xml`` and ``.qml`` sidecars."""
    h, w = grid.codes.shape
    bs = _block_size(w, h)
    profile = {"driver": "GTiff", "width": w, "height": h, "count": 1, "dtype": "uint8", "nodata": NO_DATA_CODE,
               "crs": rasterio.crs.CRS.from_wkt(grid.crs.to_wkt()), "transform": grid.transform}
    dst = cog_profiles.get("deflate")
    dst.update({"blockxsize": bs, "blockysize": bs})
    values, counts = np.unique(grid.codes, return_counts=True)
    write_atomic(path.with_suffix(".qml"), lambda p: p.write_text(raster_qml(palette), encoding="utf-8"))
    aux = path.with_name(path.name + ".aux.xml")
    write_atomic(aux, lambda p: p.write_text(aux_xml(palette, dict(zip(values.tolist(), counts.tolist(),
                                                                        strict=True))), encoding="utf-8"))
    with MemoryFile() as mem:
        with mem.open(**profile) as src:
            src.write(grid.codes, 1)
            src.write_colormap(1, palette.colour_table())
            src.set_band_description(1, "label code (see the raster attribute table)")
        gdal_log, note = logging.getLogger("rasterio._env"), _ModeOverviewsOnPalette()
        gdal_log.addFilter(note)
        try:
            with mem.open() as src, atomic_path(path, suffix=".tif") as tmp:
                cog_translate(src, tmp, dst, nodata=NO_DATA_CODE, overview_resampling="mode", resampling="nearest",
                              overview_level=_overview_levels(w, h, bs),
                              in_memory=True, quiet=True,
                              additional_cog_metadata={"settlements": "label codes; 0 = no data"})
        finally:
            gdal_log.removeFilter(note)
    log.info("cluster map %s: %d x %d cells, block %d", path, w, h, bs)
    return path
