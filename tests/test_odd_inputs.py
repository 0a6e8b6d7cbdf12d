"""Odd but legal inputs, handled exactly or flagged: nothing passes silently with a wrong result.

Non-finite pixels, scalings that flatten the image, label names that collide as column names,
regions listed twice or without geometry. Rasters are the real Olinda scene, rewritten under tmp_path.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio

from .conftest import run_cli, scene, write_pipeline

SMALL = {"tiling": {"tile_size": "64px"}, "embedding": {"input_size": 32, "num_workers": 0},
         "clustering": {"k": 2}}


def olinda_copy(tmp: Path, name: str, dtype: str = "uint8") -> tuple[Path, np.ndarray, dict]:
    with rasterio.open(scene("olinda_brazil", "L7_ETMs.tif")) as src:
        return tmp / f"{name}.tif", src.read([3, 2, 1]).astype(dtype), src.profile | {"count": 3, "dtype": dtype}


def small_run(tmp: Path, path: Path, monkeypatch, capsys, raster: dict | None = None,
              **overrides: object) -> tuple[int, str, str, Path]:
    cfg = write_pipeline(tmp, "odd", "olinda", rasters=[{"path": str(path), "bands": [1, 2, 3], **(raster or {})}],
                         **{**SMALL, **overrides})
    code, out, err = run_cli(monkeypatch, capsys, "run", str(cfg))
    return code, out, err, tmp / "outputs" / "odd" / "odd.gpkg"


def test_non_finite_pixels_are_no_data_in_a_run(tmp_path, monkeypatch, capsys) -> None:
    """float32 with 5 % +inf, 2 % NaN, 2 % -inf scattered: a tile is kept when at least half of its 64 x 64
    window is finite, and its cell's valid share is its share of finite pixels (such rasters stopped the
    run, or lost fully valid tiles as 'skipped')."""
    path, data, prof = olinda_copy(tmp_path, "nonfinite", "float32")
    u = np.random.default_rng(1).random(data.shape[1:])
    data[0][u < 0.05] = np.inf
    data[1][(u >= 0.05) & (u < 0.07)] = np.nan
    data[2][(u >= 0.07) & (u < 0.09)] = -np.inf
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(data)
    code, out, err, gpkg = small_run(tmp_path, path, monkeypatch, capsys)
    assert code == 0, err
    tiles = pyogrio.read_dataframe(gpkg, layer="tiles")
    finite = np.isfinite(data).all(axis=0)
    keep = {(r, c) for r in range(6) for c in range(6)
            if finite[r * 64:(r + 1) * 64, c * 64:(c + 1) * 64].sum() >= 64 * 64 / 2}
    assert len(keep) == 25  # the 29 px wide last column and the 32 px high last row fall short
    assert set(zip(tiles["row"], tiles["col"], strict=True)) == keep
    for row, col, share in zip(tiles["row"], tiles["col"], tiles["valid_fraction"], strict=True):
        cell = finite[row * 64:(row + 1) * 64, col * 64:(col + 1) * 64]
        assert share == pytest.approx(cell.mean(), abs=1e-6)


def test_a_flat_result_warns_in_one_line_and_the_runs_row_says_so(tmp_path, monkeypatch, capsys, caplog) -> None:
    """range 0..10 on 8-bit Landsat: nearly every pixel clips to white and one cluster takes every tile."""
    path, data, prof = olinda_copy(tmp_path, "clipped")
    with rasterio.open(path, "w", **prof | {"width": 320, "height": 320}) as dst:  # whole tiles: no grey edges
        dst.write(data[:, :320, :320])
    with caplog.at_level(logging.WARNING, logger="settlements"):
        code, out, err, gpkg = small_run(tmp_path, path, monkeypatch, capsys,
                                         raster={"scaling": {"method": "range", "min": 0, "max": 10}})
    assert code == 0, err
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("settlements") and r.levelno >= logging.WARNING]
    assert len(ours) == 1 and "\n" not in ours[0], ours
    assert "clipped.tif: 100% of the valid pixels lie outside the scaling range (band 1: 0..10," in ours[0]
    assert "cluster 0 holds 100% of the 25 tiles" in ours[0]
    runs = pyogrio.read_dataframe(gpkg, layer="runs", read_geometry=False)
    warnings = json.loads(runs["warnings"].iloc[-1])
    assert len(warnings) == 2 and "outside the scaling range" in warnings[0] and "holds 100%" in warnings[1]
