"""``settlements export-embeddings``: every kept tile's embedding with its place, for other tools.

The ecosystem exchanges embeddings as GeoParquet, one row per chip: geometry plus a vector (DuckDB
queries it, lonboard maps it, GeoPandas reads it). ``geoparquet`` writes that file: ``tile_id``,
``raster`` (file name), grid ``row``/``col``, ``cluster``, ``label``, ``region_id``, ``embedding`` as
a fixed-size list of float32, the cell polygon as WKB ``geometry`` in ``output.crs`` and a ``bbox``
struct, with GeoParquet 1.1 metadata (CRS as PROJJSON, the bbox covering). ``npy`` writes the same
table without the vectors plus an ``(n, dim)`` float32 ``.npy`` whose row i is the table's row i.

Rows are written in row groups read from ``embeddings.npy`` block by block: the vectors are never
all in memory (a 30k x 30k raster in 32 px tiles is 4.5 GB of them).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import shapely
from pyproj import CRS
from tqdm.auto import tqdm

from ..config import ExportFormat, PipelineConfig
from ..embedding.cache import NpyRows
from ..errors import StageError
from ..labels import read_labels
from ..rasters import load_infos
from ..reprocess import pipeline_lock
from ..stages.export import tiles_frame
from ..store import Workspace, atomic_path, workspace

log = logging.getLogger(__name__)

#: GeoParquet version written (1.1: the ``bbox`` covering column).
GEOPARQUET_VERSION = "1.1.0"
#: Rows per row group: about 40 MB of 1280-d float32 vectors, small enough to read back one at a time.
ROW_GROUP_ROWS = 8192

#: Columns of the table, besides the embedding, geometry and bbox.
TABLE_COLUMNS = ["tile_id", "raster", "row", "col", "cluster", "label", "region_id"]


def geo_metadata(crs: CRS, bounds: tuple[float, float, float, float], geometry_types: list[str]) -> dict:
    """The ``geo`` file metadata of GeoParquet 1.1: WKB geometry, CRS as PROJJSON, bbox and its covering."""
    return {"version": GEOPARQUET_VERSION, "primary_column": "geometry",
            "columns": {"geometry": {
                "encoding": "WKB", "geometry_types": geometry_types, "crs": crs.to_json_dict(),
                "bbox": [float(v) for v in bounds],
                "covering": {"bbox": {k: ["bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}}}}}


def _bbox_type() -> pa.DataType:
    return pa.struct([(k, pa.float64()) for k in ("xmin", "ymin", "xmax", "ymax")])


def arrow_schema(table: pd.DataFrame, dim: int | None, crs: CRS, bounds: tuple[float, float, float, float]
                 ) -> pa.Schema:
    """The file's schema: the table's columns, ``embedding`` (fixed-size list of float32, when ``dim``),
    WKB ``geometry`` and the ``bbox`` struct, with the GeoParquet metadata."""
    fields = [pa.field("tile_id", pa.int64(), nullable=False), pa.field("raster", pa.string()),
              pa.field("row", pa.int64()), pa.field("col", pa.int64()), pa.field("cluster", pa.int32()),
              pa.field("label", pa.string()), pa.field("region_id", pa.string())]
    if dim is not None:
        fields.append(pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False))
    fields += [pa.field("geometry", pa.binary()), pa.field("bbox", _bbox_type())]
    meta = geo_metadata(crs, bounds, ["Polygon"])
    return pa.schema(fields, metadata={b"geo": json.dumps(meta).encode()})


def arrow_batch(frame: gpd.GeoDataFrame, vectors: np.ndarray | None, schema: pa.Schema) -> pa.RecordBatch:
    """One row group: the frame's columns, its vectors and geometries as Arrow arrays."""
    geoms = frame.geometry.values
    b = shapely.bounds(np.asarray(geoms))
    bbox = pa.StructArray.from_arrays([pa.array(b[:, i]) for i in range(4)], names=["xmin", "ymin", "xmax", "ymax"])
    region = frame["region_id"]
    arrays: list[pa.Array] = [
        pa.array(frame["tile_id"].to_numpy(np.int64)), pa.array(frame["raster"].astype(str).to_list()),
        pa.array(frame["row"].to_numpy(np.int64)), pa.array(frame["col"].to_numpy(np.int64)),
        pa.array(frame["cluster"].to_numpy(np.int32)),
        pa.array(frame["label"].to_list(), type=pa.string()),
        pa.array([None if pd.isna(v) else str(v) for v in region], type=pa.string()),
    ]
    if vectors is not None:
        flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel())
        arrays.append(pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]))
    arrays += [pa.array(shapely.to_wkb(np.asarray(geoms)), type=pa.binary()), bbox]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def write_geoparquet(target: Path, frame: gpd.GeoDataFrame, embeddings: NpyRows | None,
                     block_rows: int | None = None) -> int:
    """Write ``frame`` (one row per embedding row, in ``emb_row`` order) with its vectors read in blocks
    from ``embeddings`` (None: the table alone); atomically. Returns the row count."""
    crs = CRS.from_user_input(frame.crs)
    bounds = tuple(float(v) for v in frame.total_bounds) if len(frame) else (0.0, 0.0, 0.0, 0.0)
    dim = None if embeddings is None else embeddings.shape[1]
    schema = arrow_schema(frame, dim, crs, bounds)  # type: ignore[arg-type]
    rows = frame["emb_row"].to_numpy(np.int64)
    block_rows = block_rows or ROW_GROUP_ROWS
    with atomic_path(target, suffix=".parquet") as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for s in tqdm(range(0, len(frame), block_rows), desc="export", unit="block", disable=None):
            e = min(s + block_rows, len(frame))
            vectors = None
            if embeddings is not None:  # rows in order: one contiguous read
                vectors = embeddings[slice(int(rows[s]), int(rows[e - 1]) + 1)] \
                    if rows[e - 1] - rows[s] == e - s - 1 else embeddings[rows[s:e]]
            writer.write_batch(arrow_batch(frame.iloc[s:e], vectors, schema), row_group_size=block_rows)
    return len(frame)


def export_paths(cfg: PipelineConfig, fmt: ExportFormat, output: Path | None) -> dict[str, Path]:
    """Where the export goes: ``output`` (the parquet file), else ``<output.dir>/<name>_embeddings.parquet``;
    the ``npy`` format adds the vectors beside it with the same stem."""
    table = output or cfg.output_dir / f"{cfg.name}_embeddings.parquet"
    paths = {"parquet": table}
    if fmt == "npy":
        paths["npy"] = table.with_suffix(".npy")
    return paths


def tile_frame(cfg: PipelineConfig, ws: Workspace) -> gpd.GeoDataFrame:
    """Every kept tile as the ``tiles`` layer shows it (cell polygon in ``output.crs``, cluster, label,
    region), with its ``emb_row``, in ``emb_row`` order."""
    labels = read_labels(ws.labels, cfg.clustering.k)
    regions = gpd.read_parquet(ws.regions)
    t, layer = tiles_frame(cfg, ws, load_infos(ws), labels, regions)
    layer = layer.merge(t[["tile_id", "emb_row"]], on="tile_id", how="left")
    return layer.sort_values("emb_row", kind="stable").reset_index(drop=True)


def export(cfg: PipelineConfig, fmt: ExportFormat, output: Path | None = None, wait: float = 0) -> dict[str, Path]:
    """``settlements export-embeddings``: under the pipeline's lock, so a run never swaps the files read."""
    paths = export_paths(cfg, fmt, output)
    with pipeline_lock(cfg, wait):
        ws = workspace(cfg)
        if not ws.embeddings.exists():
            raise StageError(f"{ws.embeddings}: missing; run `settlements run {cfg.source}` first")
        frame = tile_frame(cfg, ws)
        n = export_embeddings(frame, ws.embeddings, fmt, paths)
    log.info("exported %d tiles to %s", n, ", ".join(str(p) for p in paths.values()))
    return paths


def export_embeddings(frame: gpd.GeoDataFrame, embeddings: Path, fmt: ExportFormat, paths: dict[str, Path]) -> int:
    """Write the export of ``frame`` (see the module); the vectors come from ``embeddings`` (a work folder's)."""
    rows = NpyRows(embeddings)
    if fmt == "npy":
        order = frame["emb_row"].to_numpy(np.int64)
        if not np.array_equal(order, np.arange(len(rows))):
            raise AssertionError("the tile frame must hold every embedding row in order")
        with atomic_path(paths["npy"], suffix=".npy") as tmp:
            shutil.copyfile(embeddings, tmp)  # the pipeline's own file: rows are already the table's order
        return write_geoparquet(paths["parquet"], frame, None)
    return write_geoparquet(paths["parquet"], frame, rows)
