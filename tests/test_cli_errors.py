"""Bad input: one clear error line naming the file or key, exit code 2, no output written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import rasterio

from .conftest import HANG_GUARD, run_cli, said, scene, write_pipeline


def run_bad(tmp_path: Path, monkeypatch, capsys, **overrides) -> tuple[int, str, Path]:
    cfg = write_pipeline(tmp_path, "bad", "olinda", **overrides)
    code, _, err = run_cli(monkeypatch, capsys, "run", str(cfg))
    return code, err, tmp_path / "outputs" / "bad"


def assert_clean_failure(code: int, err: str, out_dir: Path, pattern: str) -> None:
    assert code == 2
    lines = said(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    import re

    assert re.search(pattern, lines[0]), lines[0]
    assert not out_dir.exists() or not any(out_dir.iterdir())


@pytest.fixture
def olinda_raster() -> Path:
    return scene("olinda_brazil", "L7_ETMs.tif")


def test_missing_raster(tmp_path, monkeypatch, capsys, olinda_raster) -> None:
    code, err, out = run_bad(tmp_path, monkeypatch, capsys,
                             rasters=[{"path": str(tmp_path / "nope.tif"), "bands": [3, 2, 1]}])
    assert_clean_failure(code, err, out, r"nope\.tif: raster file not found")


def test_raster_without_crs(tmp_path, monkeypatch, capsys, olinda_raster) -> None:
    bad = tmp_path / "no_crs.tif"
    with rasterio.open(olinda_raster) as src:
        profile = src.profile | {"crs": None}
        data = src.read()
    with rasterio.open(bad, "w", **profile) as dst:
        dst.write(data)
    code, err, out = run_bad(tmp_path, monkeypatch, capsys, rasters=[{"path": str(bad), "bands": [3, 2, 1]}])
    assert_clean_failure(code, err, out, r"no_crs\.tif: raster has no CRS")


def test_not_a_raster(tmp_path, monkeypatch, capsys, olinda_raster) -> None:
    bad = tmp_path / "notes.tif"
    bad.write_text("this is a text file, not a GeoTIFF\n")
    code, err, out = run_bad(tmp_path, monkeypatch, capsys, rasters=[{"path": str(bad), "bands": [1, 2, 3]}])
    assert_clean_failure(code, err, out, r"notes\.tif: cannot open raster")


def test_region_outside_every_raster(tmp_path, monkeypatch, capsys, olinda_raster) -> None:
    code, err, out = run_bad(tmp_path, monkeypatch, capsys, regions=[{
        "wkt": "POLYGON ((10 50, 11 50, 11 51, 10 51, 10 50))", "crs": "EPSG:4326"}])
    assert_clean_failure(code, err, out, r"regions\.wkt: no region overlaps any input raster")


def test_unknown_backbone(tmp_path, monkeypatch, capsys, olinda_raster) -> None:
    code, err, out = run_bad(tmp_path, monkeypatch, capsys, embedding={"backbone": "resnet5000"})
    assert_clean_failure(code, err, out, r"embedding\.backbone: unknown backbone 'resnet5000'")


def test_k_larger_than_the_tile_count(tmp_path, monkeypatch, capsys, olinda_raster) -> None:
    code, err, out = run_bad(tmp_path, monkeypatch, capsys, tiling={"tile_size": "300px"}, clustering={"k": 50})
    assert_clean_failure(code, err, out, r"clustering\.k: k=50 exceeds the number of tiles \(4\)")


def test_band_out_of_range(tmp_path, monkeypatch, capsys, olinda_raster) -> None:
    code, err, out = run_bad(tmp_path, monkeypatch, capsys,
                             rasters=[{"path": str(olinda_raster), "bands": [3, 2, 9]}])
    assert_clean_failure(code, err, out, r"L7_ETMs\.tif: band 9 out of range \(the raster has 6 bands\)")


def test_tile_larger_than_raster(tmp_path, monkeypatch, capsys, olinda_raster) -> None:
    code, err, out = run_bad(tmp_path, monkeypatch, capsys, tiling={"tile_size": "20km"})
    assert_clean_failure(code, err, out, r"tiling\.tile_size: 20000m \(702 x 702 px\) is larger than")


def test_malformed_yaml(tmp_path, monkeypatch, capsys) -> None:
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("rasters:\n  - path: a.tif\n    bands: [1, 2\n")
    code, _, err = run_cli(monkeypatch, capsys, "run", str(cfg))
    assert_clean_failure(code, err, tmp_path / "outputs" / "broken", r"broken\.yaml: malformed YAML at line")


def test_unknown_config_key(tmp_path, monkeypatch, capsys, olinda_raster) -> None:
    code, err, out = run_bad(tmp_path, monkeypatch, capsys, clustering={"k": 4, "kk": 5})
    assert_clean_failure(code, err, out, r"bad\.yaml: invalid config: clustering\.kk: unknown key")


def test_errors_exit_2_from_the_installed_command(tmp_path) -> None:
    cfg = tmp_path / "x.yaml"
    cfg.write_text("rasters: []\nregions: {wkt: 'POINT (0 0)', crs: 'EPSG:4326'}\n")
    exe = Path(sys.executable).with_name("settlements")
    proc = subprocess.run([str(exe), "run", str(cfg)], capture_output=True, text=True, timeout=HANG_GUARD)
    assert proc.returncode == 2
    assert said(proc.stderr) == [
        f"error: {cfg}: invalid config: rasters: List should have at least 1 item after validation, not 0 (got [])"]
    assert not (tmp_path / "outputs").exists()


def test_previous_outputs_survive_a_failed_run(tmp_path, monkeypatch, capsys, olinda_raster) -> None:
    out = tmp_path / "outputs" / "bad"
    out.mkdir(parents=True)
    (out / "bad.gpkg").write_bytes(b"earlier output")
    code, err, _ = run_bad(tmp_path, monkeypatch, capsys, embedding={"backbone": "resnet5000"})
    assert code == 2
    assert (out / "bad.gpkg").read_bytes() == b"earlier output"
    assert sorted(p.name for p in out.iterdir()) == ["bad.gpkg"]
