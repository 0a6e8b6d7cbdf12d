"""``settlements export-embeddings``: every kept tile's embedding with its place, for other tools.

The ecosystem exchanges embeddings as GeoParquet, one row per chip: geometry plus a vector (DuckDB
queries it, lonboard maps it, GeoPandas reads it). ``geoparquet`` writes that file: ``tile_id``,
``raster`` (file name), grid ``row``/``col``, ``cluster``, ``label``, ``region_id``, ``embedding`` as
a fixed-size list of float32, the cell polygon as WKB ``geometry`` in ``output.crs`` and a ``bbox``
struct, with GeoParquet 1.1 metadata (CRS as PROJJSON, the bbox covering). ``npy`` writes the same
table without the vectors plus an ``(n, dim)`` float32 ``.npy`` whose row i is the table's row i.

Rows are written in row groups read from ``embeddings.npy`` block by block: the vectors are never
all in memory (a 30k x 30k raster in 32 px tiles is 4.5 GB of them).

The command writes only files of its own (:func:`check_own`): new ones, or those an earlier export of
this pipeline wrote in the same format (recorded in ``work/<name>/exports.json``) and nobody changed
since. Never the pipeline's GeoPackage, labels file, config, models or any other output, whatever
``--output`` says. Its files are renamed into place at the command's commit
(:func:`settlements.pipeline.export_embeddings`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import shapely
from pyproj import CRS

from ..config import ExportFormat, PipelineConfig
from ..embedding.cache import NpyRows
from ..errors import ConfigError, OutputError, StageError
from ..products import embeddings_npy, outputs
from ..progress import counted
from ..reprocess import file_record, unchanged
from ..store import Workspace, atomic_path, read_json, write_json
from ..tile_tables import tiles_by_row

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
        for s in counted(range(0, len(frame), block_rows), f"writing {target.name}", "block"):
            e = min(s + block_rows, len(frame))
            vectors = None
            if embeddings is not None:  # rows in order: one contiguous read
                vectors = embeddings[slice(int(rows[s]), int(rows[e - 1]) + 1)] \
                    if rows[e - 1] - rows[s] == e - s - 1 else embeddings[rows[s:e]]
            writer.write_batch(arrow_batch(frame.iloc[s:e], vectors, schema), row_group_size=block_rows)
    return len(frame)


def export_paths(cfg: PipelineConfig, fmt: ExportFormat, output: Path | None) -> dict[str, Path]:
    """Where the export goes: each format's own files (:meth:`settlements.products.Outputs.embeddings`), or
    ``output``: the GeoParquet file (``.parquet``), or the ``npy`` format's vectors (``.npy``, with the
    table of their rows beside them)."""
    if output is None:
        return outputs(cfg).embeddings(fmt)
    if fmt == "geoparquet":
        if output.suffix != ".parquet":
            raise ConfigError(f"--output: {output}: a GeoParquet export is a .parquet file")
        return {"parquet": output}
    if output.suffix != ".npy":
        raise ConfigError(f"--output: {output}: the npy format's vectors are a .npy file (the table of their rows "
                          "goes beside it)")
    return embeddings_npy(output)


#: What each file of an export is, in the record of what ``export-embeddings`` wrote.
KINDS = {("geoparquet", "parquet"): "GeoParquet file", ("npy", "npy"): "npy vectors", ("npy", "parquet"): "npy table"}


def protected_files(cfg: PipelineConfig, ws: Workspace) -> dict[Path, str]:
    """Files of the pipeline no export may replace, by what they are."""
    files = outputs(cfg)
    out = {p.resolve(): "an output of the pipeline" for p in files.declared()}
    out[files.gpkg.resolve()] = "the pipeline's GeoPackage"
    out[cfg.labels_path.resolve()] = "the pipeline's labels file"
    if cfg.source is not None:
        out[cfg.source.resolve()] = "the pipeline's config"
    for model in (ws.top_model, ws.fine_tuned, ws.finetune_checkpoint, ws.training):
        out[model.resolve()] = "a model file of the pipeline"
    for used in (cfg.clustering.model, cfg.training.model if cfg.training is not None else None):
        if used is not None:
            out[used.resolve()] = "the model file the pipeline uses"
    return out


def _recorded(ws: Workspace) -> dict[str, dict]:
    if not ws.exports.exists():
        return {}
    try:
        files = read_json(ws.exports, "export-embeddings")["files"]
    except (ValueError, KeyError, TypeError):
        return {}
    return files if isinstance(files, dict) else {}


def _key(ws: Workspace, path: Path) -> str:
    return os.path.relpath(path.resolve(), ws.root.resolve())


def check_own(cfg: PipelineConfig, ws: Workspace, fmt: ExportFormat, paths: dict[str, Path]) -> None:
    """Refuse (one :class:`OutputError` naming the file) any target that is not a file of this command's own:
    one of the pipeline's files (:func:`protected_files`, or anything in its work folder), or an existing file
    that is not what an earlier export of this format wrote there (recorded, unchanged since)."""
    protected = protected_files(cfg, ws)
    recorded = _recorded(ws)
    work = ws.root.resolve()
    for part, path in paths.items():
        real = path.resolve()
        what = protected.get(real) or ("in the pipeline's work folder" if real.is_relative_to(work) else None)
        if what is not None:
            raise OutputError(f"{path}: {what}; export-embeddings writes only files of its own (give --output "
                              "another name)")
        if not (path.exists() or path.is_symlink()):
            continue
        record = recorded.get(_key(ws, path))
        kind = KINDS[(fmt, part)]
        if path.is_dir() or record is None:
            raise OutputError(f"{path}: exists and is no file export-embeddings wrote for pipeline '{cfg.name}'; it "
                              "writes only files of its own (delete it, or give --output another name)")
        if record.get("kind") != kind:
            raise OutputError(f"{path}: an earlier export's {record.get('kind')}; the {kind} goes in a file of its "
                              "own (give --output another name)")
        if not unchanged(path, record):
            raise OutputError(f"{path}: changed since export-embeddings wrote it; it writes only files of its own "
                              "(delete it, or give --output another name)")


def export(cfg: PipelineConfig, ws: Workspace, fmt: ExportFormat, output: Path | None = None) -> dict[str, Path]:
    """``settlements export-embeddings``: its files written through ``ws`` (a command's commit), and recorded
    as its own."""
    paths = export_paths(cfg, fmt, output)
    check_own(cfg, ws, fmt, paths)
    if not ws.embeddings.exists():
        raise StageError(f"{ws.embeddings}: missing; run `settlements run {cfg.source}` first")
    frame = tiles_by_row(cfg, ws)
    staged = {part: ws.out(path) for part, path in paths.items()}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    n = export_embeddings(frame, ws.embeddings, fmt, staged)
    recorded = _recorded(ws)
    for part, path in paths.items():
        recorded[_key(ws, path)] = {"kind": KINDS[(fmt, part)], **file_record(staged[part])}
    write_json(ws.out(ws.exports), {"files": recorded})
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
