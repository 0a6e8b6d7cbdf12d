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

import numpy as np
from rasterio.windows import Window

from .errors import TilingError

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

    def cell_window(self, row: int, col: int) -> Window:
        """The stride cell of (row, col), clipped to the raster."""
        c0, r0 = col * self.stride_w, row * self.stride_h
        return Window(c0, r0, min(self.stride_w, self.width - c0), min(self.stride_h, self.height - r0))

    def tile_window(self, row: int, col: int) -> Window:
        """The tile of (row, col): centred on the unclipped cell; may reach past the raster edge."""
        c0 = col * self.stride_w - (self.tile_w - self.stride_w) // 2
        r0 = row * self.stride_h - (self.tile_h - self.stride_h) // 2
        return Window(c0, r0, self.tile_w, self.tile_h)

    def cells(self) -> Iterator[tuple[int, int]]:
        """(row, col) in row-major order, so reads walk the raster contiguously."""
        for row in range(self.n_rows):
            for col in range(self.n_cols):
                yield row, col


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
