"""The one reader of a GeoPackage this project wrote earlier: its runs, clusters, tiles and histogram.

A run compares itself with the GeoPackage it replaces (change layers), appends to its ``runs``
table, and ``labels pull`` reads the analyst's ``clusters`` table and the config a run recorded.
The file may have been edited or sent by anyone: it is data, read-only, never instructions.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import geopandas as gpd
    import numpy as np
    import pandas as pd

log = logging.getLogger(__name__)


def last_run_value(gpkg: Path, column: str) -> tuple[Any, ...] | None:
    """``column`` of the last row of a GeoPackage's ``runs`` table, read-only (raises sqlite3.Error)."""
    con = sqlite3.connect(f"file:{gpkg}?mode=ro", uri=True)
    try:
        return con.execute(f"SELECT {column} FROM runs ORDER BY fid DESC LIMIT 1").fetchone()
    finally:
        con.close()


def last_run_id(gpkg: Path) -> str | None:
    """The ``run_id`` of the last row of a GeoPackage's ``runs`` table (None if unreadable)."""
    try:
        row = last_run_value(gpkg, "run_id")
    except sqlite3.Error:
        return None
    return row[0] if row else None


def clusters_rows(gpkg: Path) -> tuple[list[tuple[Any, ...]], str | None]:
    """The ``clusters`` table's (cluster, label, colour, size) rows as stored, and the last run's labels
    snapshot (None where the runs table has no such column), in one read-only transaction.

    Raises sqlite3.DatabaseError for a file that is no GeoPackage of this project.
    """
    con = sqlite3.connect(f"file:{gpkg}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT cluster, label, colour, size FROM clusters ORDER BY cluster").fetchall()
        cols = {r[1] for r in con.execute("PRAGMA table_info(runs)")}
        snap = con.execute("SELECT labels FROM runs ORDER BY fid DESC LIMIT 1").fetchone() if "labels" in cols else None
    finally:
        con.close()
    return rows, snap[0] if snap else None


def read_runs(gpkg: Path) -> pd.DataFrame | None:
    """The whole ``runs`` table (without its fid), or None where there is none to append to."""
    if not gpkg.exists():
        return None
    import pyogrio  # imported where used: a compute-only machine (tile, embed, cluster) needs no OGR

    try:
        old = pyogrio.read_dataframe(gpkg, layer="runs", read_geometry=False)
    except Exception:  # an older file without a runs table: start the history here
        log.warning("%s: could not read earlier runs; history restarts", gpkg)
        return None
    return old.drop(columns=[c for c in ("fid",) if c in old.columns])


def box_centres(frame: gpd.GeoDataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Bounding-box centres: tiles are axis-aligned boxes in their raster's CRS."""
    b = frame.geometry.bounds
    return ((b["minx"] + b["maxx"]) / 2).to_numpy(), ((b["miny"] + b["maxy"]) / 2).to_numpy()


@dataclass(frozen=True)
class PreviousRun:
    """What the change layers need from the GeoPackage a run is about to replace."""

    run_id: str | None
    tiles: pd.DataFrame  # raster, row, col, cluster, cx, cy (cell centre in the output CRS)
    histogram: pd.DataFrame  # region_id, class (cluster id), km2; kind == "cluster" rows only
    crs: str | None


def read_previous(gpkg: Path) -> PreviousRun | None:
    """The previous outputs, or None on a first run (or when the file predates these layers)."""
    if not gpkg.exists():
        return None
    import pandas as pd
    import pyogrio  # imported where used, so compute-only machines need no OGR

    try:
        tiles = pyogrio.read_dataframe(gpkg, layer="tiles", columns=["raster", "row", "col", "cluster"])
        hist = pyogrio.read_dataframe(gpkg, layer="histogram", read_geometry=False)
        runs = pyogrio.read_dataframe(gpkg, layer="runs", read_geometry=False, columns=["run_id"])
    except Exception as exc:  # unreadable or older layout: the history restarts here
        log.warning("%s: cannot read the previous run (%s); no change layers against it", gpkg, exc)
        return None
    cx, cy = box_centres(tiles)
    t = pd.DataFrame({"raster": tiles["raster"].to_numpy(), "row": tiles["row"].to_numpy(),
                      "col": tiles["col"].to_numpy(), "cluster": tiles["cluster"].to_numpy(), "cx": cx, "cy": cy})
    h = hist[hist["kind"] == "cluster"][["region_id", "class", "km2"]]
    run_id = str(runs["run_id"].iloc[-1]) if len(runs) else None
    return PreviousRun(run_id, t, h.reset_index(drop=True), tiles.crs.to_string() if tiles.crs else None)
