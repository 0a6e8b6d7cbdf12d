"""The tile grid as pure window maths: no I/O.

The raster is partitioned into *stride cells* (stride x stride pixels, the last row and column
clipped to the raster). Each cell has one tile: a tile_size window centred on the cell's centre.
A tile stands for its cell, so overlapping tiles (stride < tile size) never count an area twice,
and every pixel of the raster lies in exactly one cell.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from rasterio.windows import Window

from .config import Tiling
from .errors import TilingError

if TYPE_CHECKING:
    from affine import Affine

#: The 8 integers that identify a tile's pixels in a raster: tile window and stride cell window.
WINDOW_COLUMNS = ["tile_col", "tile_row", "tile_w", "tile_h", "cell_col", "cell_row", "cell_w", "cell_h"]


@dataclass(frozen=True)
class TileGrid:
    """Cells and tiles over a ``width`` x ``height`` raster, all sizes in pixels."""

    width: int
    height: int
    tile_w: int
    tile_h: int
    stride_w: int
    stride_h: int

    def __post_init__(self) -> None:
        for name in ("width", "height", "tile_w", "tile_h", "stride_w", "stride_h"):
            if getattr(self, name) < 1:
                raise TilingError(f"{name} must be at least 1 pixel, got {getattr(self, name)}")
        if self.stride_w > self.tile_w or self.stride_h > self.tile_h:
            raise TilingError("stride must not exceed the tile size")

    @property
    def n_cols(self) -> int:
        return math.ceil(self.width / self.stride_w)

    @property
    def n_rows(self) -> int:
        return math.ceil(self.height / self.stride_h)

    def __len__(self) -> int:
        return self.n_rows * self.n_cols

    def cell_windows(self, row: Any, col: Any) -> tuple[Any, ...]:
        """(col_off, row_off, width, height) of the stride cells of ``row``, ``col``, clipped to the raster."""
        c0, r0 = col * self.stride_w, row * self.stride_h
        return c0, r0, np.minimum(self.stride_w, self.width - c0), np.minimum(self.stride_h, self.height - r0)

    def tile_windows(self, row: Any, col: Any) -> tuple[Any, ...]:
        """(col_off, row_off, width, height) of the tiles of ``row``, ``col``: each centred on its unclipped
        cell, so it may reach past the raster edge."""
        c0 = col * self.stride_w - (self.tile_w - self.stride_w) // 2
        r0 = row * self.stride_h - (self.tile_h - self.stride_h) // 2
        return c0, r0, np.full(np.shape(c0), self.tile_w), np.full(np.shape(r0), self.tile_h)

    def cell_window(self, row: int, col: int) -> Window:
        """The stride cell of (row, col), clipped to the raster."""
        return Window(*(int(v) for v in self.cell_windows(np.int64(row), np.int64(col))))

    def tile_window(self, row: int, col: int) -> Window:
        """The tile of (row, col): centred on the unclipped cell; may reach past the raster edge."""
        return Window(*(int(v) for v in self.tile_windows(np.int64(row), np.int64(col))))

    def cells(self) -> Iterator[tuple[int, int]]:
        """(row, col) in row-major order, so reads walk the raster contiguously."""
        for row in range(self.n_rows):
            for col in range(self.n_cols):
                yield row, col


def tile_plan(grid: TileGrid, transform: Affine) -> pd.DataFrame:
    """Every cell of ``grid`` in row-major order: row, col, tile window, cell window and cell bounds in the
    CRS of ``transform`` (north-up: rotation is rejected when a raster is inspected)."""
    row, col = np.divmod(np.arange(len(grid), dtype=np.int64), grid.n_cols)
    cell_col, cell_row, cell_w, cell_h = grid.cell_windows(row, col)
    tile_col, tile_row, tile_w, tile_h = grid.tile_windows(row, col)
    a = transform
    x0, y0 = a.c + a.a * cell_col, a.f + a.e * cell_row
    x1, y1 = a.c + a.a * (cell_col + cell_w), a.f + a.e * (cell_row + cell_h)
    return pd.DataFrame({
        "row": row, "col": col,
        "tile_col": tile_col, "tile_row": tile_row, "tile_w": tile_w, "tile_h": tile_h,
        "cell_col": cell_col, "cell_row": cell_row, "cell_w": cell_w, "cell_h": cell_h,
        "minx": np.minimum(x0, x1), "miny": np.minimum(y0, y1),
        "maxx": np.maximum(x0, x1), "maxy": np.maximum(y0, y1),
    })


def raster_grid(tiling: Tiling, width: int, height: int, pixel_w_m: float, pixel_h_m: float,
                name: object) -> TileGrid:
    """The tile grid of one raster (``name``, for messages), tile and stride lengths converted to its pixels."""
    t = tiling
    tw, th = length_to_pixels(t.tile_size.value, t.tile_size.unit, pixel_w_m, pixel_h_m)
    s = t.stride_length
    sw, sh = length_to_pixels(s.value, s.unit, pixel_w_m, pixel_h_m)
    for key, length, (w, h) in (("tile_size", t.tile_size, (tw, th)), ("stride", s, (sw, sh))):
        if min(w, h) < 1:
            raise TilingError(f"tiling.{key}: {length} is smaller than a pixel of {name} "
                              f"({pixel_w_m:.3g} x {pixel_h_m:.3g} m)")
    if tw > width or th > height:
        raise TilingError(f"tiling.tile_size: {t.tile_size} ({tw} x {th} px) is larger than {name} "
                          f"({width} x {height} px)")
    return TileGrid(width, height, tw, th, min(sw, tw), min(sh, th))


def length_to_pixels(value: float, unit: str, pixel_w_m: float, pixel_h_m: float) -> tuple[int, int]:
    """Convert a tile or stride length to whole pixels (x, y) for one raster.

    Metres are divided by the ground size of a pixel on each axis and rounded, so a
    non-square pixel (EPSG:4326 away from the equator) gives a non-square pixel window
    that is square on the ground.
    """
    if unit == "px":
        n = int(round(value))
        return n, n
    return int(round(value / pixel_w_m)), int(round(value / pixel_h_m))


def clip_window(window: Window, width: int, height: int) -> Window | None:
    """The part of ``window`` inside a width x height raster, or None if they do not meet."""
    c0 = max(int(window.col_off), 0)
    r0 = max(int(window.row_off), 0)
    c1 = min(int(window.col_off + window.width), width)
    r1 = min(int(window.row_off + window.height), height)
    if c1 <= c0 or r1 <= r0:
        return None
    return Window(c0, r0, c1 - c0, r1 - r0)


def ground_order(x: np.ndarray, y: np.ndarray, precision: float = 0.01) -> np.ndarray:
    """Positions of tiles sorted by where they lie (north to south, then west to east, to ``precision`` metres).

    A canonical order of the same ground however it was split into files: seeded samples and
    k-means initialisations drawn in this order do not depend on the order of the inputs.
    """
    return np.lexsort((np.rint(np.asarray(x) / precision), -np.rint(np.asarray(y) / precision)))
