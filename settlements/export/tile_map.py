"""The one writer of a labelled-tile map: tile layer, region layer, histograms, COG, styles and pictures.

Three products are such maps: the cluster map (``settlements run``: each tile labelled by its cluster's
name), the supervised map (``predict``: by its predicted class) and a similarity result (``similar``:
similar or not). Each builds a :class:`TileMap` with :func:`tile_map` from the joined tile tables
(:mod:`settlements.tile_tables`) and one :class:`~settlements.palette.Legend`, and writes it with
:func:`write_tile_map` into the files :mod:`settlements.products` names: so a label has one colour,
one raster code and one set of columns in every output of a pipeline, and the numbers are counted
one way (:func:`settlements.histograms.region_histograms`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import pandas as pd
from pyproj import CRS

from ..errors import OutputError
from ..histograms import region_histograms
from ..palette import Legend
from ..products import MapFiles
from . import plots
from .geopackage import LayerStyle, add_layers, write_geopackage
from .layers import regions_layer
from .raster import Cells, code_grid, tile_cells, write_cluster_map


@dataclass(frozen=True)
class MapLayers:
    """The names of a map's tables in its GeoPackage (``histogram`` None: no long table, the numbers are in
    the region layer alone)."""

    tiles: str
    regions: str
    histogram: str | None = None


CLUSTER_LAYERS = MapLayers("tiles", "regions", "histogram")
PREDICTED_LAYERS = MapLayers("predicted_tiles", "predicted_regions", "predicted_histogram")


def similar_layers(name: str) -> MapLayers:
    return MapLayers(f"similar_{name}", f"similar_{name}_regions")


@dataclass(frozen=True)
class TileMap:
    """A labelled-tile map, ready to write: every tile of ``tiles`` holds one label of ``legend``.

    ``tiles``: the tile layer (cells in the output CRS, the label in ``label_field``); ``regions``: the
    region layer with per label ``n_``, ``frac_`` and ``km2_`` columns and the dominant label;
    ``histogram``: the same numbers in long form; ``cells``: each kept tile's stride cell with its
    label's code, for the COG; ``titles``: of the map picture and of the histograms picture.
    """

    legend: Legend
    tiles: gpd.GeoDataFrame
    regions: gpd.GeoDataFrame
    histogram: pd.DataFrame
    cells: list[Cells]
    titles: tuple[str, str]
    label_field: str = "label"


def tile_map(every: pd.DataFrame, layer: gpd.GeoDataFrame, shares: pd.DataFrame, regions: gpd.GeoDataFrame,
             crss: list[CRS], crs: str, legend: Legend, titles: tuple[str, str], *, clusters: int = 0,
             label_field: str = "label", dominant_field: str = "dominant_label") -> TileMap:
    """The map of ``every`` tile of the tile table (tile_id, kept, valid_cell, label, raster and cell bounds;
    ``cluster`` too with ``clusters``) over ``regions``, with ``layer`` (the kept tiles as a person reads
    them, built by the product) as its tile layer.

    Areas and counts are :func:`~settlements.histograms.region_histograms`'; ``clusters`` > 0 adds them per
    cluster (the cluster map's ``n_c0``, ... and ``histogram`` rows of kind ``cluster``).
    """
    wide, long = region_histograms(every, shares, regions.drop(columns="geometry"), legend.keys, clusters)
    if dominant_field != "dominant_label":
        wide = wide.rename(columns={"dominant_label": dominant_field})
    if not clusters:
        long = long.drop(columns="kind")
    return TileMap(legend, layer, regions_layer(wide, regions, crs), long, tile_cells(every, crss, legend), titles,
                   label_field)


def write_tile_map(m: TileMap, files: MapFiles, layers: MapLayers, styles: list[LayerStyle], max_regions: int,
                   extra: dict[str, pd.DataFrame] | None = None, into_existing: bool = False) -> None:
    """Write ``m`` to ``files`` (what they name: paths in a commit's staging folder): its layers (and
    ``extra`` ones) with ``styles`` into a new GeoPackage, or added to the existing one
    (``into_existing``), the COG of label codes with its colour table and sidecars, and the pictures."""
    tables: dict[str, pd.DataFrame] = {layers.tiles: m.tiles, layers.regions: m.regions}
    if layers.histogram is not None:
        tables[layers.histogram] = m.histogram
    tables.update(extra or {})
    if into_existing:
        add_layers(files.gpkg, tables, styles)
    else:
        write_geopackage(files.gpkg, tables, styles)
    if files.raster is not None:
        write_cluster_map(files.raster, code_grid(m.cells), m.legend)
    if files.picture is not None:
        plots.label_map(files.picture, m.tiles.rename(columns={m.label_field: "label"}), m.regions, m.legend,
                        m.titles[0])
    if files.histograms is not None:
        plots.histograms(files.histograms, m.regions, m.legend, max_regions, m.titles[1])


@contextmanager
def named_as_final(stage: Path, folder: Path) -> Iterator[None]:
    """Errors of writes into a staging folder name the output, not the hidden folder it is built in."""
    try:
        yield
    except OutputError as exc:
        raise OutputError(str(exc).replace(str(stage), str(folder))) from None
