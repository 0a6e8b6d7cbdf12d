"""Reading tiles: band selection, scaling, and validity from alpha, nodata and the raster edge."""

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from settlements.config import RasterInput, Scaling
from settlements.rasters import compute_scaling, inspect_raster, read_raw, read_tile

from .conftest import scene


def test_alpha_zero_is_invalid_not_content(tmp_path: Path) -> None:
    """The real Swellendam photo, with its alpha band cleared in one corner (the defect we need)."""
    src_path = scene("swellendam_za", "3420B_2010_328_RGB_LATLNG.tif")
    out = tmp_path / "alpha.tif"
    with rasterio.open(src_path) as src:
        data = src.read(window=Window(0, 0, 64, 64))
        profile = src.profile | {"width": 64, "height": 64, "transform": src.window_transform(Window(0, 0, 64, 64))}
    data[3, :32, :32] = 0
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(data)
    spec = RasterInput(path=out, bands=[1, 2, 3])
    info = compute_scaling(inspect_raster(out, spec), spec)
    with rasterio.open(out) as src:
        px, valid = read_tile(src, info, Window(0, 0, 64, 64))
    assert valid[:32, :32].sum() == 0 and valid[32:, :].all() and valid[:, 32:].all()
    assert px.shape == (3, 64, 64) and px.dtype == np.float32
    assert 0 <= px.min() and px.max() <= 1


def test_uint16_nodata_and_percentile_stretch() -> None:
    path = scene("bangalore_s2", "section_2_sentinel.tif")
    spec = RasterInput(path=path, bands=[3, 2, 1], scaling=Scaling(method="percentile", low=2, high=98))
    info = compute_scaling(inspect_raster(path, spec), spec)
    assert info.nodata == 9999 and info.dtype == "uint16"
    assert all(lo < hi < 9999 for lo, hi in zip(info.scale_low, info.scale_high, strict=True))
    with rasterio.open(path) as src:
        raw = src.read(3)
        px, valid = read_tile(src, info, Window(0, 0, src.width, src.height))
    assert (valid == (raw != 9999)).all()
    inside = px[0][valid]
    assert 0.01 < (inside == 0).mean() + (inside == 1).mean() < 0.1  # about 2 % clipped at each end


def test_window_past_the_edge_is_invalid_there() -> None:
    path = scene("olinda_brazil", "L7_ETMs.tif")
    spec = RasterInput(path=path, bands=[3, 2, 1], scaling=Scaling(method="dtype"))
    info = compute_scaling(inspect_raster(path, spec), spec)
    with rasterio.open(path) as src:
        px, valid = read_tile(src, info, Window(340, -4, 16, 16))
        raw = src.read([3, 2, 1], window=Window(340, 0, 9, 12))
    assert valid[4:, :9].all() and not valid[:4].any() and not valid[:, 9:].any()
    np.testing.assert_allclose(px[:, 4:, :9], raw / 255.0, rtol=1e-6)


def test_greyscale_is_repeated_to_three_channels() -> None:
    path = scene("olinda_brazil", "L7_ETMs.tif")
    spec = RasterInput(path=path, bands=[4])
    info = compute_scaling(inspect_raster(path, spec), spec)
    with rasterio.open(path) as src:
        px, _ = read_tile(src, info, Window(0, 0, 8, 8))
    assert px.shape == (3, 8, 8) and (px[0] == px[2]).all()


@pytest.mark.parametrize("method", ["range", "dtype"])
def test_fixed_scalings(method: str) -> None:
    path = scene("olinda_brazil", "L7_ETMs.tif")
    scaling = Scaling(method=method, min=0, max=255) if method == "range" else Scaling(method=method)
    spec = RasterInput(path=path, bands=[3, 2, 1], scaling=scaling)
    info = compute_scaling(inspect_raster(path, spec), spec)
    assert info.scale_low == (0.0, 0.0, 0.0) and info.scale_high == (255.0, 255.0, 255.0)


@pytest.mark.parametrize("interleave", ["pixel", "band"])
@pytest.mark.parametrize("window", [Window(10, 20, 48, 40), Window(-8, -6, 32, 32), Window(1000, 3030, 200, 20)])
def test_raw_reads_store_bands_either_way_with_the_same_values(tmp_path: Path, interleave: str, window: Window) -> None:
    """Pixel-by-pixel storage (channels_last tiles) holds exactly the band-by-band values, edges included."""
    path = scene("swellendam_za", "3420B_2010_328_RGB_LATLNG.tif")
    with rasterio.open(path) as src:
        profile = src.profile | {"interleave": interleave, "tiled": True, "blockxsize": 256, "blockysize": 256}
        copy = tmp_path / f"{interleave}.tif"
        with rasterio.open(copy, "w", **profile) as dst:
            dst.write(src.read())
    spec = RasterInput(path=copy, bands=[3, 2, 1])
    info = compute_scaling(inspect_raster(copy, spec), spec)
    with rasterio.open(copy) as src:
        by_band, valid_b = read_raw(src, info, window)
        by_pixel, valid_p = read_raw(src, info, window, pixel_interleaved=True)
    assert by_pixel.shape == by_band.shape == (3, int(window.height), int(window.width))
    assert by_pixel.strides[0] == by_pixel.itemsize  # the bands of a pixel side by side
    assert np.array_equal(by_pixel, by_band) and np.array_equal(valid_p, valid_b)
    assert valid_b.any()
    if window.row_off < 0:  # rows above the raster: zeros, invalid
        assert not valid_b[:6].any() and not by_pixel[:, :6].any()


def _non_finite_copy(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """Olinda's real pixels as float32 with 5 % +inf, 2 % NaN and 2 % -inf scattered over them."""
    src_path = scene("olinda_brazil", "L7_ETMs.tif")
    with rasterio.open(src_path) as src:
        data, prof = src.read([3, 2, 1]).astype(np.float32), src.profile | {"count": 3, "dtype": "float32"}
    rng = np.random.default_rng(0)
    u = rng.random(data.shape[1:])
    band = rng.integers(0, 3, data.shape[1:])
    for lo, hi, value in ((0.0, 0.05, np.inf), (0.05, 0.07, np.nan), (0.07, 0.09, -np.inf)):
        rows, cols = np.nonzero((u >= lo) & (u < hi))
        data[band[rows, cols], rows, cols] = value
    path = tmp_path / "nonfinite.tif"
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(data)
    return path, data


def test_non_finite_pixels_are_invalid_and_left_out_of_percentiles(tmp_path: Path) -> None:
    """+inf made the 98th percentile NaN (high collapsed onto low); -inf made low -inf. Both are no imagery."""
    from settlements.rasters import valid_footprint

    path, data = _non_finite_copy(tmp_path)
    finite = np.isfinite(data).all(axis=0)
    assert 0.08 < 1 - finite.mean() < 0.1
    spec = RasterInput(path=path, bands=[1, 2, 3], scaling=Scaling(method="percentile", low=2, high=98))
    info = compute_scaling(inspect_raster(path, spec), spec)
    px = data[:, finite].T
    np.testing.assert_allclose(info.scale_low, np.percentile(px, 2, axis=0))
    np.testing.assert_allclose(info.scale_high, np.percentile(px, 98, axis=0))
    assert all(np.isfinite(info.scale_low)) and all(h > lo + 10 for lo, h in zip(info.scale_low, info.scale_high,
                                                                               strict=True))
    with rasterio.open(path) as src:
        tile, valid = read_tile(src, info, Window(0, 0, src.width, src.height))
    assert (valid == finite).all()
    assert np.isfinite(tile).all() and 0 <= tile.min() and tile.max() <= 1
    res = abs(info.transform[0])
    assert valid_footprint(info).area == pytest.approx(finite.sum() * res * res, rel=1e-9)


def test_scaling_reports_the_share_of_clipped_pixels() -> None:
    path = scene("olinda_brazil", "L7_ETMs.tif")
    with rasterio.open(path) as src:
        data = src.read([3, 2, 1])
    wide = RasterInput(path=path, bands=[3, 2, 1], scaling=Scaling(method="range", min=0, max=255))
    narrow = RasterInput(path=path, bands=[3, 2, 1], scaling=Scaling(method="range", min=0, max=10))
    assert compute_scaling(inspect_raster(path, wide), wide).clipped == 0.0
    info = compute_scaling(inspect_raster(path, narrow), narrow)
    assert info.clipped == pytest.approx(float((data > 10).any(axis=0).mean()))
    assert info.clipped > 0.9
    from settlements.rasters import clipping_warning

    assert clipping_warning(info) is not None and "L7_ETMs.tif" in clipping_warning(info)
