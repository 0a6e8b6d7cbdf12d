"""The joined tile tables: the work folder's tables of tiles, embeddings, clusters and regions, joined once.

Every command that reads tiles reads them here: the export stage (the ``tiles`` layer), training and
``predict`` (kept tiles in embedding order), ``similar`` and ``export-embeddings`` (the tiles layer's rows
by embedding row). It sits low in the import graph (above the stores and the labels, below every
product), so none of them imports another product for its tiles.
"""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pandas as pd

from .config import PipelineConfig
from .errors import StageError
from .export.layers import tile_regions, tiles_layer
from .labels import ClusterLabels, read_labels
from .rasters import RasterInfo, load_infos
from .store import Workspace, read_table


def kept_tiles(ws: Workspace) -> pd.DataFrame:
    """The tile table restricted to tiles that have an embedding, with their embedding row, in that order."""
    tiles = read_table(ws.tiles, "tile")
    if "ground_x" not in tiles.columns:
        raise StageError(f"{ws.tiles}: tiles of an older version (no ground position); run the pipeline again")
    meta = read_table(ws.embedded, "embed")
    t = tiles.merge(meta[["tile_id", "kept", "emb_row", "valid_cell"]], on="tile_id")
    return t[t["kept"]].sort_values("emb_row").reset_index(drop=True)


def tiles_frame(cfg: PipelineConfig, ws: Workspace, infos: list[RasterInfo], labels: ClusterLabels,
                regions: gpd.GeoDataFrame) -> tuple[pd.DataFrame, gpd.GeoDataFrame]:
    """Every tile with its embedding row, validity, cluster, label and region; and the ``tiles`` layer: the
    kept tiles' cells in ``output.crs`` with the columns a person reads."""
    tiles = read_table(ws.tiles, "tile")
    meta = read_table(ws.embedded, "embed")
    assign = read_table(ws.assignments, "cluster")
    shares = read_table(ws.shares, "tile")
    t = tiles.merge(meta, on="tile_id").merge(assign, on="tile_id", how="left")
    t["cluster"] = t["cluster"].fillna(-1).astype(int)
    t["label"] = [labels.label_of(c) if c >= 0 else None for c in t["cluster"]]
    t = t.merge(tile_regions(shares, regions), on="tile_id", how="left")
    layer = tiles_layer(t[t["kept"]], infos, cfg.output.crs, lambda k, info: {
        "tile_id": k["tile_id"].to_numpy(), "cluster": k["cluster"].to_numpy().astype(np.int32),
        "label": k["label"].to_numpy(), "distance": k["distance"].to_numpy().astype(np.float64),
        "region_id": k["region_id"].to_numpy(), "raster": info.path.name,
        "row": k["row"].to_numpy(), "col": k["col"].to_numpy(),
        "valid_fraction": k["valid_cell"].to_numpy().astype(np.float64),
    })
    return t, layer


def tiles_by_row(cfg: PipelineConfig, ws: Workspace) -> gpd.GeoDataFrame:
    """Every kept tile as the ``tiles`` layer shows it (cell polygon in ``output.crs``, cluster, label,
    region), with its ``emb_row``, in ``emb_row`` order."""
    labels = read_labels(ws.labels, cfg.clustering.k)
    regions = gpd.read_parquet(ws.regions)
    t, layer = tiles_frame(cfg, ws, load_infos(ws), labels, regions)
    layer = layer.merge(t[["tile_id", "emb_row"]], on="tile_id", how="left")
    return layer.sort_values("emb_row", kind="stable").reset_index(drop=True)
