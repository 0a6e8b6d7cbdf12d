"""Training or reference labels from class rasters (hand-labelled masks, land-cover maps).

Each tile's stride cell is resampled from the class raster(s) onto a grid ``f`` times finer than the
image's pixels, ``f`` chosen so the grid is at least as fine as the class raster (at most
``MAX_CELL_SAMPLES`` a side per cell): nearest-neighbour warping (``rasterio.warp.reproject``) in any
CRS, which on a class raster aligned with the image is an exact copy. The cell's class shares are then
counted over its labelled samples (not nodata, not an ``ignore`` code, inside a class raster).

A cell takes the group (see :class:`~settlements.config.LabelGroup`) whose classes together cover at
least its ``min_share`` of the labelled samples while every ``below`` limit holds; the largest share
wins where several qualify, the first listed on a tie. Cells that no group claims (mixed), or that are
less than ``min_labelled`` labelled, get no class. A glob ``path`` names many class rasters (one per
image, say); each image uses those whose footprint meets it, the first in sorted order winning
where two overlap.
"""

from __future__ import annotations

import glob
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import rasterio
import rasterio.transform
import rasterio.warp
from rasterio.enums import Resampling
from rasterio.errors import RasterioError

from ..config import LabelGroup, LabelSource
from ..errors import ConfigError, RasterError
from ..rasters import RasterInfo, open_raster

log = logging.getLogger(__name__)

#: Samples per cell side at most: shares to well under 1 % without warping huge grids.
MAX_CELL_SAMPLES = 256
#: Samples per side of one warped block of cells.
BLOCK_SAMPLES = 2048
#: Code of a sample no class raster covers (or nodata): outside the int32 codes accepted.
_NONE = np.iinfo(np.int32).min
_CODE_DTYPES = {"uint8", "int8", "uint16", "int16", "int32"}


@dataclass(frozen=True)
class ClassRaster:
    """One class raster, checked: its band, nodata and footprint."""

    path: Path
    band: int
    nodata: float | None
    crs: rasterio.crs.CRS
    bounds: tuple[float, float, float, float]
    shape: tuple[int, int]


def class_raster_paths(src: LabelSource) -> list[Path]:
    """The class raster files ``path`` names (a glob names several, in sorted order)."""
    assert src.path is not None  # the config validator requires it
    pattern = str(src.path)
    if any(ch in pattern for ch in "*?["):
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise ConfigError(f"{pattern}: training.labels.path: no class raster matches this pattern")
        return [Path(m) for m in matches]
    if not src.path.exists():
        raise ConfigError(f"{src.path}: class raster not found")
    return [src.path]


def open_class_raster(path: Path, band: int) -> ClassRaster:
    """Check a class raster: the band exists and holds integer codes, georeferenced, not rotated."""
    with open_raster(path) as ds:
        if ds.crs is None or ds.transform.is_identity:
            raise RasterError(f"{path}: class raster has no CRS or geotransform")
        if ds.transform.b != 0 or ds.transform.d != 0:
            raise RasterError(f"{path}: rotated geotransforms are not supported (warp it first)")
        if band > ds.count:
            raise ConfigError(f"{path}: training.labels.band {band} out of range (the raster has {ds.count})")
        dtype = ds.dtypes[band - 1]
        if dtype not in _CODE_DTYPES:
            raise RasterError(f"{path}: band {band}: class codes must be integers ({', '.join(sorted(_CODE_DTYPES))}),"
                              f" got {dtype}")
        return ClassRaster(path, band, ds.nodata, ds.crs, tuple(ds.bounds), (ds.height, ds.width))


def _group_shares(counts: np.ndarray, names: list[str], groups: dict[str, LabelGroup],
                  min_share: float) -> np.ndarray:
    """Index into ``groups`` of each row of class ``counts`` (cells x names), -1 where none qualifies."""
    total = counts.sum(axis=1, keepdims=True)
    share = counts / np.maximum(total, 1)
    col = {n: i for i, n in enumerate(names)}
    best = np.full(len(counts), -1, dtype=np.int64)
    best_share = np.full(len(counts), -np.inf)
    for g, spec in enumerate(groups.values()):
        s = share[:, [col[c] for c in dict.fromkeys(spec.classes)]].sum(axis=1)
        ok = s >= (spec.min_share or min_share) - 1e-12
        for other, limit in spec.below.items():
            ok &= share[:, col[other]] < limit
        better = ok & (s > best_share)  # strictly larger: the first listed wins a tie
        best[better], best_share[better] = g, s[better]
    return best


class _CodeLookup:
    """Class raster codes -> class index (-1: no class), failing on codes the config does not name."""

    def __init__(self, src: LabelSource, names: list[str]) -> None:
        assert src.classes is not None
        self.classes = {int(c): names.index(n) for c, n in src.classes.items()}
        self.ignore = set(src.ignore)

    def __call__(self, codes: np.ndarray, path: Path) -> np.ndarray:
        found, inverse = np.unique(codes, return_inverse=True)
        unknown = [int(c) for c in found if c != _NONE and int(c) not in self.classes and int(c) not in self.ignore]
        if unknown:
            raise ConfigError(f"{path}: code(s) {unknown[:10]} are in neither training.labels.classes "
                              f"({sorted(self.classes)}) nor training.labels.ignore ({sorted(self.ignore)})")
        index = np.asarray([self.classes.get(int(c), -1) for c in found], dtype=np.int64)
        return index[inverse].reshape(codes.shape)


def _fine_factor(info: RasterInfo, masks: list[ClassRaster], cell_px: int) -> int:
    """Samples per image pixel side: at least as fine as the finest class raster, capped per cell."""
    px = min(abs(info.affine.a), abs(info.affine.e))
    need = 1
    for m in masks:
        left, bottom, right, top = _footprint_in(m, info.crs)
        mask_px = min((right - left) / m.shape[1], (top - bottom) / m.shape[0])  # in the image's CRS units
        need = max(need, math.ceil(px / mask_px - 1e-6))
    return max(1, min(need, MAX_CELL_SAMPLES // max(cell_px, 1)))


def _footprint_in(m: ClassRaster, crs: rasterio.crs.CRS) -> tuple[float, float, float, float]:
    return tuple(rasterio.warp.transform_bounds(m.crs, crs, *m.bounds, densify_pts=21))  # type: ignore[return-value]


def _meets(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _warp_codes(masks: list[ClassRaster], info: RasterInfo, col0: int, row0: int, w: int, h: int,
                f: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes of the class rasters on the image window (col0, row0, w, h) sampled ``f`` x finer, and for
    each sample the index of the class raster it came from (-1: none)."""
    transform = info.affine @ rasterio.Affine.translation(col0, row0) @ rasterio.Affine.scale(1 / f)
    codes = np.full((h * f, w * f), _NONE, dtype=np.int32)
    origin = np.full(codes.shape, -1, dtype=np.int32)
    window_bounds = rasterio.transform.array_bounds(h * f, w * f, transform)
    for i, m in enumerate(masks):
        if not _meets(_footprint_in(m, info.crs), window_bounds):
            continue
        part = np.full(codes.shape, _NONE, dtype=np.int32)
        try:
            with rasterio.open(m.path) as ds:
                rasterio.warp.reproject(rasterio.band(ds, m.band), part, src_nodata=m.nodata, dst_transform=transform,
                                        dst_crs=info.crs, dst_nodata=_NONE, resampling=Resampling.nearest)
        except (RasterioError, OSError, ValueError) as exc:
            raise RasterError(f"{m.path}: cannot read class codes: {str(exc).splitlines()[0]}") from None
        fill = (codes == _NONE) & (part != _NONE)
        codes[fill], origin[fill] = part[fill], i
    return codes, origin


def _cell_index(tiles: pd.DataFrame, col0: int, row0: int, w: int, h: int, f: int) -> tuple[np.ndarray, np.ndarray]:
    """Per sample of the block, the local row and column of its cell among ``tiles`` (-1: none)."""
    rows = np.full(h * f, -1, dtype=np.int64)
    cols = np.full(w * f, -1, dtype=np.int64)
    for i, (start, size) in enumerate(tiles[["cell_row", "cell_h"]].drop_duplicates().itertuples(index=False)):
        rows[(start - row0) * f: (start - row0 + size) * f] = i
    for i, (start, size) in enumerate(tiles[["cell_col", "cell_w"]].drop_duplicates().itertuples(index=False)):
        cols[(start - col0) * f: (start - col0 + size) * f] = i
    return rows, cols


def raster_labels(infos: list[RasterInfo], tiles: pd.DataFrame, src: LabelSource) -> pd.DataFrame:
    """tile_id, class: the group of classes that covers most of each tile cell, by the rule above."""
    assert src.classes is not None
    names = list(dict.fromkeys(src.classes.values()))
    groups = src.raster_groups()
    group_names = np.asarray(list(groups), dtype=object)
    lookup = _CodeLookup(src, names)
    masks = [open_class_raster(p, src.band) for p in class_raster_paths(src)]
    ids, classes = [], []
    n_cells = n_unlabelled = 0
    for r, t in tiles.groupby("raster", sort=True):
        info = infos[int(r)]
        a = info.affine
        image_bounds = tuple(rasterio.transform.array_bounds(info.height, info.width, a))
        near = [m for m in masks if _meets(_footprint_in(m, info.crs), image_bounds)]
        if not near:
            continue
        cell_px = int(max(t["cell_w"].max(), t["cell_h"].max()))
        f = _fine_factor(info, near, cell_px)
        per_block = max(1, BLOCK_SAMPLES // (cell_px * f))
        for _, block in t.groupby([t["row"] // per_block, t["col"] // per_block], sort=True):
            col0, row0 = int(block["cell_col"].min()), int(block["cell_row"].min())
            w = int((block["cell_col"] + block["cell_w"]).max()) - col0
            h = int((block["cell_row"] + block["cell_h"]).max()) - row0
            codes, origin = _warp_codes(near, info, col0, row0, w, h, f)
            klass = np.empty(codes.shape, dtype=np.int64)
            for i, m in enumerate(near):  # unknown codes are named with the file they came from
                here = origin == i
                if here.any():
                    klass[here] = lookup(codes[here], m.path)
            klass[origin < 0] = -1
            rows, cols = _cell_index(block, col0, row0, w, h, f)
            n_rows, n_cols = int(rows.max()) + 1, int(cols.max()) + 1
            cell = np.where((rows[:, None] >= 0) & (cols[None, :] >= 0), rows[:, None] * n_cols + cols[None, :], -1)
            use = cell >= 0
            counts = np.bincount(cell[use] * (len(names) + 1) + klass[use] + 1,
                                 minlength=n_rows * n_cols * (len(names) + 1)).reshape(n_rows * n_cols, -1)
            row_of = {v: i for i, v in enumerate(block[["cell_row", "cell_h"]].drop_duplicates()["cell_row"])}
            col_of = {v: i for i, v in enumerate(block[["cell_col", "cell_w"]].drop_duplicates()["cell_col"])}
            at = np.asarray([row_of[rr] * n_cols + col_of[cc] for rr, cc in zip(block["cell_row"], block["cell_col"],
                                                                                strict=True)], dtype=np.int64)
            c = counts[at]
            labelled = c[:, 1:].sum(axis=1) / np.maximum(c.sum(axis=1), 1)
            enough = labelled >= src.min_labelled - 1e-12
            g = _group_shares(c[:, 1:], names, groups, src.min_share)
            take = enough & (g >= 0)
            n_cells += len(block)
            n_unlabelled += int((~enough).sum())
            ids.append(block["tile_id"].to_numpy(np.int64)[take])
            classes.append(group_names[g[take]])
    if not ids:
        raise ConfigError(f"{src.path}: no class raster meets any tile (check the extent and CRS)")
    out = pd.DataFrame({"tile_id": np.concatenate(ids), "class": np.concatenate(classes).astype(object)})
    log.info("class raster labels: %d of %d cells labelled, %d less than %.0f%% labelled, %d mixed",
             len(out), n_cells, n_unlabelled, src.min_labelled * 100, n_cells - len(out) - n_unlabelled)
    return out
