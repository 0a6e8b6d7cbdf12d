"""The stages in order, each a function of the config that reads earlier artifacts and writes its own.

tile -> embed -> cluster -> export. Artifacts live in the work folder; outputs are written
only by ``export``, file by file through temporary names, so a failed run leaves earlier
outputs untouched.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import rasterio
import shapely
from filelock import FileLock, Timeout
from pyproj import CRS, Transformer
from rasterio.windows import Window
from tqdm.auto import tqdm

from . import __version__
from .clustering import KMeansClusterer
from .config import PipelineConfig
from .embedding.backbones import build_backbone, list_backbones
from .embedding.infer import InferenceSettings, TileWindows, iter_embeddings
from .errors import BackboneError, ClusteringError, OutputError, RegionError, SettlementsError, TilingError
from .export import plots
from .export.geopackage import write_geopackage
from .export.qgis_project import write_project
from .export.raster import code_grid, tile_cells, write_cluster_map
from .export.styles import vector_styles
from .histograms import region_histograms
from .labels import ClusterLabels, exported_snapshot, pull_edits, read_labels, write_labels
from .rasters import RasterInfo, compute_scaling, expand_inputs, inspect_raster, read_tile
from .regions import cell_region_shares, equal_area_crs, load_all_regions, to_area_crs
from .store import (
    WINDOW_COLUMNS,
    EmbeddingCache,
    read_json,
    read_table,
    settings_key,
    write_atomic,
    write_json,
    write_table,
)
from .tiling import TileGrid, length_to_pixels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Workspace:
    """Where each stage's artifact lives for one pipeline."""

    root: Path

    rasters = property(lambda self: self.root / "rasters.json")
    tiles = property(lambda self: self.root / "tiles.parquet")
    regions = property(lambda self: self.root / "regions.parquet")
    shares = property(lambda self: self.root / "shares.parquet")
    embedded = property(lambda self: self.root / "embedded.parquet")
    embeddings = property(lambda self: self.root / "embeddings.npy")
    embed_meta = property(lambda self: self.root / "embedding.json")
    clusters = property(lambda self: self.root / "clusters.npz")
    cluster_meta = property(lambda self: self.root / "clusters.json")
    assignments = property(lambda self: self.root / "assignments.parquet")
    cache = property(lambda self: self.root / "cache")
    lock = property(lambda self: self.root / ".lock")


def workspace(cfg: PipelineConfig) -> Workspace:
    return Workspace(cfg.work_dir)


# ----------------------------------------------------------------------------------------- tile

def raster_grid(info: RasterInfo, cfg: PipelineConfig) -> TileGrid:
    """The tile grid of one raster, with tile and stride lengths converted to its pixels."""
    t = cfg.tiling
    tw, th = length_to_pixels(t.tile_size.value, t.tile_size.unit, info.pixel_w_m, info.pixel_h_m)
    s = t.stride_length
    sw, sh = length_to_pixels(s.value, s.unit, info.pixel_w_m, info.pixel_h_m)
    if min(tw, th, sw, sh) < 1:
        raise TilingError(f"tiling.tile_size: {t.tile_size} is smaller than a pixel of {info.path} "
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
    if cfg.embedding.backbone not in list_backbones():
        raise BackboneError(f"embedding.backbone: unknown backbone {cfg.embedding.backbone!r} "
                            f"(choose from: {', '.join(list_backbones())})")
    infos = [inspect_raster(path, spec) for path, spec in expand_inputs(cfg.rasters)]
    regions = load_all_regions(cfg.regions)
    return infos, regions


def stage_tile(cfg: PipelineConfig) -> dict[str, int]:
    """Check inputs, compute scaling, build every raster's tile grid and cell-region shares."""
    ws = workspace(cfg)
    specs = [spec for _, spec in expand_inputs(cfg.rasters)]
    infos, regions = check_inputs(cfg)
    ea = equal_area_crs(regions)
    regions["area_m2"] = shapely.area(regions.to_crs(ea).geometry.values)
    grids = [raster_grid(info, cfg) for info in infos]  # tile-size errors before any pixel is read
    tables, shares_all = [], []
    next_id = 0
    for r, (info, grid) in enumerate(tqdm(list(zip(infos, grids, strict=True)), desc="tiling", unit="raster",
                                          disable=None)):
        table = grid_table(grid, info)
        cells = shapely.box(table["minx"], table["miny"], table["maxx"], table["maxy"])
        reg_r = regions.to_crs(info.crs)
        shares = cell_region_shares(cells, reg_r.geometry.values, Transformer.from_crs(info.crs, ea, always_xy=True))
        if cfg.tiling.clip_to_regions:
            table = table.iloc[np.unique(shares["cell"].to_numpy())]
            remap = pd.Series(np.arange(len(table)), index=table.index)
            shares["cell"] = remap.loc[shares["cell"]].to_numpy()
            table = table.reset_index(drop=True)
        table.insert(0, "raster", r)
        table.insert(0, "tile_id", np.arange(next_id, next_id + len(table), dtype=np.int64))
        shares = pd.DataFrame({"tile_id": table["tile_id"].to_numpy()[shares["cell"].to_numpy()],
                               "region": shares["region"].to_numpy(), "area_m2": shares["area_m2"].to_numpy()})
        next_id += len(table)
        tables.append(table)
        shares_all.append(shares)
    shares = pd.concat(shares_all, ignore_index=True)
    if shares.empty:
        where = ", ".join(str(r.path or "regions.wkt") for r in cfg.regions)
        raise RegionError(f"{where}: no region overlaps any input raster (check the CRS and extent)")
    tiles = pd.concat(tables, ignore_index=True)
    if cfg.clustering.k > len(tiles):
        raise ClusteringError(f"clustering.k: k={cfg.clustering.k} exceeds the number of tiles ({len(tiles)}); "
                              "lower k or use smaller tiles")
    infos = [compute_scaling(info, spec) for info, spec in zip(infos, specs, strict=True)]
    write_json(ws.rasters, {"equal_area_crs": ea.to_wkt(), "rasters": [_info_json(i) for i in infos]})
    write_table(ws.tiles, tiles)
    write_atomic(ws.regions, lambda p: regions.assign(region=np.arange(len(regions))).to_parquet(p))
    write_table(ws.shares, shares)
    log.info("tiling: %d tiles over %d raster(s), %d region(s)", len(tiles), len(infos), len(regions))
    return {"tiles": len(tiles), "rasters": len(infos), "regions": len(regions)}


def _info_json(info: RasterInfo) -> dict[str, Any]:
    d = dataclasses.asdict(info)
    d["path"] = str(info.path)
    return d


def load_infos(ws: Workspace) -> list[RasterInfo]:
    data = read_json(ws.rasters, "tile")
    out = []
    for d in data["rasters"]:
        d = dict(d)
        d["path"] = Path(d["path"])
        for k in ("transform", "bands", "scale_low", "scale_high"):
            d[k] = tuple(d[k])
        out.append(RasterInfo(**d))
    return out


# ---------------------------------------------------------------------------------------- embed

def embedding_key(info: RasterInfo, cfg: PipelineConfig, weights_sha: str, layer: str) -> str:
    """Cache key of a raster's embeddings: what changes pixels in, or features out."""
    e = cfg.embedding
    return settings_key({
        "raster": info.fingerprint, "bands": info.bands, "low": info.scale_low, "high": info.scale_high,
        "nodata": info.nodata, "input_size": e.input_size, "backbone": e.backbone, "layer": layer,
        "weights": weights_sha,
    })


def stage_embed(cfg: PipelineConfig) -> dict[str, int]:
    """Embed every tile not already in the cache; assemble the pipeline's embedding array."""
    ws = workspace(cfg)
    infos = load_infos(ws)
    tiles = read_table(ws.tiles, "tile")
    e = cfg.embedding
    backbone = build_backbone(e.backbone, e.layer, e.weights)
    settings = InferenceSettings(e.device, e.precision, e.batch_size, e.num_workers)
    min_valid = 1.0 - cfg.tiling.max_invalid_fraction
    cache = EmbeddingCache(ws.cache)
    n_new = n_reused = 0
    parts_meta, parts_emb = [], []
    keys = [embedding_key(info, cfg, backbone.weights.sha256, backbone.layer) for info in infos]
    todo = []
    for r, info in enumerate(infos):
        rt = tiles[tiles["raster"] == r]
        cached, _ = cache.load(keys[r], backbone.dim)
        merged = rt[["tile_id", *WINDOW_COLUMNS]].merge(cached, on=WINDOW_COLUMNS, how="left")
        need = merged["valid_tile"].isna().to_numpy()
        todo.append((r, info, rt[need]))
        n_reused += int((~need).sum())
    total_new = sum(len(t) for _, _, t in todo)
    with tqdm(total=total_new, desc="embedding", unit="tile", disable=None) as bar:
        for r, info, rt in todo:
            if rt.empty:
                continue
            windows = rt[WINDOW_COLUMNS].to_numpy()
            ds = TileWindows(info, windows[:, :4], windows[:, 4:], e.input_size)
            buf: list = []
            buffered = 0
            for chunk in iter_embeddings(backbone.model, ds, settings, min_valid, bar):
                emb = np.full((len(chunk.index), backbone.dim), np.nan, dtype=np.float32)
                emb[chunk.kept] = chunk.embeddings
                buf.append((windows[chunk.index], chunk.valid_tile, chunk.valid_cell, emb))
                buffered += len(chunk.index)
                if buffered >= 2048:
                    cache.append(keys[r], *(np.concatenate(x) for x in zip(*buf, strict=True)))
                    buf, buffered = [], 0
            if buf:
                cache.append(keys[r], *(np.concatenate(x) for x in zip(*buf, strict=True)))
            n_new += len(rt)
    for r, _ in enumerate(infos):
        rt = tiles[tiles["raster"] == r]
        cached, emb = cache.load(keys[r], backbone.dim)
        cached = cached.assign(_row=np.arange(len(cached)))
        merged = rt[["tile_id", *WINDOW_COLUMNS]].merge(cached, on=WINDOW_COLUMNS, how="left")
        rows = merged["_row"].to_numpy()
        vec = emb[rows]
        kept = (merged["valid_tile"].to_numpy() >= min_valid - 1e-9) & ~np.isnan(vec[:, 0])
        parts_meta.append(pd.DataFrame({"tile_id": merged["tile_id"].to_numpy(),
                                        "valid_tile": merged["valid_tile"].to_numpy(),
                                        "valid_cell": merged["valid_cell"].to_numpy(), "kept": kept}))
        parts_emb.append(vec[kept])
    meta = pd.concat(parts_meta, ignore_index=True)
    meta["emb_row"] = -1
    meta.loc[meta["kept"], "emb_row"] = np.arange(int(meta["kept"].sum()))
    embeddings = np.concatenate(parts_emb) if parts_emb else np.empty((0, backbone.dim), np.float32)
    if len(embeddings) == 0:
        raise TilingError(f"no tile has at least {min_valid:.0%} valid pixels in any raster "
                          "(all nodata? raise tiling.max_invalid_fraction)")
    write_atomic(ws.embeddings, lambda p: np.save(p.open("wb"), embeddings.astype(np.float32)))
    write_table(ws.embedded, meta)
    counts = {"tiles_embedded": n_new, "tiles_reused": n_reused, "tiles_kept": int(meta["kept"].sum()),
              "tiles_skipped": int((~meta["kept"]).sum())}
    write_json(ws.embed_meta, {
        **counts, "backbone": backbone.name, "layer": backbone.layer, "dim": backbone.dim,
        "weights_sha256": backbone.weights.sha256, "weights_source": backbone.weights.source,
        "weights_path": str(backbone.weights.path), "device": str(settings.torch_device()),
        "keys": keys,
    })
    log.info("embedding: %d new, %d reused, %d kept, %d skipped", n_new, n_reused, counts["tiles_kept"],
             counts["tiles_skipped"])
    return counts


# -------------------------------------------------------------------------------------- cluster

def stage_cluster(cfg: PipelineConfig, refit: bool = False) -> dict[str, Any]:
    """Assign tiles to clusters: the saved centroids when they fit these embeddings, else fit anew."""
    ws = workspace(cfg)
    meta = read_table(ws.embedded, "embed")
    info = read_json(ws.embed_meta, "embed")
    emb = np.load(ws.embeddings, mmap_mode="r")
    c = cfg.clustering
    fit_key = settings_key({"clustering": c.model_dump(), "backbone": info["backbone"], "layer": info["layer"],
                            "weights": info["weights_sha256"]})
    previous = json.loads(ws.cluster_meta.read_text()) if ws.cluster_meta.exists() else None
    reuse = not refit and previous is not None and previous.get("fit_key") == fit_key and ws.clusters.exists()
    if len(emb) < c.k:
        raise ClusteringError(f"clustering.k: k={c.k} exceeds the number of valid tiles ({len(emb)}); "
                              "lower k or use smaller tiles")
    if reuse:
        model = KMeansClusterer.load(ws.clusters)
    else:
        model = KMeansClusterer(k=c.k, seed=c.seed, sample_size=c.sample_size, niter=c.niter, nredo=c.nredo,
                                pca_dim=c.pca_dim, l2_normalize=c.l2_normalize).fit(emb)
    labels, dist = model.predict(emb)
    kept = meta[meta["kept"]].sort_values("emb_row")
    assignments = pd.DataFrame({"tile_id": kept["tile_id"].to_numpy(), "cluster": labels, "distance": dist})
    if not reuse:
        model.save(ws.clusters)
    write_table(ws.assignments, assignments)
    sizes = np.bincount(labels, minlength=c.k)
    write_json(ws.cluster_meta, {"fit_key": fit_key, "k": c.k, "sizes": sizes.tolist(),
                                 "reused_centroids": reuse, "trained_on": getattr(model, "n_train_", None)})
    return {"k": c.k, "sizes": sizes.tolist(), "reused_centroids": reuse}


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
        geom = shapely.box(k["minx"], k["miny"], k["maxx"], k["maxy"])
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


def _versions() -> dict[str, str]:
    import faiss
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
    handles: dict[int, Any] = {}
    try:
        for cid in range(k):
            members = kept[kept["cluster"] == cid].nsmallest(per_cluster, "distance")
            chips = []
            for _, tile in members.iterrows():
                r = int(tile["raster"])
                if r not in handles:
                    handles[r] = rasterio.open(infos[r].path)
                px, _ = read_tile(handles[r], infos[r], Window(tile["tile_col"], tile["tile_row"],
                                                               tile["tile_w"], tile["tile_h"]))
                chips.append(np.transpose(px, (1, 2, 0)))
            panels.append((cid, labels.label_of(cid), int((kept["cluster"] == cid).sum()), chips))
    finally:
        for h in handles.values():
            h.close()
    return panels


def stage_export(cfg: PipelineConfig, run_started: float | None = None,
                 counters: dict[str, Any] | None = None) -> dict[str, Path]:
    """Labels, histograms and every output file, each written atomically."""
    ws = workspace(cfg)
    infos = load_infos(ws)
    k = cfg.clustering.k
    regions = gpd.read_parquet(ws.regions)
    assign = read_table(ws.assignments, "cluster")
    sizes = np.bincount(assign["cluster"].to_numpy(), minlength=k)
    out_dir = cfg.output_dir
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot create output folder: {exc.strerror}") from None
    gpkg = out_dir / f"{cfg.name}.gpkg"
    pull_edits(gpkg, cfg.labels_path, cfg.name, k, need_snapshot=True)  # edits made in QGIS go to the YAML
    labels = read_labels(cfg.labels_path, k)
    if not cfg.labels_path.exists():
        write_labels(cfg.labels_path, cfg.name, labels, dict(enumerate(sizes.tolist())))
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
    embed_info = read_json(ws.embed_meta, "embed")
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
    }])
    runs = run_row
    if gpkg.exists():
        try:
            old = pyogrio.read_dataframe(gpkg, layer="runs", read_geometry=False)
            runs = pd.concat([old.drop(columns=[c for c in ("fid",) if c in old.columns]), run_row],
                             ignore_index=True)
        except Exception:  # an older file without a runs table: start the history here
            log.warning("%s: could not read earlier runs; history restarts", gpkg)
    styles = vector_styles(palette, k)
    write_geopackage(gpkg, {"tiles": tiles_layer, "regions": regions_layer, "clusters": clusters,
                            "histogram": long, "runs": runs}, styles)
    cluster_map = write_cluster_map(out_dir / f"{cfg.name}_labels.tif",
                                    code_grid(tile_cells(t, [i.crs for i in infos], palette)), palette)
    project = write_project(out_dir / f"{cfg.name}.qgz", gpkg, cluster_map, palette, k, f"settlements: {cfg.name}")
    panels = _atlas_panels(t, infos, labels, k, cfg.output.atlas_tiles)
    plots.atlas(out_dir / "atlas.png", panels, palette, f"{cfg.name}: most typical tiles of each cluster")
    plots.histograms(out_dir / "histograms.png", wide, palette, cfg.output.max_plot_regions,
                     f"{cfg.name}: label histograms")
    plots.label_map(out_dir / "map.png", tiles_layer, regions_layer, palette, f"{cfg.name}: tiles by label")
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


def run(cfg: PipelineConfig, refit: bool = False, lock_timeout: float = 0) -> RunReport:
    """All stages under the pipeline's lock."""
    started = time.time()
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(workspace(cfg).lock))
    try:
        lock.acquire(timeout=lock_timeout)
    except Timeout:
        raise SettlementsError(f"{cfg.source}: another run of pipeline '{cfg.name}' is in progress "
                               f"(lock {workspace(cfg).lock}); try again when it finishes") from None
    try:
        report = RunReport()
        report.tiles = stage_tile(cfg)
        report.embedding = stage_embed(cfg)
        report.clustering = stage_cluster(cfg, refit=refit)
        report.outputs = stage_export(cfg, started, report.embedding)
        report.seconds = time.time() - started
        return report
    finally:
        lock.release()


__all__ = ["run", "stage_tile", "stage_embed", "stage_cluster", "stage_export", "Workspace", "CRS", "to_area_crs"]
