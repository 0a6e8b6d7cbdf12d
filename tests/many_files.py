"""Helpers for the many-files tests: real scenes cut into GeoTIFF chips, VRT mosaics of many files,
labelled polygons traced from the Mumbai reference masks, and tile matching between two runs."""

from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import escape

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
import rasterio.features
import shapely
from rasterio.windows import Window


def cut_chips(source: Path, folder: Path, chip_w: int, chip_h: int, block: int | None = None) -> list[Path]:
    """Cut ``source`` into ``chip_w`` x ``chip_h`` GeoTIFF chips (row-major names), pixels unchanged;
    stored in strips, or in ``block`` px square tiles."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    with rasterio.open(source) as src:
        assert src.width % chip_w == 0 and src.height % chip_h == 0
        profile = {k: v for k, v in src.profile.items() if k not in ("blockxsize", "blockysize", "tiled")}
        if block is not None:
            profile.update(tiled=True, blockxsize=block, blockysize=block)
        for r in range(src.height // chip_h):
            for c in range(src.width // chip_w):
                win = Window(c * chip_w, r * chip_h, chip_w, chip_h)
                path = folder / f"chip_r{r:02d}_c{c:02d}.tif"
                with rasterio.open(path, "w", **{**profile, "width": chip_w, "height": chip_h,
                                                 "transform": src.window_transform(win)}) as dst:
                    dst.write(src.read(window=win))
                out.append(path)
    return out


def write_vrt(target: Path, files: list[Path], alpha: bool = False) -> Path:
    """One VRT mosaic of north-up files that share CRS, pixel size and dtype, on the union of their extents.

    ``alpha``: a fourth band, 255 where a file has pixels and 0 in the gaps between them (what
    ``gdalbuildvrt -addalpha`` writes), so the gaps are nodata rather than black imagery.
    """
    metas = []
    for f in files:
        with rasterio.open(f) as s:
            metas.append((Path(f).resolve(), s.transform, s.width, s.height, s.count, s.crs, s.dtypes[0]))
    rx, ry = metas[0][1].a, -metas[0][1].e
    x0, y0 = min(m[1].c for m in metas), max(m[1].f for m in metas)
    x1 = max(m[1].c + m[2] * rx for m in metas)
    y1 = min(m[1].f - m[3] * ry for m in metas)
    width, height = round((x1 - x0) / rx), round((y0 - y1) / ry)
    count, crs, dtype = metas[0][4], metas[0][5], {"uint8": "Byte"}[metas[0][6]]
    bands = []
    for b in range(1, count + 1 + int(alpha)):
        is_alpha = b > count
        sources = []
        for path, t, w, h, *_ in metas:
            xo, yo = round((t.c - x0) / rx), round((y0 - t.f) / ry)
            rect = (f'<SourceFilename relativeToVRT="0">{escape(str(path))}</SourceFilename>'
                    f'<SourceBand>{1 if is_alpha else b}</SourceBand>'
                    f'<SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>'
                    f'<DstRect xOff="{xo}" yOff="{yo}" xSize="{w}" ySize="{h}"/>')
            sources.append(f"<ComplexSource>{rect}<ScaleOffset>255</ScaleOffset><ScaleRatio>0</ScaleRatio>"
                           "</ComplexSource>" if is_alpha else f"<SimpleSource>{rect}</SimpleSource>")
        interp = "<ColorInterp>Alpha</ColorInterp>" if is_alpha else ""
        bands.append(f'<VRTRasterBand dataType="{dtype}" band="{b}">{interp}{"".join(sources)}</VRTRasterBand>')
    target.write_text(f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}"><SRS>{escape(crs.to_wkt())}</SRS>'
                      f"<GeoTransform>{x0!r}, {rx!r}, 0.0, {y0!r}, 0.0, {-ry!r}</GeoTransform>"
                      f'{"".join(bands)}</VRTDataset>')
    return target


#: Mumbai reference classes (mask codes) grouped as the mumbai_train README suggests.
MUMBAI_GROUPS = {1: "informal", 2: "formal", 3: "formal", 4: "not built up", 5: "not built up", 6: "not built up"}


def mumbai_group_mask(mask_path: Path, step: int) -> tuple[np.ndarray, rasterio.Affine]:
    """A patch's reference mask read every ``step`` pixels, as group codes (0 = no class), and its transform."""
    with rasterio.open(mask_path) as src:
        h, w = src.height // step, src.width // step
        codes = src.read(1, out_shape=(h, w))
        transform = src.transform @ rasterio.Affine.scale(src.width / w, src.height / h)
    names = sorted(set(MUMBAI_GROUPS.values()))
    out = np.zeros(codes.shape, dtype=np.uint8)
    for code, name in MUMBAI_GROUPS.items():
        out[codes == code] = names.index(name) + 1
    return out, transform


def mumbai_label_polygons(masks: list[Path], target: Path, step: int = 8) -> gpd.GeoDataFrame:
    """The hand-labelled masks traced into class polygons (every ``step`` pixels): a polygon label layer."""
    names = sorted(set(MUMBAI_GROUPS.values()))
    geoms, classes = [], []
    for path in masks:
        grid, transform = mumbai_group_mask(path, step)
        for geom, value in rasterio.features.shapes(grid, mask=grid > 0, transform=transform):
            geoms.append(shapely.geometry.shape(geom))
            classes.append(names[int(value) - 1])
    with rasterio.open(masks[0]) as src:
        crs = src.crs
    gdf = gpd.GeoDataFrame({"class": classes}, geometry=geoms, crs=crs)
    gdf.to_file(target, layer="labels", driver="GPKG")
    return gdf


def cell_keys(minx: np.ndarray, miny: np.ndarray, maxx: np.ndarray, maxy: np.ndarray,
              cell: float) -> pd.MultiIndex:
    """A key per tile cell from its centre, in hundredths of a cell: equal for the same ground cell."""
    cx, cy = (np.asarray(minx) + np.asarray(maxx)) / 2, (np.asarray(miny) + np.asarray(maxy)) / 2
    return pd.MultiIndex.from_arrays([np.rint(cx / cell * 100).astype(np.int64),
                                      np.rint(cy / cell * 100).astype(np.int64)])


def match_tiles(a: pd.DataFrame, b: pd.DataFrame, cell: float) -> tuple[np.ndarray, np.ndarray]:
    """Positions in ``a`` and ``b`` of the tiles with the same cell (same ground), as two aligned arrays."""
    ka = cell_keys(a["minx"], a["miny"], a["maxx"], a["maxy"], cell)
    kb = cell_keys(b["minx"], b["miny"], b["maxx"], b["maxy"], cell)
    assert ka.is_unique and kb.is_unique
    pos_b = pd.Series(np.arange(len(b)), index=kb)
    found = ka.isin(kb)
    return np.flatnonzero(found), pos_b.loc[ka[found]].to_numpy()
