import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from settlements.errors import TilingError
from settlements.tiling import TileGrid, clip_window, length_to_pixels


def coverage(grid: TileGrid) -> np.ndarray:
    cov = np.zeros((grid.height, grid.width), dtype=np.int32)
    for row, col in grid.cells():
        w = grid.cell_window(row, col)
        cov[int(w.row_off): int(w.row_off + w.height), int(w.col_off): int(w.col_off + w.width)] += 1
    return cov


@given(
    width=st.integers(1, 90), height=st.integers(1, 90),
    tile=st.integers(1, 20), overlap=st.integers(0, 10),
)
def test_every_pixel_in_exactly_one_cell(width: int, height: int, tile: int, overlap: int) -> None:
    stride = max(1, tile - overlap)
    grid = TileGrid(width, height, tile, tile, stride, stride)
    assert (coverage(grid) == 1).all()
    assert len(list(grid.cells())) == len(grid)


@given(st.integers(1, 50), st.integers(1, 50), st.integers(1, 12), st.integers(0, 6))
def test_tile_is_centred_on_its_cell_and_contains_it(width: int, height: int, tile: int, overlap: int) -> None:
    stride = max(1, tile - overlap)
    grid = TileGrid(width, height, tile, tile, stride, stride)
    for row, col in grid.cells():
        t, c = grid.tile_window(row, col), grid.cell_window(row, col)
        assert t.col_off <= c.col_off and t.col_off + t.width >= c.col_off + c.width
        assert t.row_off <= c.row_off and t.row_off + t.height >= c.row_off + c.height
        assert t.width == tile and t.height == tile


def test_stride_equal_to_tile_gives_identical_windows() -> None:
    grid = TileGrid(100, 64, 16, 16, 16, 16)
    assert grid.tile_window(2, 3) == grid.cell_window(2, 3)
    assert (grid.n_rows, grid.n_cols) == (4, 7)


def test_edge_cells_are_clipped() -> None:
    grid = TileGrid(10, 10, 4, 4, 4, 4)
    w = grid.cell_window(2, 2)
    assert (w.width, w.height) == (2, 2)


def test_bad_grid_is_rejected() -> None:
    with pytest.raises(TilingError, match="stride must not exceed"):
        TileGrid(10, 10, 4, 4, 5, 5)
    with pytest.raises(TilingError, match="tile_w must be at least 1"):
        TileGrid(10, 10, 0, 4, 1, 1)


def test_metres_to_pixels_per_axis() -> None:
    assert length_to_pixels(240, "m", 30, 30) == (8, 8)
    assert length_to_pixels(80, "m", 2.5, 2.8) == (32, 29)
    assert length_to_pixels(16, "px", 30, 10) == (16, 16)


def test_clip_window() -> None:
    from rasterio.windows import Window

    assert clip_window(Window(-2, -2, 5, 5), 10, 10) == Window(0, 0, 3, 3)
    assert clip_window(Window(12, 0, 5, 5), 10, 10) is None
