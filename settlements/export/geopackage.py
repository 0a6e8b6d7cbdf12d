"""GeoPackage writing in layers: frames -> GeoPackage 1.2 tables, then default QGIS styles.

The file is built under a temporary name and renamed into place, so readers (and QGIS) never
see half a GeoPackage.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import pandas as pd

from ..store import atomic_path

GEOMETRY_COLUMN = "geom"


@dataclass(frozen=True)
class LayerStyle:
    layer: str
    name: str
    qml: str
    description: str = ""
    default: bool = True


def write_frames(path: Path, layers: dict[str, pd.DataFrame]) -> None:
    """Write each frame as a layer (spatial when it is a GeoDataFrame) into a new GeoPackage."""
    first = True
    for name, frame in layers.items():
        kwargs: dict = {"driver": "GPKG", "layer": name, "append": not first}
        if first:
            kwargs["dataset_options"] = {"VERSION": "1.2"}
        if isinstance(frame, gpd.GeoDataFrame):
            kwargs["layer_options"] = {"GEOMETRY_NAME": GEOMETRY_COLUMN, "SPATIAL_INDEX": "YES"}
            if frame.empty:  # GDAL cannot infer the type of an empty layer; ours are all polygons
                kwargs["geometry_type"] = "Polygon"
        import pyogrio  # imported where used, so compute-only machines need no OGR

        pyogrio.write_dataframe(frame, path, **kwargs)
        first = False


_STYLES_DDL = """
CREATE TABLE IF NOT EXISTS layer_styles (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  f_table_catalog TEXT(256), f_table_schema TEXT(256), f_table_name TEXT(256),
  f_geometry_column TEXT(256), styleName TEXT(30), styleQML TEXT, styleSLD TEXT,
  useAsDefault BOOLEAN, description TEXT, owner TEXT(30), ui TEXT(30),
  update_time DATETIME DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now'))
)"""


def write_styles(path: Path, styles: list[LayerStyle]) -> None:
    """Replace the ``layer_styles`` rows of these layers; QGIS loads the default one on open."""
    con = sqlite3.connect(path)
    try:
        with con:
            con.execute(_STYLES_DDL)
            con.execute(
                "INSERT OR IGNORE INTO gpkg_contents (table_name, data_type, identifier, description, last_change) "
                "VALUES ('layer_styles', 'attributes', 'layer_styles', '', strftime('%Y-%m-%dT%H:%M:%fZ','now'))"
            )
            for st in styles:
                if st.default:
                    con.execute("UPDATE layer_styles SET useAsDefault = 0 WHERE f_table_name = ?", (st.layer,))
                con.execute("DELETE FROM layer_styles WHERE f_table_name = ? AND styleName = ?", (st.layer, st.name))
                con.execute(
                    "INSERT INTO layer_styles (f_table_catalog, f_table_schema, f_table_name, f_geometry_column, "
                    "styleName, styleQML, styleSLD, useAsDefault, description, owner, ui) "
                    "VALUES ('', '', ?, ?, ?, ?, '', ?, ?, '', '')",
                    (st.layer, GEOMETRY_COLUMN, st.name, st.qml, int(st.default), st.description),
                )
    finally:
        con.close()


def write_geopackage(path: Path, layers: dict[str, pd.DataFrame], styles: list[LayerStyle]) -> None:
    """Write a complete GeoPackage atomically."""
    with atomic_path(path, suffix=".gpkg") as tmp:
        tmp.unlink()  # GDAL creates the file itself
        write_frames(tmp, layers)
        write_styles(tmp, styles)


def add_layers(path: Path, layers: dict[str, pd.DataFrame], styles: list[LayerStyle]) -> None:
    """Write (or replace) ``layers`` in an existing GeoPackage, then their default styles."""
    import pyogrio

    for name, frame in layers.items():
        kwargs: dict = {"driver": "GPKG", "layer": name}
        if isinstance(frame, gpd.GeoDataFrame):
            kwargs["layer_options"] = {"GEOMETRY_NAME": GEOMETRY_COLUMN, "SPATIAL_INDEX": "YES", "OVERWRITE": "YES"}
            if frame.empty:
                kwargs["geometry_type"] = "Polygon"
        else:
            kwargs["layer_options"] = {"OVERWRITE": "YES"}
        pyogrio.write_dataframe(frame, path, **kwargs)
    write_styles(path, styles)


def copy_geopackage(source: Path, target: Path) -> None:
    """A consistent copy of a GeoPackage, edits that QGIS holds in its write-ahead log included (SQLite's
    online backup); the source is only read."""
    from ..errors import OutputError

    try:
        src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
        try:
            dst = sqlite3.connect(target)
            try:
                src.backup(dst)
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as exc:
        raise OutputError(f"{source}: cannot copy the GeoPackage: {exc}") from None


def read_styles(path: Path, layers: list[str] | None = None) -> list[LayerStyle]:
    """The ``layer_styles`` rows of a GeoPackage (of ``layers`` only, when given), as written; [] without any.

    Read-only: the file may come from anyone; its styles are QGIS's data, carried or shown, never run.
    """
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return []
    try:
        rows = con.execute("SELECT f_table_name, styleName, styleQML, description, useAsDefault FROM layer_styles "
                           "ORDER BY id").fetchall()
    except sqlite3.Error:
        return []
    finally:
        con.close()
    return [LayerStyle(str(t), str(n), str(q or ""), str(d or ""), bool(u)) for t, n, q, d, u in rows
            if isinstance(t, str) and (layers is None or t in layers)]
