"""The cluster map: a Cloud-Optimised GeoTIFF of label codes, one pixel per tile cell.

Each kept tile's stride cell is painted with its label's palette code (1..n); pixels with no
valid tile are 0, the nodata value. One pixel per cell where the raster is a whole number of
strides; else each cell is cut into a few pixels so that the narrower edge cells end at the
raster's edge. The file carries the palette as a GDAL colour table, a raster
attribute table and category names in its ``.aux.xml`` (GDAL's sidecar for them), and a ``.qml``
sidecar so QGIS opens it paletted with the class names. Overviews use mode resampling, so a
zoomed-out view shows the commonest class, never an average of codes.
"""

from __future__ import annotations

import logging
import math
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
from ..palette import NO_DATA_CODE, Legend, hex_to_rgb
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


#: Most pixels a cluster map may have. Edge cells narrower than a stride are drawn at their true width
#: by cutting every cell into m x m pixels; only where that would exceed this are edges rounded (inwards).
MAX_MAP_PIXELS = 1 << 26


def tile_cells(tiles: pd.DataFrame, crss: list[CRS], legend: Legend) -> list[Cells]:
    """Kept tiles (columns raster, kept, label, minx, miny, maxx, maxy) as coded cells per raster."""
    kept = tiles[tiles["kept"].astype(bool)]
    code_of = dict(zip(legend.labels, legend.codes, strict=True))
    parts = []
    for r, crs in enumerate(crss):
        k = kept[kept["raster"] == r]
        codes = k["label"].map(code_of).to_numpy(dtype=np.uint16)
        parts.append(Cells(crs, k[["minx", "miny", "maxx", "maxy"]].to_numpy(np.float64), codes))
    return parts


def _in_crs(bounds: np.ndarray, src: CRS, crs: CRS) -> np.ndarray:
    """Boxes (n, 4) in ``crs`` (the envelope of each reprojected box when the CRS differs)."""
    b = np.asarray(bounds, dtype=np.float64)
    if src == crs:
        return b
    tr = Transformer.from_crs(src, crs, always_xy=True)
    xs = np.stack([b[:, 0], b[:, 2], b[:, 2], b[:, 0]], axis=1)
    ys = np.stack([b[:, 1], b[:, 1], b[:, 3], b[:, 3]], axis=1)
    x, y = tr.transform(xs, ys)
    return np.stack([x.min(1), y.min(1), x.max(1), y.max(1)], axis=1)


def _subdivision(edges: np.ndarray, limit: int) -> int:
    """The fewest pixels per cell (at most ``limit``) that put every edge (in cells) on a pixel boundary."""
    for m in range(1, limit + 1):
        scaled = edges * m
        if np.all(np.abs(scaled - np.rint(scaled)) < 1e-6):
            return m
    return limit


def code_grid(parts: list[Cells], max_pixels: int = MAX_MAP_PIXELS) -> CodeGrid:
    """Paint every cell onto one grid in the first raster's CRS, never past the imagery.

    The grid's cell is the finest full stride cell. A raster whose size is no multiple of the stride
    has narrower cells at its right and bottom edges: the grid is then cut into m x m pixels per cell
    so that those cells end exactly at the raster's edge (no coloured sliver past the imagery). Each
    raster's cells are also kept inside the extent of its cells, in case edges had to be rounded.
    Where rasters overlap, the one listed first wins, as in the histograms: parts are painted last to first.
    """
    crs = parts[0].crs
    drawn = [p for p in parts if len(p.codes)]
    if not drawn:
        raise OutputError("cluster map: no kept tile to draw")
    boxes = [_in_crs(p.bounds, p.crs, crs) for p in drawn]
    res_x = min(float((b[:, 2] - b[:, 0]).max()) for b in boxes)
    res_y = min(float((b[:, 3] - b[:, 1]).max()) for b in boxes)
    allb = np.concatenate(boxes)
    x0, y0 = float(allb[:, 0].min()), float(allb[:, 3].max())
    ex = (allb[:, [0, 2]] - x0) / res_x  # cell edges, in cells from the origin
    ey = (y0 - allb[:, [3, 1]]) / res_y
    limit = max(1, math.isqrt(max_pixels // max(1, math.ceil(ex.max()) * math.ceil(ey.max()))))
    mx, my = _subdivision(ex, limit), _subdivision(ey, limit)
    c = np.rint(ex * mx).astype(np.int64)
    r = np.rint(ey * my).astype(np.int64)
    start = 0
    for b in boxes:  # each raster's cells stay inside its cells' extent (rounding may not push them out)
        stop = start + len(b)
        sl = slice(start, stop)
        left, right = ex[sl, 0].min() * mx, ex[sl, 1].max() * mx
        top, bottom = ey[sl, 0].min() * my, ey[sl, 1].max() * my
        c[sl] = np.clip(c[sl], math.ceil(left - 1e-6), math.floor(right + 1e-6))
        r[sl] = np.clip(r[sl], math.ceil(top - 1e-6), math.floor(bottom + 1e-6))
        start = stop
    # one byte per pixel, but for a legend of more than 255 labels (many clusters and a model's classes)
    dtype = np.uint8 if max(int(p.codes.max()) for p in drawn) <= np.iinfo(np.uint8).max else np.uint16
    grid = np.full((int(r[:, 1].max()), int(c[:, 1].max())), NO_DATA_CODE, dtype=dtype)
    starts = np.cumsum([0, *(len(b) for b in boxes)])
    for p in reversed(range(len(drawn))):  # where rasters overlap the first listed wins, as in the histograms
        sl = slice(int(starts[p]), int(starts[p + 1]))
        _paint(grid, c[sl], r[sl], drawn[p].codes.astype(dtype), mx, my)
    return CodeGrid(grid, Affine(res_x / mx, 0, x0, 0, -res_y / my, y0), crs)


def _paint(grid: np.ndarray, c: np.ndarray, r: np.ndarray, codes: np.ndarray, mx: int, my: int) -> None:
    """Cells (column and row spans in pixels) painted with their codes: full m x m cells all at once, in
    chunks; edge cells and cells of coarser rasters one by one."""
    whole = (c[:, 1] - c[:, 0] == mx) & (r[:, 1] - r[:, 0] == my)
    full = np.flatnonzero(whole)
    for chunk in np.array_split(full, len(full) * mx * my // 4_000_000 + 1):
        rows = r[chunk, 0, None, None] + np.arange(my)[None, :, None]
        cols = c[chunk, 0, None, None] + np.arange(mx)[None, None, :]
        grid[rows, cols] = codes[chunk, None, None]
    for i in np.flatnonzero(~whole & (c[:, 1] > c[:, 0]) & (r[:, 1] > r[:, 0])):
        grid[r[i, 0]:r[i, 1], c[i, 0]:c[i, 1]] = codes[i]


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


def aux_xml(legend: Legend, counts: dict[int, int]) -> str:
    """GDAL PAM sidecar: category names and a thematic raster attribute table (value, name, count, RGB)."""
    names = legend.class_names()
    top = max(names)
    cats = "\n      ".join(f"<Category>{escape(names.get(v, ''))}</Category>" for v in range(top + 1))
    fields = [("Value", _GFT_INTEGER, _GFU_MINMAX), ("Class", _GFT_STRING, _GFU_NAME),
              ("Count", _GFT_INTEGER, _GFU_PIXELCOUNT), ("Red", _GFT_INTEGER, _GFU_RED),
              ("Green", _GFT_INTEGER, _GFU_GREEN), ("Blue", _GFT_INTEGER, _GFU_BLUE),
              ("Colour", _GFT_STRING, _GFU_GENERIC)]
    defs = "\n      ".join(f'<FieldDefn index="{i}"><Name>{n}</Name><Type>{t}</Type><Usage>{u}</Usage></FieldDefn>'
                           for i, (n, t, u) in enumerate(fields))
    rows = []
    for i, lb in enumerate(legend.labels):
        code, colour = legend.code(lb), legend.colour(lb)
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


def write_cluster_map(path: Path, grid: CodeGrid, legend: Legend) -> Path:
    """Write the COG (atomically) with its colour table, plus the ``.aux.xml`` and ``.qml`` sidecars."""
    h, w = grid.codes.shape
    bs = _block_size(w, h)
    profile = {"driver": "GTiff", "width": w, "height": h, "count": 1, "dtype": grid.codes.dtype.name,
               "nodata": NO_DATA_CODE,
               "crs": rasterio.crs.CRS.from_wkt(grid.crs.to_wkt()), "transform": grid.transform}
    dst = cog_profiles.get("deflate")
    dst.update({"blockxsize": bs, "blockysize": bs})
    values, counts = np.unique(grid.codes, return_counts=True)
    write_atomic(path.with_suffix(".qml"), lambda p: p.write_text(raster_qml(legend), encoding="utf-8"))
    aux = path.with_name(path.name + ".aux.xml")
    write_atomic(aux, lambda p: p.write_text(aux_xml(legend, dict(zip(values.tolist(), counts.tolist(),
                                                                        strict=True))), encoding="utf-8"))
    with MemoryFile() as mem:
        with mem.open(**profile) as src:
            # the colour table before the pixels: GDAL sets the TIFF's photometric tag (palette) with it, which
            # libtiff refuses once pixels are written ("Cannot modify tag PhotometricInterpretation")
            src.write_colormap(1, legend.colour_table())
            src.write(grid.codes, 1)
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
    log.info("cluster map %s: %d x %d cells, block %d", path.name, w, h, bs)
    return path
