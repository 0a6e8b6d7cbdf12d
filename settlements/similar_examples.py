"""Which tiles an analyst's examples (or negatives) name, and the layers an analyst made, which every run keeps.

A drawn layer is data, never instructions: only its geometries are read (and its CRS), whatever
else the file holds. A tile is under a polygon when its cell centre lies inside it (as polygon
training labels do); a geometry that holds no cell centre (a point, a small polygon) names the
tile whose cell holds its representative point, so a click on a tile is enough.

What the analyst made in the run's GeoPackage (the drawn ``examples`` and ``negatives``, and the
``similar_*`` results of earlier queries) is carried into every GeoPackage a later run writes
(:func:`analyst_layers`), whatever changed: new inputs, settings, labels or a refit.
"""

from __future__ import annotations

import re
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

from .errors import ExamplesError
from .export.geopackage import LayerStyle, read_styles
from .export.styles import outline_qml
from .palette import DRAWN_COLOURS
from .rasters import RasterInfo

#: Layers a run creates empty in its GeoPackage, for the analyst to draw in.
DRAWN_LAYERS = ("examples", "negatives")
#: The start of the name of every result layer ``settlements similar`` writes into the run's GeoPackage.
SIMILAR_PREFIX = "similar_"

_IDS = re.compile(r"^\s*\d+(\s*,\s*\d+)*\s*$")


def tile_ids_in(text: str) -> list[int] | None:
    """``12,45,78`` as tile ids; None when ``text`` is not such a list (a file name)."""
    if not _IDS.match(text):
        return None
    return [int(v) for v in text.split(",")]


def _layer_option(option: str) -> str:
    """The option naming the layer of ``option``'s file: --layer for --examples, --negatives-layer."""
    return "--layer" if option == "--examples" else f"{option}-layer"


def _layer_of(path: Path, layer: str | None, default: str, option: str) -> str:
    import pyogrio

    try:
        layers = [str(row[0]) for row in pyogrio.list_layers(path)]
    except Exception as exc:  # pyogrio's DataSourceError and friends
        raise ExamplesError(f"{path}: cannot read {option}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    if layer is not None:
        if layer not in layers:
            raise ExamplesError(f"{path}: no layer {layer!r} (layers: {', '.join(layers) or 'none'})")
        return layer
    if default in layers:
        return default
    if len(layers) == 1:
        return layers[0]
    raise ExamplesError(f"{path}: {len(layers)} layers and none named {default!r}; choose one with "
                        f"{_layer_option(option)} (layers: {', '.join(layers)})")


def read_drawn(path: Path, layer: str | None, default: str, option: str) -> tuple[gpd.GeoSeries, str]:
    """The geometries of a drawn layer (empty and NULL ones dropped) and the layer's name."""
    import pyogrio

    if not path.is_file():
        raise ExamplesError(f"{path}: {option}: file not found (give a vector file or tile ids such as 12,45)")
    name = _layer_of(path, layer, default, option)
    try:
        frame = pyogrio.read_dataframe(path, layer=name, columns=[])
    except Exception as exc:
        raise ExamplesError(f"{path}: cannot read layer {name!r}: {str(exc).splitlines()[0]}") from None
    if not isinstance(frame, gpd.GeoDataFrame) or frame.geometry.name not in frame:
        raise ExamplesError(f"{path}: layer {name!r} has no geometry")
    if frame.crs is None:
        raise ExamplesError(f"{path}: layer {name!r} has no CRS")
    geoms = frame.geometry[frame.geometry.notna() & ~frame.geometry.is_empty]
    if geoms.empty:
        raise ExamplesError(f"{path}: layer {name!r} holds no geometry; draw polygons in it (QGIS: toggle editing, "
                            "add polygon features, save) and run again")
    return gpd.GeoSeries(shapely.make_valid(geoms.values), crs=frame.crs), name


def tiles_under(geoms: gpd.GeoSeries, infos: list[RasterInfo], tiles: pd.DataFrame) -> np.ndarray:
    """Ids of the kept tiles under ``geoms`` (see the module), sorted; tiles of every raster CRS."""
    crs_code, _ = pd.factorize(np.asarray([info.crs_wkt for info in infos])[tiles["raster"].to_numpy()])
    found: list[np.ndarray] = []
    for _, t in tiles.groupby(crs_code, sort=True):
        g = geoms.to_crs(infos[int(t["raster"].iloc[0])].crs).values
        cells = shapely.box(*(t[c].to_numpy() for c in ("minx", "miny", "maxx", "maxy")))
        ids = t["tile_id"].to_numpy()
        hit = shapely.STRtree(shapely.centroid(cells)).query(g, predicate="intersects")  # (geometry, cell) pairs
        found.append(ids[hit[1]])
        # geometries without a cell centre: the cell holding their representative point
        lonely = np.setdiff1d(np.arange(len(g)), hit[0])
        if len(lonely):
            pts = shapely.point_on_surface(g[lonely])
            at = shapely.STRtree(cells).query(pts, predicate="intersects")
            found.append(ids[at[1]])
    return np.unique(np.concatenate(found)) if found else np.empty(0, np.int64)


def select_tiles(spec: str, layer: str | None, default_layer: str, option: str, infos: list[RasterInfo],
                 tiles: pd.DataFrame) -> tuple[np.ndarray, str]:
    """The kept tiles ``spec`` names (a vector file, or tile ids), and a name for them (the layer's, or
    ``tiles``). Raises :class:`ExamplesError` naming the file or option when it names none."""
    ids = tile_ids_in(spec)
    path = Path(spec)
    if ids is not None and path.exists():
        raise ExamplesError(f"{option}: {spec!r} is both a file and a list of tile ids; give the file as ./{spec}")
    if ids is not None:
        if layer is not None:
            raise ExamplesError(f"{_layer_option(option)}: only for a vector file, not for tile ids ({spec})")
        kept = set(tiles["tile_id"].tolist())
        missing = [i for i in ids if i not in kept]
        if missing:
            raise ExamplesError(f"{option}: tile(s) {', '.join(map(str, missing[:10]))} are not kept tiles of this run "
                                "(see the tiles layer's tile_id)")
        return np.unique(np.asarray(ids, dtype=np.int64)), "tiles"
    geoms, name = read_drawn(path, layer, default_layer, option)
    found = tiles_under(geoms, infos, tiles)
    if len(found) == 0:
        raise ExamplesError(f"{path}: layer {name!r}: no kept tile under its {len(geoms)} geometr"
                            f"{'y' if len(geoms) == 1 else 'ies'} (check the extent and CRS)")
    return found, name


def drawn_layers(previous: Path, crs: str) -> dict[str, gpd.GeoDataFrame]:
    """The drawn layers for a run's new GeoPackage: those of ``previous`` (the one it replaces), geometry and
    ``note`` only, in ``crs``; empty ones where it has none. What an analyst drew is never dropped: a layer
    that cannot be read stops the run with one line naming it."""
    import pyogrio

    existing = _layers_of(previous)
    out = {}
    for name in DRAWN_LAYERS:
        frame = gpd.GeoDataFrame({"note": pd.Series([], dtype="string")}, geometry=gpd.GeoSeries([], crs=crs),
                                 crs=crs)
        if name in existing:
            try:
                fields = pyogrio.read_info(previous, layer=name)["fields"].tolist()
                old = pyogrio.read_dataframe(previous, layer=name, columns=["note"] if "note" in fields else [])
                if old.crs is None and len(old):
                    raise ValueError("the layer has no CRS")
            except Exception as exc:
                raise ExamplesError(f"{previous}: layer {name!r} cannot be carried into the new outputs "
                                    f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); repair or "
                                    "delete the layer, then run again") from None
            old = old[old.geometry.notna() & ~old.geometry.is_empty]
            if len(old):
                note = old["note"] if "note" in old else pd.Series([None] * len(old))
                text = [None if pd.isna(v) else str(v) for v in note]
                frame = gpd.GeoDataFrame({"note": pd.Series(text, dtype="string")},
                                         geometry=old.geometry.to_crs(crs).values, crs=crs)
        out[name] = frame
    return out


def drawn_styles() -> list[LayerStyle]:
    """The layers an analyst draws in: outlines only, in colours no label takes."""
    return [LayerStyle(name, f"settlements {name}", outline_qml(DRAWN_COLOURS[name], 0.6, {"note": "Note"}),
                       f"draw {name} for `settlements similar` here") for name in DRAWN_LAYERS]


def _layers_of(gpkg: Path) -> list[str]:
    import pyogrio

    if not gpkg.exists():
        return []
    try:
        return [str(row[0]) for row in pyogrio.list_layers(gpkg)]
    except Exception:  # not a GeoPackage we can read: the run reports (and replaces) it elsewhere
        return []


def similar_results(previous: Path, crs: str) -> tuple[dict[str, gpd.GeoDataFrame], list[LayerStyle]]:
    """The result layers of earlier ``similar`` queries in ``previous`` (every column, in ``crs``) with their
    styles: kept as they were found (their scores are those of the embeddings of their day). A layer that
    cannot be read stops the run with one line naming it: an analyst's result is never dropped."""
    import pyogrio

    names = [name for name in _layers_of(previous) if name.startswith(SIMILAR_PREFIX)]
    out: dict[str, gpd.GeoDataFrame] = {}
    for name in names:
        try:
            frame = pyogrio.read_dataframe(previous, layer=name)
            if not isinstance(frame, gpd.GeoDataFrame) or frame.crs is None:
                raise ValueError("the layer has no geometry or no CRS")
            out[name] = frame.to_crs(crs)
        except Exception as exc:
            raise ExamplesError(f"{previous}: layer {name!r} cannot be carried into the new outputs "
                                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); repair or "
                                "delete the layer, then run again") from None
    return out, read_styles(previous, names)


def analyst_layers(previous: Path, crs: str) -> tuple[dict[str, gpd.GeoDataFrame], list[LayerStyle]]:
    """Every layer the analyst made in ``previous`` (the GeoPackage a run replaces), for the new one, with
    its styles: the drawn layers (:func:`drawn_layers`, empty where there are none yet), then the results of
    ``similar``."""
    results, styles = similar_results(previous, crs)
    return {**drawn_layers(previous, crs), **results}, [*drawn_styles(), *styles]


def analyst_layer_names(gpkg: Path) -> list[str]:
    """The layers of ``gpkg`` the analyst made: the drawn ones, then the ``similar`` results."""
    names = _layers_of(gpkg)
    return [n for n in DRAWN_LAYERS if n in names] + [n for n in names if n.startswith(SIMILAR_PREFIX)]
