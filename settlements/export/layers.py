"""Tile and region layers as GeoPackages hold them: the cluster map's (``tiles``, ``regions``) and the
supervised map's (``predicted_tiles``, ``predicted_regions``) are built by the same functions.

A tile is drawn as its stride cell (a box in its raster's CRS), so tiles of one layer never overlap;
a tile's region is the one holding most of its cell.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import geopandas as gpd
import pandas as pd
import shapely

from ..rasters import RasterInfo


def tile_regions(shares: pd.DataFrame, regions: pd.DataFrame) -> pd.DataFrame:
    """``tile_id`` and ``region_id`` of the region holding most of each tile's cell (tiles in no region left out)."""
    best = shares.sort_values("area_m2", ascending=False).drop_duplicates("tile_id")
    return best.merge(regions[["region", "region_id"]], on="region")[["tile_id", "region_id"]]


def tiles_layer(tiles: pd.DataFrame, infos: list[RasterInfo], crs: str,
                attributes: Callable[[pd.DataFrame, RasterInfo], Any]) -> gpd.GeoDataFrame:
    """One polygon per row of ``tiles`` (columns raster, minx, miny, maxx, maxy: its cell in its raster's
    CRS), in ``crs``, with the columns ``attributes(rows of one raster, that raster)`` gives (a mapping of
    arrays, or a frame with a fresh index)."""
    parts = []
    for r, info in enumerate(infos):
        k = tiles[tiles["raster"] == r]
        geom = shapely.box(*(k[c].to_numpy() for c in ("minx", "miny", "maxx", "maxy")))  # arrays: no index alignment
        parts.append(gpd.GeoDataFrame(attributes(k, info), geometry=geom, crs=info.crs).to_crs(crs))
    return gpd.GeoDataFrame(pd.concat(parts, ignore_index=True), crs=crs)


def regions_layer(wide: pd.DataFrame, regions: gpd.GeoDataFrame, crs: str) -> gpd.GeoDataFrame:
    """The region polygons in ``crs`` with their histogram columns (``wide``, one row per region, in order)."""
    return gpd.GeoDataFrame(wide.drop(columns=["region"]), geometry=regions.geometry.values,
                             crs=regions.crs).to_crs(crs)
