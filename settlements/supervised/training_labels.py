"""Training labels per tile from one :class:`~settlements.config.LabelSource`.

Every function returns a frame ``tile_id, class`` over kept (embedded) tiles only; tiles without
a class are simply absent.
"""

from __future__ import annotations

import logging

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import shapely

from ..config import LabelSource, PipelineConfig
from ..errors import ConfigError
from ..labels import read_labels
from ..palette import default_cluster_name
from ..rasters import RasterInfo, load_infos
from ..store import Workspace, read_table, workspace
from ..tile_tables import kept_tiles
from .raster_labels import raster_labels
from .reference import spectral_labels

log = logging.getLogger(__name__)


def cluster_labels(cfg: PipelineConfig, ws: Workspace, src: LabelSource) -> pd.DataFrame:
    """Each tile takes its cluster's name; unnamed clusters and ``exclude`` names give no label."""
    assign = read_table(ws.assignments, "cluster")
    names = read_labels(cfg.labels_path, cfg.clustering.k)
    label = assign["cluster"].map(names.label_of)
    keep = ~label.isin(set(src.exclude)) & (label != assign["cluster"].map(default_cluster_name))
    if src.max_distance_quantile is not None:
        limit = assign.groupby("cluster")["distance"].transform(lambda d: d.quantile(src.max_distance_quantile))
        keep &= assign["distance"] <= limit
    out = pd.DataFrame({"tile_id": assign["tile_id"].to_numpy(), "class": label.to_numpy()})[keep.to_numpy()]
    if out.empty:
        raise ConfigError(f"{cfg.labels_path}: no cluster has a name yet (name them, or use another label source)")
    return out.reset_index(drop=True)


def read_polygons(src: LabelSource) -> gpd.GeoDataFrame:
    """The labelled polygon layer, checked: it exists, has a CRS and the class column."""
    assert src.path is not None  # the config validator requires it
    if not src.path.exists():
        raise ConfigError(f"{src.path}: labelled polygon file not found")
    try:
        gdf = pyogrio.read_dataframe(src.path, layer=src.layer)
    except Exception as exc:  # pyogrio raises DataSourceError, DataLayerError, ...
        raise ConfigError(f"{src.path}: cannot read polygons: {str(exc).splitlines()[0]}") from None
    if src.class_field not in gdf.columns:
        raise ConfigError(f"{src.path}: training.labels.class_field: no column {src.class_field!r} "
                          f"(columns: {', '.join(c for c in gdf.columns if c != 'geometry')})")
    if gdf.crs is None:
        raise ConfigError(f"{src.path}: polygon layer has no CRS")
    gdf = gdf[gdf[src.class_field].notna() & gdf.geometry.notna()]
    gdf = gdf[gdf.geom_type.isin(["Polygon", "MultiPolygon"])]
    if gdf.empty:
        raise ConfigError(f"{src.path}: no polygon with a value in {src.class_field!r}")
    gdf = gdf.assign(geometry=shapely.make_valid(gdf.geometry.values))
    return gdf[[src.class_field, "geometry"]].rename(columns={src.class_field: "class"})


def polygon_labels(infos: list[RasterInfo], tiles: pd.DataFrame, src: LabelSource) -> pd.DataFrame:
    """Class of the polygon covering each tile's centre, or covering most (> half) of its cell."""
    polys = read_polygons(src)
    polys = polys.assign(**{"class": polys["class"].astype(str)})
    # the tiles of all rasters in one CRS at once (many files of one scene: one pass, not one per file)
    crs_code, _ = pd.factorize(np.asarray([info.crs_wkt for info in infos])[tiles["raster"].to_numpy()])
    parts = []
    for _, t in tiles.groupby(crs_code, sort=True):
        p = polys.to_crs(infos[int(t["raster"].iloc[0])].crs)
        # arrays, not the group's columns: a Series would keep the group's index, and the frames below
        # (indexed from 0) would align all but the first group's geometries to nothing
        cells = shapely.box(*(t[c].to_numpy() for c in ("minx", "miny", "maxx", "maxy")))
        if src.rule == "centre":
            pts = gpd.GeoDataFrame({"tile_id": t["tile_id"].to_numpy()}, geometry=shapely.centroid(cells), crs=p.crs)
            hit = gpd.sjoin(pts, p, predicate="within", how="inner").drop_duplicates("tile_id")
            parts.append(hit[["tile_id", "class"]])
        else:
            boxes = gpd.GeoDataFrame({"tile_id": t["tile_id"].to_numpy(), "cell_m2": shapely.area(cells)},
                                     geometry=cells, crs=p.crs)
            near = p.iloc[np.unique(p.sindex.query(cells, predicate="intersects")[1])]  # polygons over these tiles
            inter = gpd.overlay(boxes, near, how="intersection", keep_geom_type=True)
            inter["share"] = inter.area / inter["cell_m2"]
            by = inter.groupby(["tile_id", "class"], as_index=False)["share"].sum()
            best = by.sort_values("share", ascending=False).drop_duplicates("tile_id")
            parts.append(best[best["share"] > 0.5][["tile_id", "class"]])
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({"tile_id": [], "class": []})
    if out.empty:
        raise ConfigError(f"{src.path}: no labelled polygon covers any tile (check the extent and CRS)")
    return out.astype({"tile_id": np.int64}).reset_index(drop=True)


def tile_labels(cfg: PipelineConfig, src: LabelSource) -> pd.DataFrame:
    """``tile_id, class`` for the kept tiles that ``src`` labels."""
    ws = workspace(cfg)
    tiles = kept_tiles(ws)
    if src.source == "clusters":
        out = cluster_labels(cfg, ws, src)
    elif src.source == "polygons":
        out = polygon_labels(load_infos(ws), tiles, src)
    elif src.source == "raster":
        out = raster_labels(load_infos(ws), tiles, src)
    else:
        out = spectral_labels(load_infos(ws), tiles, src)
    out = out[out["tile_id"].isin(tiles["tile_id"])].reset_index(drop=True)
    out = pd.DataFrame({"tile_id": out["tile_id"].to_numpy(np.int64),
                        "class": np.asarray(out["class"].astype(str), dtype=object)})
    log.info("training labels (%s): %d tiles, %s", src.source, len(out), out["class"].value_counts().to_dict())
    return out
