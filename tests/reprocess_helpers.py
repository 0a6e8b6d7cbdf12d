"""Helpers for the reprocessing tests: Kampala chip pipelines, output snapshots, GeoPackage content."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pyogrio
import yaml

from .conftest import scene, write_pipeline

CONTENT_LAYERS = ["tiles", "regions", "clusters", "histogram", "changes", "tile_changes"]
# runs columns that legitimately differ between two runs of the same work: clock times, the
# machine's timings, paths inside the config, and how much came from the cache.
RUN_VOLATILE = {"run_id", "finished_utc", "started_utc", "duration_s", "stage_seconds", "config", "config_path",
                "labels_path", "state_key",
                "previous_run_id", "tiles_embedded", "tiles_reused", "fid"}


def chips() -> list[Path]:
    folder = scene("kampala_oam")
    return sorted(folder.glob("OAM-*-19.tif"))


def kampala_chips(tmp: Path, n: int, name: str = "ka", **overrides: object) -> Path:
    """A pipeline over the first ``n`` Kampala drone chips, small enough for tests."""
    rasters = [{"path": str(p.resolve()), "bands": [1, 2, 3], "scaling": {"method": "percentile", "low": 1,
                                                                            "high": 99}} for p in chips()[:n]]
    settings = {"embedding": {"input_size": 32, "num_workers": 0}, "clustering": {"k": 4, "seed": 0}}
    settings.update(overrides)
    return write_pipeline(tmp, name, "kampala", rasters=rasters, **settings)


def name_clusters(labels_path: Path, names: dict[int, str]) -> None:
    """What the analyst does: give clusters names in the labels YAML."""
    data = yaml.safe_load(labels_path.read_text())
    for cid, name in names.items():
        data["clusters"][cid]["name"] = name
    labels_path.write_text(yaml.safe_dump(data, sort_keys=False))


def leftovers(*folders: Path) -> list[Path]:
    """Temporary files, staging folders and commit journals a command left behind in ``folders``."""
    return sorted(p for f in folders if f.exists()
                  for p in [*f.rglob(".settlements-tmp-*"), *f.rglob(".settlements-commit.json")])


def session_processes(sid: int) -> list[int]:
    """Live processes of session ``sid`` (a command started with ``start_new_session``, and its children)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        state, _ppid, _pgrp, session = text[text.rindex(")") + 2:].split()[:4]
        if int(session) == sid and state not in "ZX":
            pids.append(int(stat.parent.name))
    return pids


def snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every visible file in a folder (hidden temp files and staging folders excluded)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}


def layer(gpkg: Path, name: str) -> pd.DataFrame:
    return pyogrio.read_dataframe(gpkg, layer=name)


def assert_same_content(a: Path, b: Path) -> None:
    """Two output folders hold the same results: layer rows, styles, runs (bar clocks), picture pixels."""
    ga, gb = next(a.glob("*.gpkg")), next(b.glob("*.gpkg"))
    assert ga.name == gb.name
    for name in CONTENT_LAYERS:
        # changes.previous_run names the previous run by its clock time
        fa, fb = (layer(g, name).drop(columns=["previous_run"], errors="ignore") for g in (ga, gb))
        geo = "geometry" in fa.columns
        pd.testing.assert_frame_equal(fa.drop(columns="geometry") if geo else fa,
                                      fb.drop(columns="geometry") if geo else fb, check_exact=False, rtol=1e-6)
        if geo:
            assert fa.geometry.geom_equals_exact(fb.geometry, tolerance=1e-9).all(), name
    ra = pyogrio.read_dataframe(ga, layer="runs", read_geometry=False)
    rb = pyogrio.read_dataframe(gb, layer="runs", read_geometry=False)
    keep = [c for c in ra.columns if c not in RUN_VOLATILE]
    pd.testing.assert_frame_equal(ra[keep], rb[keep])
    assert ((ra["tiles_embedded"] + ra["tiles_reused"]).tolist()
            == (rb["tiles_embedded"] + rb["tiles_reused"]).tolist())
    assert styles(ga) == styles(gb)
    for png in ("atlas.png", "histograms.png", "map.png"):
        assert np.array_equal(matplotlib.image.imread(a / png), matplotlib.image.imread(b / png)), png


def styles(gpkg: Path) -> list[tuple]:
    con = sqlite3.connect(gpkg)
    try:
        return con.execute("SELECT f_table_name, styleName, styleQML, useAsDefault FROM layer_styles "
                           "ORDER BY f_table_name, styleName").fetchall()
    finally:
        con.close()


def integrity_ok(gpkg: Path) -> bool:
    con = sqlite3.connect(gpkg)
    try:
        return con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        con.close()
