"""The export stage: labels, histograms and every output file, from the artifacts of the other stages.

Writes the cluster map (:mod:`settlements.export.tile_map`: the GeoPackage's tiles, regions and
histogram, the COG, map and histograms pictures) with the rest of the GeoPackage (clusters, runs,
changes, the analyst's layers carried over), the QGIS project and the atlas into ``outputs/<name>/``
(names from :mod:`settlements.products`), all staged and committed with the run.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
from rasterio.windows import Window

from ..changes import previous_labels, region_changes, tile_changes
from ..clustering import KMeansClusterer, cluster_warnings
from ..config import PipelineConfig
from ..embedding.assemble import embed_counts
from ..export import plots
from ..export.geopackage import add_layers
from ..export.previous import read_previous, read_runs
from ..export.qgis_project import write_pipeline_project
from ..export.runs import concat_runs, engine_columns, run_columns
from ..export.styles import change_styles, vector_styles
from ..export.tile_map import CLUSTER_LAYERS, named_as_final, tile_map, write_tile_map
from ..identity import anchor_tiles
from ..labels import ClusterLabels, exported_snapshot, pull_edits, read_labels, write_labels
from ..products import outputs
from ..rasters import OpenRasters, RasterInfo, clipping_warning, load_infos, read_tile
from ..reprocess import output_paths
from ..similar_examples import analyst_layers
from ..store import Workspace, ensure_dir, read_json, read_table
from ..tile_tables import tiles_frame

log = logging.getLogger(__name__)

#: GDAL's block cache (bytes) while this process reads scattered tiles (the atlas).
SCATTERED_READ_CACHE = 16 << 20


def result_warnings(infos: list[RasterInfo], cluster_info: dict, k: int) -> list[str]:
    """Signs of a result not to trust (most pixels clipped, embeddings with little to split, k-means restarts
    that disagree); logged as one line."""
    found = [w for w in (clipping_warning(i) for i in infos) if w]
    found += cluster_warnings(cluster_info.get("sameness"), cluster_info.get("restarts"), k)
    if found:
        log.warning("result: %s", "; ".join(found))
    return found


def atlas_panels(t: pd.DataFrame, infos: list[RasterInfo], labels: ClusterLabels, k: int,
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


def export(cfg: PipelineConfig, ws: Workspace, run_started: float | None, counters: dict[str, Any] | None,
           run_info: dict[str, Any]) -> dict[str, Path]:
    """Labels, histograms and every output file; return the outputs' final paths.

    All outputs are built in a hidden staging folder beside them, and put in place with the rest
    of the run (or of this export) at its commit, so a run killed while writing leaves the previous
    outputs as they were. ``run_info``: what the runner knows of the run (start, stage times, state
    key, library versions) for its row in the ``runs`` table.
    """
    infos = load_infos(ws)
    k = cfg.clustering.k
    regions = gpd.read_parquet(ws.regions)
    assign = read_table(ws.assignments, "cluster")
    sizes = np.bincount(assign["cluster"].to_numpy(), minlength=k)
    out_dir = cfg.output_dir
    ensure_dir(out_dir, "output.dir")
    files = outputs(cfg)
    gpkg = files.gpkg
    # edits made in QGIS go to the YAML (committed with the outputs)
    pull_edits(gpkg, ws.labels, cfg.name, k, need_snapshot=True, target=ws.out(cfg.labels_path),
               shown=cfg.labels_path)
    labels = read_labels(ws.labels, k)
    if not ws.labels.exists():
        write_labels(ws.out(cfg.labels_path), cfg.name, labels, dict(enumerate(sizes.tolist())), anchor_tiles(assign),
                     out_dir=out_dir)
        log.info("wrote labels template %s: name the clusters, then run again", cfg.labels_path)
    legend = labels.legend()
    t, tiles_out = tiles_frame(cfg, ws, infos, labels, regions)
    shares = read_table(ws.shares, "tile")
    cluster_map = tile_map(t, tiles_out, shares, regions, [i.crs for i in infos], cfg.output.crs, legend,
                           (f"{cfg.name}: tiles by label", f"{cfg.name}: label histograms"), clusters=k)
    regions_out, long = cluster_map.regions, cluster_map.histogram
    centroids = KMeansClusterer.load(ws.clusters).cluster_centers_
    clusters = pd.DataFrame({
        "cluster": np.arange(k, dtype=np.int32),
        "label": [labels.label_of(i) for i in range(k)],
        "colour": [legend.colour(labels.label_of(i)) for i in range(k)],
        "size": sizes.astype(np.int64),
        "centroid_norm": np.linalg.norm(centroids, axis=1).astype(np.float64),
    })
    cluster_info = read_json(ws.cluster_meta, "cluster")
    embed_info = read_json(ws.embed_meta, "embed")
    warnings = result_warnings(infos, cluster_info, k)
    if embed_info.get("engine_warning"):
        warnings.append(embed_info["engine_warning"])
    previous = read_previous(gpkg)
    before = previous_labels(labels, cluster_info.get("matching"))
    changes = region_changes(previous, long, regions_out, labels, before)
    changed_tiles = tile_changes(previous, tiles_out, labels, before)
    kept, kept_styles = analyst_layers(gpkg, cfg.output.crs)  # drawn examples, similar results: always kept
    skips = embed_counts(t, np.empty(0, np.int64))  # why tiles were skipped, from every tile's validity
    run_row = {
        "config": json.dumps(cfg.to_yaml_dict(), default=str),
        "config_path": str(cfg.source or ""),
        "labels_path": str(cfg.labels_path),
        "labels": json.dumps(exported_snapshot(labels)),
        "backbone": embed_info["backbone"], "layer": embed_info["layer"],
        "weights_sha256": embed_info["weights_sha256"], "weights_source": embed_info["weights_source"],
        "device": embed_info["device"],
        **engine_columns(embed_info),
        "versions": json.dumps(run_info.get("versions", {})),
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
    }
    old_runs = read_runs(gpkg)
    styles = vector_styles(legend, k) + change_styles(legend) + kept_styles
    stage = ws.out_dir(out_dir)
    with named_as_final(stage, out_dir):
        write_tile_map(cluster_map, files.cluster_map.in_folder(stage), CLUSTER_LAYERS, styles,
                       cfg.output.max_plot_regions, extra={"clusters": clusters, "changes": changes,
                                                           "tile_changes": changed_tiles, **kept})
        write_pipeline_project(files, stage, infos, f"settlements: {cfg.name}", list(kept), mosaics=True)
        panels = atlas_panels(t, infos, labels, k, cfg.output.atlas_tiles)
        plots.atlas(stage / files.atlas.name, panels, legend, f"{cfg.name}: most typical tiles of each cluster")
        # the run's row last, when every output is written: its duration is the run's (what the summary line says)
        now = datetime.now(timezone.utc)
        row = pd.DataFrame([{"run_id": now.strftime("%Y%m%dT%H%M%S.%fZ"),
                             "finished_utc": now.isoformat(timespec="seconds"),
                             "duration_s": float(time.time() - run_started) if run_started else float("nan"),
                             **run_row}])
        add_layers(stage / gpkg.name, {"runs": row if old_runs is None else concat_runs(old_runs, row)}, [])
    return output_paths(cfg)
