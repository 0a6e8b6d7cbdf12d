"""The stages in order, each a function of the config that reads earlier artifacts and writes its own.

tile -> embed -> cluster -> export. Artifacts live in the work folder; outputs are written
only by ``export``. Everything a run writes (artifacts, outputs, the labels file, the record of
its success) is staged beside its final place and renamed into place at one commit point
(:class:`settlements.store.Commit`), so a failed or killed run leaves the earlier ones untouched.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
import shapely
from pyproj import CRS, Transformer
from rasterio.windows import Window
from tqdm.auto import tqdm

from . import __version__
from .clustering import KMeansClusterer, dominance_warning, restart_warning
from .config import PipelineConfig, check_backbone_name, check_executor, check_k
from .embedding.assemble import embed_counts, embedded_table, write_embeddings
from .embedding.backbones import build_backbone, list_backbones
from .embedding.cache import EmbeddingCache, NpyRows
from .embedding.infer import InferenceSettings
from .errors import (
    ConfigError,
    OutputError,
    RegionError,
    TilingError,
)
from .executors import EmbedJob, Executor, LocalExecutor, make_executor
from .export import plots
from .export.geopackage import write_geopackage
from .export.qgis_project import write_project
from .export.raster import code_grid, tile_cells, write_cluster_map
from .export.styles import vector_styles
from .histograms import region_histograms
from .history import (
    align_to_anchors,
    anchor_tiles,
    change_styles,
    concat_runs,
    keep_cluster_ids,
    previous_labels,
    read_previous,
    region_changes,
    relabel_after_refit,
    run_columns,
    tile_changes,
)
from .labels import ClusterLabels, exported_snapshot, parse_labels, pull_edits, read_labels, write_labels
from .rasters import (
    OpenRasters,
    RasterInfo,
    clipping_warning,
    compute_scaling,
    inspect_raster,
    load_infos,
    read_tile,
    valid_footprint,
)
from .regions import (
    area_m2,
    cell_region_shares,
    equal_area_crs,
    geometry_in,
    load_all_regions,
    raster_extent_in,
    regions_in_crs,
    to_area_crs,
)
from .reprocess import (
    claim,
    labels_hash,
    last_run_id,
    output_paths,
    pipeline_lock,
    record_success,
    state_key,
    state_parts,
    up_to_date,
)
from .store import (
    Commit,
    Workspace,
    check_writable_dir,
    ensure_dir,
    expand_inputs,
    read_json,
    read_table,
    remove_stale_temps,
    settings_key,
    workspace,
    write_atomic,
    write_json,
    write_table,
)
from .tiling import WINDOW_COLUMNS, TileGrid, ground_order, length_to_pixels

log = logging.getLogger(__name__)

#: GDAL's block cache (bytes) while this process reads scattered tiles (the atlas).
SCATTERED_READ_CACHE = 16 << 20


@contextmanager
def committing(cfg: PipelineConfig, ws: Workspace | None = None) -> Iterator[Workspace]:
    """``ws`` when it belongs to a run's commit; else a workspace whose writes commit when the block ends."""
    if ws is not None and ws.commit is not None:
        yield ws
        return
    with Commit(workspace(cfg).journal) as commit:
        seen = labels_hash(cfg)
        # the labels file is the analyst's: never replace an edit made while this run was working
        commit.guard(lambda: not commit.staged(cfg.labels_path) or labels_hash(cfg) == seen, cfg.labels_path,
                     "edited while the run was writing its own version of it; nothing was replaced: run again")
        yield workspace(cfg, commit)
        claim(cfg, cfg.work_dir, commit)


# ----------------------------------------------------------------------------------------- tile

def raster_grid(info: RasterInfo, cfg: PipelineConfig) -> TileGrid:
    """The tile grid of one raster, with tile and stride lengths converted to its pixels."""
    t = cfg.tiling
    tw, th = length_to_pixels(t.tile_size.value, t.tile_size.unit, info.pixel_w_m, info.pixel_h_m)
    s = t.stride_length
    sw, sh = length_to_pixels(s.value, s.unit, info.pixel_w_m, info.pixel_h_m)
    for key, length, (w, h) in (("tile_size", t.tile_size, (tw, th)), ("stride", s, (sw, sh))):
        if min(w, h) < 1:
            raise TilingError(f"tiling.{key}: {length} is smaller than a pixel of {info.path} "
                              f"({info.pixel_w_m:.3g} x {info.pixel_h_m:.3g} m)")
    if tw > info.width or th > info.height:
        raise TilingError(f"tiling.tile_size: {t.tile_size} ({tw} x {th} px) is larger than {info.path} "
                          f"({info.width} x {info.height} px)")
    return TileGrid(info.width, info.height, tw, th, min(sw, tw), min(sh, th))


def grid_table(grid: TileGrid, info: RasterInfo) -> pd.DataFrame:
    """One row per cell: row, col, tile window, cell window and cell bounds in the raster CRS."""
    n = len(grid)
    row, col = np.divmod(np.arange(n, dtype=np.int64), grid.n_cols)
    cell_col, cell_row = col * grid.stride_w, row * grid.stride_h
    cell_w = np.minimum(grid.stride_w, grid.width - cell_col)
    cell_h = np.minimum(grid.stride_h, grid.height - cell_row)
    tile_col = cell_col - (grid.tile_w - grid.stride_w) // 2
    tile_row = cell_row - (grid.tile_h - grid.stride_h) // 2
    a = info.affine  # north-up (rotation is rejected when the raster is inspected)
    x0, y0 = a.c + a.a * cell_col, a.f + a.e * cell_row
    x1, y1 = a.c + a.a * (cell_col + cell_w), a.f + a.e * (cell_row + cell_h)
    return pd.DataFrame({
        "row": row, "col": col,
        "tile_col": tile_col, "tile_row": tile_row,
        "tile_w": np.full(n, grid.tile_w), "tile_h": np.full(n, grid.tile_h),
        "cell_col": cell_col, "cell_row": cell_row, "cell_w": cell_w, "cell_h": cell_h,
        "minx": np.minimum(x0, x1), "miny": np.minimum(y0, y1),
        "maxx": np.maximum(x0, x1), "maxy": np.maximum(y0, y1),
    })


def check_inputs(cfg: PipelineConfig) -> tuple[list[RasterInfo], gpd.GeoDataFrame]:
    """Open and check every raster and the regions; nothing is written."""
    check_backbone_name(cfg.embedding.backbone, list_backbones())
    check_output_settings(cfg)
    infos = [inspect_raster(path, spec) for path, spec in expand_inputs(cfg.rasters)]
    regions = load_all_regions(cfg.regions)
    return infos, regions


def check_output_settings(cfg: PipelineConfig) -> None:
    """Output CRS understood, output and work folders creatable, labels file readable: fail before any CNN work."""
    try:
        CRS.from_user_input(cfg.output.crs)
    except Exception:
        raise ConfigError(f"output.crs: cannot understand CRS {cfg.output.crs!r}") from None
    check_writable_dir(cfg.output_dir, "output.dir")
    check_writable_dir(cfg.work_dir, "output.work_dir")
    if cfg.labels_path.is_dir():
        raise ConfigError(f"labels: {cfg.labels_path} is a folder; expected the labels YAML file")
    if cfg.labels_path.exists():
        parse_labels(cfg.labels_path)  # a malformed labels file stops the run before any CNN work


@dataclass
class RasterTiles:
    """One raster's tiles: its tile table, the cells' region shares (``cell``: row of the table) and the
    number of grid cells that ``tiling.clip_to_regions`` left untiled (outside every region)."""

    table: pd.DataFrame
    shares: pd.DataFrame
    clipped: int


def raster_tiles(cfg: PipelineConfig, earlier: EarlierRasters, r: int, grid: TileGrid, regions: gpd.GeoDataFrame,
                 ea: CRS) -> RasterTiles:
    """Raster ``r``'s cells, clipped to the regions when asked, with their ground centres and region shares."""
    info = earlier.infos[r]
    table = grid_table(grid, info)
    cells = shapely.box(*(table[c].to_numpy() for c in ("minx", "miny", "maxx", "maxy")))
    bounds = (float(table["minx"].min()), float(table["miny"].min()),
              float(table["maxx"].max()), float(table["maxy"].max()))
    reg_r = regions_in_crs(regions, earlier.crs[r], bounds)
    # overlapping rasters: the first listed wins where it holds imagery; later ones lose that ground
    covered = earlier.covered(r, bounds)
    to_ground = Transformer.from_crs(earlier.crs[r], ea, always_xy=True)
    shares = cell_region_shares(cells, reg_r.geometry.values, to_ground, covered)
    n_cells = len(table)
    if cfg.tiling.clip_to_regions:
        table = table.iloc[np.unique(shares["cell"].to_numpy())]
        remap = pd.Series(np.arange(len(table)), index=table.index)
        shares["cell"] = remap.loc[shares["cell"]].to_numpy()
        table = table.reset_index(drop=True)
    # the cell centre on the ground (equal-area metres): where a tile is, whichever file holds it
    table["ground_x"], table["ground_y"] = to_ground.transform((table["minx"] + table["maxx"]).to_numpy() / 2,
                                                               (table["miny"] + table["maxy"]).to_numpy() / 2)
    return RasterTiles(table, shares, n_cells - len(table))


def stage_tile(cfg: PipelineConfig, ws: Workspace | None = None) -> dict[str, int]:
    """Check inputs, compute scaling, build every raster's tile grid and cell-region shares."""
    with committing(cfg, ws) as w:
        return _tile(cfg, w)


def _tile(cfg: PipelineConfig, ws: Workspace) -> dict[str, int]:
    specs = [spec for _, spec in expand_inputs(cfg.rasters)]
    infos, regions = check_inputs(cfg)
    ea = equal_area_crs(regions)
    regions["area_m2"] = area_m2(regions, ea)
    grids = [raster_grid(info, cfg) for info in infos]  # tile-size errors before any pixel is read
    tables, shares_all = [], []
    earlier = EarlierRasters(infos)
    next_id = clipped = 0
    for r, grid in enumerate(tqdm(grids, desc="tiling", unit="raster", disable=None)):
        rt = raster_tiles(cfg, earlier, r, grid, regions, ea)
        table = rt.table
        table.insert(0, "raster", r)
        table.insert(0, "tile_id", np.arange(next_id, next_id + len(table), dtype=np.int64))
        shares = pd.DataFrame({"tile_id": table["tile_id"].to_numpy()[rt.shares["cell"].to_numpy()],
                               "region": rt.shares["region"].to_numpy(), "area_m2": rt.shares["area_m2"].to_numpy()})
        next_id += len(table)
        clipped += rt.clipped
        tables.append(table)
        shares_all.append(shares)
    shares = pd.concat(shares_all, ignore_index=True)
    if shares.empty:
        where = ", ".join(str(r.path or "regions.wkt") for r in cfg.regions)
        raise RegionError(f"{where}: no region overlaps any input raster (check the CRS and extent)")
    tiles = pd.concat(tables, ignore_index=True)
    check_k(cfg.clustering.k, len(tiles))
    infos = [compute_scaling(info, spec) for info, spec in zip(infos, specs, strict=True)]
    counts = {"tiles": len(tiles), "rasters": len(infos), "regions": len(regions), "cells_clipped": clipped,
              "tiles_outside_regions": int((~tiles["tile_id"].isin(shares["tile_id"])).sum())}
    write_json(ws.out(ws.rasters), {"equal_area_crs": ea.to_wkt(), "rasters": [i.to_json() for i in infos],
                                    "counts": counts})
    write_table(ws.out(ws.tiles), tiles)
    write_atomic(ws.out(ws.regions), lambda p: regions.assign(region=np.arange(len(regions))).to_parquet(p))
    write_table(ws.out(ws.shares), shares)
    log.info("tiling: %d tiles over %d raster(s), %d region(s)", len(tiles), len(infos), len(regions))
    return counts


class EarlierRasters:
    """The ground that rasters listed before each raster hold imagery on (the first listed wins).

    Valid footprints, not extents: where an earlier scene is nodata (a collar, a cut-off corner) a
    later one still maps the ground. Footprints are traced once, and only of rasters that reach a
    later one; rasters in one CRS find their neighbours through a spatial index, so many files cost
    no more than a pass over them.
    """

    def __init__(self, infos: list[RasterInfo]) -> None:
        self.infos = infos
        self.crs = [info.crs for info in infos]  # parsed once
        groups: dict[str, list[int]] = {}
        for i, info in enumerate(infos):
            groups.setdefault(info.crs_wkt, []).append(i)
        self.groups = {wkt: (np.asarray(idx), shapely.STRtree([shapely.box(*infos[i].extent) for i in idx]))
                       for wkt, idx in groups.items()}
        self.footprints: dict[int, shapely.Geometry] = {}

    def near(self, r: int, here: shapely.Geometry) -> list[int]:
        """Rasters listed before ``r`` whose extent meets ``here`` (in ``r``'s CRS)."""
        wkt = self.infos[r].crs_wkt
        out = []
        for other, (idx, tree) in self.groups.items():
            if other == wkt:
                out += [int(e) for e in idx[tree.query(here, predicate="intersects")] if e < r]
            else:
                out += [int(e) for e in idx[idx < r]
                        if raster_extent_in(self.infos[e].extent, self.crs[e], self.crs[r]).intersects(here)]
        return sorted(out)

    def covered(self, r: int, bounds: tuple[float, float, float, float]) -> shapely.Geometry | None:
        """The ground earlier rasters hold imagery on, in raster ``r``'s CRS, near ``bounds``."""
        parts = []
        for e in self.near(r, shapely.box(*bounds)):
            if e not in self.footprints:
                self.footprints[e] = valid_footprint(self.infos[e])
                log.info("%s: valid footprint traced for overlap with later rasters", self.infos[e].path.name)
            parts.append(geometry_in(self.footprints[e], self.crs[e], self.crs[r]))
        return shapely.union_all(parts) if parts else None


# ---------------------------------------------------------------------------------------- embed

def no_tile_message(max_invalid_fraction: float) -> str:
    """Why no tile was embedded, with advice only where it can help."""
    if max_invalid_fraction >= 1:  # every tile qualifies: the CNN gave no usable features for any
        return ("tiling.max_invalid_fraction: no tile could be embedded although every tile qualifies "
                "(max_invalid_fraction 1); the pixels or their scaling give the CNN nothing (check rasters.scaling)")
    return (f"tiling.max_invalid_fraction: no tile has at least {1 - max_invalid_fraction:.0%} valid pixels in any "
            f"raster (most pixels are nodata, masked or non-finite); raise max_invalid_fraction (now "
            f"{max_invalid_fraction:g}, at most 1) or use smaller tiles")

def inference_settings(cfg: PipelineConfig) -> InferenceSettings:
    """Inference settings with the precision resolved for this machine's device.

    Resolved once here, so workers of another kind (a Dask cluster) compute what the cache key says.
    """
    settings = InferenceSettings.from_settings(cfg.embedding)
    settings.precision = settings.precision_name(settings.torch_device())
    return settings


def embedding_key(info: RasterInfo, cfg: PipelineConfig, weights_sha: str, layer: str,
                  precision: str = "fp32") -> str:
    """Cache key of a raster's embeddings: what changes pixels in, or features out."""
    e = cfg.embedding
    parts = {
        "raster": info.fingerprint, "bands": info.bands, "low": info.scale_low, "high": info.scale_high,
        "nodata": info.nodata, "input_size": e.input_size, "backbone": e.backbone, "layer": layer,
        "weights": weights_sha,
    }
    if precision != "fp32":  # fp32 keys stay those of earlier versions
        parts["precision"] = precision
    return settings_key(parts)


def stage_embed(cfg: PipelineConfig, executor: Executor | None = None, ws: Workspace | None = None
                ) -> dict[str, int]:
    """Embed every tile not already in the cache; assemble the pipeline's embedding array, streaming.

    The cache is written as chunks are embedded (a killed run resumes there); the rest is staged.
    """
    with committing(cfg, ws) as w:
        return _embed(cfg, executor, w)


def _embed(cfg: PipelineConfig, executor: Executor | None, ws: Workspace) -> dict[str, int]:
    infos = load_infos(ws)
    tiles = read_table(ws.tiles, "tile")
    e = cfg.embedding
    backbone = build_backbone(e.backbone, e.layer, e.weights)
    settings = inference_settings(cfg)
    device = settings.torch_device()
    min_valid = 1.0 - cfg.tiling.max_invalid_fraction
    cache = EmbeddingCache(ws.cache)
    keys = [embedding_key(info, cfg, backbone.weights.sha256, backbone.layer, settings.precision) for info in infos]
    jobs, read = [], []
    by_raster = tiles.groupby("raster").indices  # one pass, not one scan of every tile per raster
    for r, info in enumerate(infos):
        rt = tiles.iloc[by_raster.get(r, np.empty(0, np.int64))]
        done = cache.index(keys[r])[[*WINDOW_COLUMNS, "valid_tile", "embedded"]]
        merged = rt[WINDOW_COLUMNS].merge(done, on=WINDOW_COLUMNS, how="left")
        # new windows, and windows cached as skipped that a lower threshold now keeps
        need = (merged["valid_tile"].isna() | ((merged["valid_tile"] >= min_valid - 1e-9)
                                               & (merged["embedded"] != True))).to_numpy()  # noqa: E712
        if need.any():
            jobs.append(EmbedJob(keys[r], info, rt[WINDOW_COLUMNS].to_numpy()[need], e.input_size, min_valid))
            read.append(rt["tile_id"].to_numpy()[need])
    n_new = sum(len(j.windows) for j in jobs)
    with tqdm(total=n_new, desc="embedding", unit="tile", disable=None) as bar:
        (executor or LocalExecutor()).embed(jobs, backbone, settings, cache, bar)
    meta, source = embedded_table(tiles, keys, cache, min_valid)
    if len(source) == 0:
        raise TilingError(no_tile_message(cfg.tiling.max_invalid_fraction))
    write_embeddings(ws.out(ws.embeddings), source, keys, cache, backbone.dim)
    write_table(ws.out(ws.embedded), meta)
    counts = embed_counts(meta, np.concatenate(read) if read else np.empty(0, np.int64))
    write_json(ws.out(ws.embed_meta), {
        **counts, "backbone": backbone.name, "layer": backbone.layer, "dim": backbone.dim,
        "weights_sha256": backbone.weights.sha256, "weights_source": backbone.weights.source,
        "weights_path": str(backbone.weights.path), "device": str(device), "precision": settings.precision,
        "executor": getattr(executor, "name", "local"), "keys": keys,
    })
    log.info("embedding: %d read, %d embedded, %d reused, %d skipped (%d without valid pixels, %d too few)",
             n_new, counts["tiles_embedded"], counts["tiles_reused"], counts["tiles_skipped"],
             counts["tiles_skipped_nodata"], counts["tiles_skipped_invalid"])
    return counts


# -------------------------------------------------------------------------------------- cluster

def stage_cluster(cfg: PipelineConfig, refit: bool = False, executor: Executor | None = None,
                  ws: Workspace | None = None) -> dict[str, Any]:
    """Assign tiles to clusters: the saved centroids when they fit these embeddings, else fit anew.

    A refit's centroids, assignments and renumbered labels file are staged like everything else: a
    run killed after the refit leaves the previous ones, and its rerun refits from them again.
    """
    with committing(cfg, ws) as w:
        return _cluster(cfg, refit, executor, w)


def _cluster(cfg: PipelineConfig, refit: bool, executor: Executor | None, ws: Workspace) -> dict[str, Any]:
    meta = read_table(ws.embedded, "embed")
    info = read_json(ws.embed_meta, "embed")
    emb = NpyRows(ws.embeddings)  # rows read on demand: the sample, then assignment blocks
    c = cfg.clustering
    fit_key = settings_key({"clustering": c.model_dump(), "backbone": info["backbone"], "layer": info["layer"],
                            "weights": info["weights_sha256"]})
    previous = json.loads(ws.cluster_meta.read_text()) if ws.cluster_meta.exists() else None
    reuse = not refit and previous is not None and previous.get("fit_key") == fit_key and ws.clusters.exists()
    check_k(c.k, len(emb), "valid tiles")
    space_key = settings_key({"backbone": info["backbone"], "layer": info["layer"], "weights": info["weights_sha256"]})
    matching = anchored = None
    if reuse:
        model = KMeansClusterer.load(ws.clusters)
    else:
        model = KMeansClusterer.from_settings(c).fit(emb, _ground_order(ws, meta))
        if previous is not None and ws.clusters.exists():
            matching = keep_cluster_ids(ws.labels, model, KMeansClusterer.load(ws.clusters),
                                        previous.get("space_key") == space_key)
        else:  # a first fit here: the labels file's anchor tiles say which cluster is which
            anchored = align_to_anchors(ws.labels, model, emb, meta[meta["kept"]])
    labels, dist = (executor or LocalExecutor()).assign(model, ws.embeddings)
    kept = meta[meta["kept"]].sort_values("emb_row")
    assignments = pd.DataFrame({"tile_id": kept["tile_id"].to_numpy(), "cluster": labels, "distance": dist})
    if not reuse:
        model.save(ws.out(ws.clusters))
    write_table(ws.out(ws.assignments), assignments)
    sizes = np.bincount(labels, minlength=c.k)
    if matching is not None:
        relabel_after_refit(cfg.name, ws.labels, ws.out(cfg.labels_path), matching, sizes, anchor_tiles(assignments),
                            cfg.output_dir)
    # the agreement of the restarts of the fit in use (carried over while its centroids are reused)
    restarts = previous.get("restarts") if reuse and previous is not None else model.restart_agreement_
    write_json(ws.out(ws.cluster_meta), {
        "fit_key": fit_key, "space_key": space_key, "k": c.k, "sizes": sizes.tolist(), "reused_centroids": reuse,
        "trained_on": getattr(model, "n_train_", None), "restarts": restarts, "matching": matching,
        "anchored": anchored})
    return {"k": c.k, "sizes": sizes.tolist(), "reused_centroids": reuse, "matching": matching,
            "restarts": restarts}


def _ground_order(ws: Workspace, meta: pd.DataFrame) -> np.ndarray | None:
    """Embedding rows in the order of their tiles on the ground (None for tiles of an older version)."""
    tiles = read_table(ws.tiles, "tile")
    if "ground_x" not in tiles.columns:
        return None
    kept = meta[meta["kept"]].sort_values("emb_row")[["tile_id"]].merge(tiles, on="tile_id", how="left")
    return ground_order(kept["ground_x"].to_numpy(), kept["ground_y"].to_numpy())


# --------------------------------------------------------------------------------------- export

def _tiles_frame(cfg: PipelineConfig, ws: Workspace, infos: list[RasterInfo], labels: ClusterLabels,
                 regions: gpd.GeoDataFrame) -> tuple[pd.DataFrame, gpd.GeoDataFrame]:
    tiles = read_table(ws.tiles, "tile")
    meta = read_table(ws.embedded, "embed")
    assign = read_table(ws.assignments, "cluster")
    shares = read_table(ws.shares, "tile")
    t = tiles.merge(meta, on="tile_id").merge(assign, on="tile_id", how="left")
    t["cluster"] = t["cluster"].fillna(-1).astype(int)
    t["label"] = [labels.label_of(c) if c >= 0 else None for c in t["cluster"]]
    best = shares.sort_values("area_m2", ascending=False).drop_duplicates("tile_id")
    best = best.merge(regions[["region", "region_id"]], on="region")[["tile_id", "region_id"]]
    t = t.merge(best, on="tile_id", how="left")
    kept = t[t["kept"]]
    parts = []
    for r, info in enumerate(infos):
        k = kept[kept["raster"] == r]
        geom = shapely.box(*(k[c].to_numpy() for c in ("minx", "miny", "maxx", "maxy")))  # arrays: no index alignment
        g = gpd.GeoDataFrame({
            "tile_id": k["tile_id"].to_numpy(), "cluster": k["cluster"].to_numpy().astype(np.int32),
            "label": k["label"].to_numpy(), "distance": k["distance"].to_numpy().astype(np.float64),
            "region_id": k["region_id"].to_numpy(), "raster": info.path.name,
            "row": k["row"].to_numpy(), "col": k["col"].to_numpy(),
            "valid_fraction": k["valid_cell"].to_numpy().astype(np.float64),
        }, geometry=geom, crs=info.crs).to_crs(cfg.output.crs)
        parts.append(g)
    layer = gpd.GeoDataFrame(pd.concat(parts, ignore_index=True), crs=cfg.output.crs)
    return t, layer


def result_warnings(infos: list[RasterInfo], sizes: np.ndarray, restarts: dict | None = None) -> list[str]:
    """Signs of a result not to trust (most pixels clipped, one cluster holding nearly all, k-means restarts
    that disagree); logged as one line."""
    found = [w for w in [*(clipping_warning(i) for i in infos), dominance_warning(sizes), restart_warning(restarts)]
             if w]
    if found:
        log.warning("result: %s", "; ".join(found))
    return found


def _versions() -> dict[str, str]:
    import faiss
    import pyogrio
    import rasterio
    import torch
    import torchvision

    return {"settlements": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "faiss": getattr(faiss, "__version__", "?"),
            "rasterio": rasterio.__version__, "gdal": rasterio.__gdal_version__, "pyogrio": pyogrio.__version__}


def _atlas_panels(t: pd.DataFrame, infos: list[RasterInfo], labels: ClusterLabels, k: int,
                  per_cluster: int) -> list[tuple[int, str, int, list[np.ndarray]]]:
    kept = t[t["kept"]]
    panels = []
    # scattered tiles reuse no cached block: a small GDAL cache (the default let this process grow by
    # 250 MB of blocks, and keep them, for 128 atlas tiles of a 30k^2 mosaic)
    with rasterio.Env(GDAL_CACHEMAX=SCATTERED_READ_CACHE), OpenRasters(infos) as sources:
        for cid in range(k):
            members = kept[kept["cluster"] == cid].nsmallest(per_cluster, "distance")
            chips = []
            for _, tile in members.iterrows():
                r = int(tile["raster"])
                px, _ = read_tile(sources[r], infos[r], Window(tile["tile_col"], tile["tile_row"],
                                                               tile["tile_w"], tile["tile_h"]))
                chips.append(np.transpose(px, (1, 2, 0)))
            panels.append((cid, labels.label_of(cid), int((kept["cluster"] == cid).sum()), chips))
    return panels


def stage_export(cfg: PipelineConfig, run_started: float | None = None,
                 counters: dict[str, Any] | None = None, run_info: dict[str, Any] | None = None,
                 ws: Workspace | None = None) -> dict[str, Path]:
    """Labels, histograms and every output file.

    All outputs are built in a hidden staging folder beside them, and put in place with the rest
    of the run (or of this export) at its commit, so a run killed while writing leaves the previous
    outputs as they were.
    """
    with committing(cfg, ws) as w:
        return _export(cfg, run_started, counters, run_info, w)


def _export(cfg: PipelineConfig, run_started: float | None, counters: dict[str, Any] | None,
            run_info: dict[str, Any] | None, ws: Workspace) -> dict[str, Path]:
    assert ws.commit is not None
    infos = load_infos(ws)
    k = cfg.clustering.k
    regions = gpd.read_parquet(ws.regions)
    assign = read_table(ws.assignments, "cluster")
    sizes = np.bincount(assign["cluster"].to_numpy(), minlength=k)
    out_dir = cfg.output_dir
    ensure_dir(out_dir, "output.dir")
    gpkg = out_dir / f"{cfg.name}.gpkg"
    # edits made in QGIS go to the YAML (committed with the outputs)
    pull_edits(gpkg, ws.labels, cfg.name, k, need_snapshot=True, target=ws.out(cfg.labels_path))
    labels = read_labels(ws.labels, k)
    if not ws.labels.exists():
        write_labels(ws.out(cfg.labels_path), cfg.name, labels, dict(enumerate(sizes.tolist())), anchor_tiles(assign),
                     out_dir=out_dir)
        log.info("wrote labels template %s: name the clusters, then run again", cfg.labels_path)
    palette = labels.palette
    t, tiles_layer = _tiles_frame(cfg, ws, infos, labels, regions)
    shares = read_table(ws.shares, "tile")
    wide, long = region_histograms(t[["tile_id", "kept", "valid_cell", "cluster", "label"]], shares,
                                   regions.drop(columns="geometry"), list(palette.labels), k)
    regions_layer = gpd.GeoDataFrame(
        wide.drop(columns=["region"]), geometry=regions.geometry.values, crs=regions.crs
    ).to_crs(cfg.output.crs)
    centroids = KMeansClusterer.load(ws.clusters).cluster_centers_
    clusters = pd.DataFrame({
        "cluster": np.arange(k, dtype=np.int32),
        "label": [labels.label_of(i) for i in range(k)],
        "colour": [palette.colour(labels.label_of(i)) for i in range(k)],
        "size": sizes.astype(np.int64),
        "centroid_norm": np.linalg.norm(centroids, axis=1).astype(np.float64),
    })
    cluster_info = read_json(ws.cluster_meta, "cluster")
    warnings = result_warnings(infos, sizes, cluster_info.get("restarts"))
    previous = read_previous(gpkg)
    before = previous_labels(labels, cluster_info.get("matching"))
    changes = region_changes(previous, long, regions_layer, labels, before)
    changed_tiles = tile_changes(previous, tiles_layer, labels, before)
    embed_info = read_json(ws.embed_meta, "embed")
    skips = embed_counts(t, np.empty(0, np.int64))  # why tiles were skipped, from every tile's validity
    now = datetime.now(timezone.utc)
    run_row = pd.DataFrame([{
        "run_id": now.strftime("%Y%m%dT%H%M%S.%fZ"),
        "finished_utc": now.isoformat(timespec="seconds"),
        "duration_s": float(time.time() - run_started) if run_started else float("nan"),
        "config": json.dumps(cfg.to_yaml_dict(), default=str),
        "config_path": str(cfg.source or ""),
        "labels_path": str(cfg.labels_path),
        "labels": json.dumps(exported_snapshot(labels)),
        "backbone": embed_info["backbone"], "layer": embed_info["layer"],
        "weights_sha256": embed_info["weights_sha256"], "weights_source": embed_info["weights_source"],
        "device": embed_info["device"],
        "versions": json.dumps(_versions()),
        "inputs": json.dumps([{"path": str(i.path), "fingerprint": i.fingerprint} for i in infos]),
        "k": k,
        "tiles_total": int(len(t)),
        "tiles_kept": int(t["kept"].sum()),
        "tiles_embedded": int((counters or embed_info).get("tiles_embedded", 0)),
        "tiles_reused": int((counters or embed_info).get("tiles_reused", 0)),
        **{key: skips[key] for key in ("tiles_skipped", "tiles_skipped_nodata", "tiles_skipped_invalid")},
        "tiles_outside_regions": int((~t["tile_id"].isin(shares["tile_id"])).sum()),
        "cells_clipped": int(read_json(ws.rasters, "tile").get("counts", {}).get("cells_clipped", -1)),
        "warnings": json.dumps(warnings),
        **run_columns(run_info, cluster_info, previous, len(changed_tiles)),
    }])
    runs = run_row
    if gpkg.exists():
        import pyogrio  # imported where used: a compute-only machine (tile, embed, cluster) needs no OGR

        try:
            old = pyogrio.read_dataframe(gpkg, layer="runs", read_geometry=False)
            runs = concat_runs(old.drop(columns=[c for c in ("fid",) if c in old.columns]), run_row)
        except Exception:  # an older file without a runs table: start the history here
            log.warning("%s: could not read earlier runs; history restarts", gpkg)
    styles = vector_styles(palette, k) + change_styles(labels)
    cluster_map = out_dir / f"{cfg.name}_labels.tif"
    project = out_dir / f"{cfg.name}.qgz"
    stage = ws.commit.folder(out_dir)
    try:
        write_geopackage(stage / gpkg.name, {"tiles": tiles_layer, "regions": regions_layer, "clusters": clusters,
                                             "histogram": long, "runs": runs, "changes": changes,
                                             "tile_changes": changed_tiles}, styles)
        write_cluster_map(stage / cluster_map.name, code_grid(tile_cells(t, [i.crs for i in infos], palette)),
                          palette)
        write_project(stage / project.name, stage / gpkg.name, stage / cluster_map.name, palette, k,
                      f"settlements: {cfg.name}")
        panels = _atlas_panels(t, infos, labels, k, cfg.output.atlas_tiles)
        plots.atlas(stage / "atlas.png", panels, palette, f"{cfg.name}: most typical tiles of each cluster")
        plots.histograms(stage / "histograms.png", wide, palette, cfg.output.max_plot_regions,
                         f"{cfg.name}: label histograms")
        plots.label_map(stage / "map.png", tiles_layer, regions_layer, palette, f"{cfg.name}: tiles by label")
    except OutputError as exc:  # name the output, not the hidden staging folder it was built in
        raise OutputError(str(exc).replace(str(stage), str(out_dir))) from None
    claim(cfg, out_dir, ws.commit)
    return {"gpkg": gpkg, "atlas": out_dir / "atlas.png", "histograms": out_dir / "histograms.png",
            "map": out_dir / "map.png", "cluster_map": cluster_map, "project": project}


# ------------------------------------------------------------------------------------------ run

@dataclass
class RunReport:
    tiles: dict[str, int] = field(default_factory=dict)
    embedding: dict[str, int] = field(default_factory=dict)
    clustering: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0
    nothing_to_do: bool = False
    run_id: str | None = None


def run(cfg: PipelineConfig, refit: bool = False, lock_timeout: float = 0, skip_unchanged: bool = False,
        executor: str = "local", scheduler: str | None = None, n_workers: int | None = None) -> RunReport:
    """All stages under the pipeline's lock.

    With ``skip_unchanged`` (what ``settlements run`` does unless ``--force``), a pipeline whose
    inputs, settings and labels are unchanged since its last successful run, with outputs in
    place, is left alone and the report says ``nothing_to_do``. ``executor="dask"`` spreads
    embedding and assignment over a Dask cluster.
    """
    started = time.time()
    check_executor(executor, scheduler)
    check_output_settings(cfg)
    ensure_dir(cfg.work_dir, "output.work_dir")
    with pipeline_lock(cfg, lock_timeout):
        if skip_unchanged and not refit and up_to_date(cfg):
            log.info("%s: inputs, settings and labels unchanged since the last run; nothing to do", cfg.name)
            return RunReport(nothing_to_do=True, seconds=time.time() - started,
                             outputs=output_paths(cfg))
        n = (remove_stale_temps(cfg.work_dir, cfg.work_dir / "cache", cfg.output_dir)
             + remove_stale_temps(cfg.labels_path.parent, name_end=f".{cfg.labels_path.name}", subfolders=False))
        if n:
            log.info("removed %d temporary file(s) left by an interrupted run", n)
        parts = state_parts(cfg)
        key = state_key(cfg, parts)
        report = RunReport()
        seconds: dict[str, float] = {}
        with committing(cfg) as ws:
            t0 = time.time()
            report.tiles = stage_tile(cfg, ws)
            seconds["tile"] = time.time() - t0
            t0 = time.time()
            ex = make_executor(executor, scheduler, n_workers)
            try:
                report.embedding = stage_embed(cfg, ex, ws)
                seconds["embed"] = time.time() - t0
                t0 = time.time()
                report.clustering = stage_cluster(cfg, refit=refit, executor=ex, ws=ws)
                seconds["cluster"] = time.time() - t0
            finally:
                ex.close()
            info = {"started_utc": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
                    "stage_seconds": seconds, "state_key": key}
            t0 = time.time()
            report.outputs = stage_export(cfg, started, report.embedding, info, ws)
            seconds["export"] = time.time() - t0
            assert ws.commit is not None
            report.run_id = last_run_id(ws.current(report.outputs["gpkg"]))
            staged = sorted(ws.commit.folder(cfg.output_dir).iterdir())
            record_success(cfg, str(report.run_id), parts, staged, ws.commit)
        report.seconds = time.time() - started
        return report


__all__ = ["run", "stage_tile", "stage_embed", "stage_cluster", "stage_export", "Workspace", "CRS", "to_area_crs"]
