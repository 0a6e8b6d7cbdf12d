"""Reference classes from the raw spectral bands: an independent check on RGB-based models.

The rule, per pixel, on the raw digital numbers of the configured bands (Landsat ETM+: green 2,
red 3, NIR 4):

* water       if NDWI = (green - NIR) / (green + NIR) > ``water_ndwi`` (default 0.3),
* vegetation  else if NDVI = (NIR - red) / (NIR + red) > ``vegetation_ndvi`` (default 0.15),
* built-up    otherwise;

a tile takes the class of most of its valid pixels. Water absorbs NIR and vegetation reflects it,
so both indices separate cleanly even on uncalibrated numbers (on Olinda NDWI is bimodal with a
gap between 0.2 and 0.6). The pipeline embeds only the visible bands, so labels drawn from NIR are
not a function of what the CNN sees.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import rasterio
from rasterio.windows import Window

from ..config import LabelSource
from ..errors import ConfigError
from ..rasters import RasterInfo, valid_mask
from ..tiling import clip_window

CLASSES = ("water", "vegetation", "built-up")


def iter_raw_tiles(infos: list[RasterInfo], tiles: pd.DataFrame,
                   bands: tuple[int, ...]) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(tile_id, raw bands (b, h, w) as float32, valid mask) of each tile window, clipped to the raster."""
    for r, group in tiles.groupby("raster", sort=True):
        info = infos[int(r)]
        with rasterio.open(info.path) as src:
            bad = [b for b in bands if b > src.count]
            if bad:
                raise ConfigError(f"training: band {bad[0]} out of range for {info.path} ({src.count} bands)")
            for tid, c, rr, w, h in group[["tile_id", "tile_col", "tile_row", "tile_w", "tile_h"]].itertuples(
                    index=False):
                win = clip_window(Window(int(c), int(rr), int(w), int(h)), info.width, info.height)
                if win is None:
                    continue
                data = src.read(list(bands), window=win).astype(np.float32)
                ok = valid_mask(src, bands, data, win, info.nodata)
                yield int(tid), data, ok


def classify_pixels(green: np.ndarray, red: np.ndarray, nir: np.ndarray, water_ndwi: float,
                    vegetation_ndvi: float) -> np.ndarray:
    """Class index (0 water, 1 vegetation, 2 built-up) of each pixel by the documented rule."""
    with np.errstate(invalid="ignore", divide="ignore"):
        ndwi = np.where(green + nir > 0, (green - nir) / (green + nir), 0.0)
        ndvi = np.where(nir + red > 0, (nir - red) / (nir + red), 0.0)
    out = np.full(green.shape, 2, dtype=np.int8)
    out[ndvi > vegetation_ndvi] = 1
    out[ndwi > water_ndwi] = 0
    return out


def spectral_labels(infos: list[RasterInfo], tiles: pd.DataFrame, src: LabelSource) -> pd.DataFrame:
    """tile_id, class: the majority spectral class of each tile's valid pixels."""
    ids, classes = [], []
    bands = (src.green_band, src.red_band, src.nir_band)
    for tid, data, ok in iter_raw_tiles(infos, tiles, bands):
        if not ok.any():
            continue
        px = classify_pixels(data[0], data[1], data[2], src.water_ndwi, src.vegetation_ndvi)[ok]
        ids.append(tid)
        classes.append(CLASSES[int(np.bincount(px, minlength=3).argmax())])
    return pd.DataFrame({"tile_id": np.asarray(ids, dtype=np.int64), "class": pd.Series(classes, dtype=object)})
