"""Change between runs: stable cluster ids on refit, and what moved since the previous outputs.

Changes are measured in the *current* cluster names: the previous run's per-cluster areas and
tile clusters are named with today's labels file, so renaming a cluster is not a change, while a
tile that moved to a cluster with another name is. Cluster ids are comparable across runs because
reruns reuse the saved centroids and ``--refit`` keeps the ids of matching clusters.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import geopandas as gpd
import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from .clustering import KMeansClusterer, match_centroids
from .export.geopackage import LayerStyle
from .export.styles import categorized_qml
from .labels import ClusterLabels, read_labels, write_labels
from .palette import column_keys, default_cluster_name

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- refit ids

def keep_cluster_ids(labels_path: Path, model: KMeansClusterer, old: KMeansClusterer,
                     comparable: bool) -> dict[str, Any]:
    """Renumber a fresh fit so clusters matching the previous centroids keep their ids; say what changed."""
    old_names = read_labels(labels_path, old.k).names if labels_path.exists() else {}
    old_c, new_c = old.input_space_centers(), model.input_space_centers()
    if not comparable or old_c.shape[1] != new_c.shape[1]:
        log.warning("clusters: the previous centroids come from another backbone, layer or weights; "
                    "ids cannot be matched and names in %s may not fit the new clusters", labels_path)
        return {"matched": False, "k_old": old.k, "kept": [], "new": list(range(model.k)),
                "gone": [{"id": i, "name": old_names.get(i, default_cluster_name(i))} for i in range(old.k)]}
    m = match_centroids(old_c, new_c)
    model.reorder(m.ids)
    gone = [{"id": i, "name": old_names.get(i, default_cluster_name(i))} for i in m.gone]
    log.info("refit: %d of %d clusters kept their ids; new: %s; gone: %s", len(m.kept), model.k, m.new,
             [g["id"] for g in gone])
    return {"matched": True, "k_old": old.k, "kept": m.kept, "new": m.new, "gone": gone,
            "centroid_shift": {str(k): v for k, v in m.distance.items()}}


def relabel_after_refit(pipeline: str, source: Path, target: Path, matching: dict[str, Any], sizes: np.ndarray,
                        anchors: dict[int, list[int]], out_dir: Path | None = None) -> None:
    """Write the labels file ``source`` renumbered after a matched refit to ``target`` (staged with the
    run's outputs): kept ids keep their names, new ids get defaults; anchors are the refit's."""
    if not matching.get("matched") or not source.exists():
        return
    k = len(sizes)
    old = read_labels(source, max(k, int(matching["k_old"])))
    kept = set(matching["kept"])
    names = {i: old.names[i] if i in kept else default_cluster_name(i) for i in range(k)}
    colours = {i: old.colours.get(i) if i in kept else None for i in range(k)}
    write_labels(target, pipeline, ClusterLabels(names, colours), dict(enumerate(sizes.tolist())), anchors,
                 out_dir=out_dir)


#: Anchor tiles written per cluster into the labels file.
ANCHORS_PER_CLUSTER = 10


def anchor_tiles(assignments: pd.DataFrame, per_cluster: int = ANCHORS_PER_CLUSTER) -> dict[int, list[int]]:
    """The tiles nearest each centroid: what each cluster looked like when it was named."""
    a = assignments.sort_values(["cluster", "distance", "tile_id"], kind="stable")
    return {int(c): g["tile_id"].head(per_cluster).astype(int).tolist() for c, g in a.groupby("cluster")}


def align_to_anchors(labels_path: Path, model: KMeansClusterer, embeddings: Any,
                     kept: pd.DataFrame) -> dict[str, Any] | None:
    """Renumber a first fit so the clusters the labels file names keep their names.

    k-means ids follow cluster sizes, which a tiny change in the embeddings (another CPU, another
    precision) can reorder. The file lists anchor tiles per cluster; each new cluster takes the id
    whose anchors it holds most (Hungarian assignment on the votes). ``kept``: tile_id and emb_row of
    the embedded tiles. None where the labels file has no anchors.
    """
    if not labels_path.exists():
        return None
    anchors = read_labels(labels_path, model.k).anchors
    if not anchors:
        return None
    row_of = dict(zip(kept["tile_id"].to_numpy().tolist(), kept["emb_row"].to_numpy().tolist(), strict=True))
    pairs = [(cid, row_of[t]) for cid, tiles in anchors.items() for t in tiles if t in row_of]
    if not pairs:
        log.warning("%s: none of its anchor tiles is among this run's tiles; cluster ids follow sizes and the "
                    "names may not fit", labels_path)
        return {"anchors": 0, "agreement": 0.0}
    old = np.array([c for c, _ in pairs])
    new, _ = model.predict(embeddings[np.array([r for _, r in pairs])])
    votes = np.zeros((model.k, model.k), dtype=np.int64)
    np.add.at(votes, (new, old), 1)
    rows, cols = linear_sum_assignment(-votes)
    ids = np.empty(model.k, dtype=np.int64)
    ids[rows] = cols
    model.reorder(ids)
    agreement = float(votes[rows, cols].sum() / len(pairs))
    if agreement < 0.5:
        log.warning("%s: only %.0f%% of its anchor tiles fall in the clusters matched to them; the names may "
                    "not fit these clusters (look at atlas.png)", labels_path, 100 * agreement)
    log.info("clusters matched to the labels file's anchors: %d tiles, %.0f%% agree", len(pairs), 100 * agreement)
    return {"anchors": len(pairs), "agreement": round(agreement, 4)}


# ------------------------------------------------------------------------------ previous run

@dataclass(frozen=True)
class PreviousRun:
    """What the change layers need from the GeoPackage a run is about to replace."""

    run_id: str | None
    tiles: pd.DataFrame  # raster, row, col, cluster, cx, cy (cell centre in the output CRS)
    histogram: pd.DataFrame  # region_id, class (cluster id), km2; kind == "cluster" rows only
    crs: str | None


def read_previous(gpkg: Path) -> PreviousRun | None:
    """The previous outputs, or None on a first run (or when the file predates these layers)."""
    if not gpkg.exists():
        return None
    try:
        import pyogrio  # imported where used, so compute-only machines need no OGR

        tiles = pyogrio.read_dataframe(gpkg, layer="tiles", columns=["raster", "row", "col", "cluster"])
        hist = pyogrio.read_dataframe(gpkg, layer="histogram", read_geometry=False)
        runs = pyogrio.read_dataframe(gpkg, layer="runs", read_geometry=False, columns=["run_id"])
    except Exception as exc:  # unreadable or older layout: the history restarts here
        log.warning("%s: cannot read the previous run (%s); no change layers against it", gpkg, exc)
        return None
    cx, cy = _centres(tiles)
    t = pd.DataFrame({"raster": tiles["raster"].to_numpy(), "row": tiles["row"].to_numpy(),
                      "col": tiles["col"].to_numpy(), "cluster": tiles["cluster"].to_numpy(), "cx": cx, "cy": cy})
    h = hist[hist["kind"] == "cluster"][["region_id", "class", "km2"]]
    run_id = str(runs["run_id"].iloc[-1]) if len(runs) else None
    return PreviousRun(run_id, t, h.reset_index(drop=True), tiles.crs.to_string() if tiles.crs else None)


def _centres(frame: gpd.GeoDataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Bounding-box centres: tiles are axis-aligned boxes in their raster's CRS."""
    b = frame.geometry.bounds
    return ((b["minx"] + b["maxx"]) / 2).to_numpy(), ((b["miny"] + b["maxy"]) / 2).to_numpy()


def previous_labels(labels: ClusterLabels, matching: dict[str, Any] | None) -> ClusterLabels:
    """Names of the previous run's clusters: today's names, except clusters a refit found gone.

    A gone cluster keeps its old name (marked when it was only the default ``cluster N``, which
    a new cluster may now carry), so moving off it counts as a change.
    """
    names = dict(labels.names)
    for g in (matching or {}).get("gone", []) if (matching or {}).get("matched") else []:
        name = str(g["name"])
        names[int(g["id"])] = f"{name} (before refit)" if name == default_cluster_name(int(g["id"])) else name
    return ClusterLabels(names, dict(labels.colours), labels.anchors)


def _region_key(values: Any) -> np.ndarray:
    return np.asarray([str(v) for v in values], dtype=object)


def _label_areas(hist: pd.DataFrame, labels: ClusterLabels) -> pd.DataFrame:
    """km² per (region key, current label) from long per-cluster rows."""
    lab = [labels.label_of(int(c)) for c in hist["class"]]
    df = pd.DataFrame({"key": _region_key(hist["region_id"]), "label": lab, "km2": hist["km2"].to_numpy()})
    return df.groupby(["key", "label"])["km2"].sum().unstack(fill_value=0.0)


def region_changes(previous: PreviousRun | None, long: pd.DataFrame, regions: gpd.GeoDataFrame,
                   labels: ClusterLabels, before_labels: ClusterLabels | None = None) -> gpd.GeoDataFrame:
    """Per region: change in each label's fraction of the mapped area and in its km² since the previous run.

    ``dfrac_<label>`` is in fractions (0.05 = five percentage points); ``changed_share`` is half the
    sum of absolute fraction changes, the share of the mapped area whose label changed (net).
    Regions absent from the previous run, and every region on a first run, get NaN.
    """
    now = _label_areas(long[long["kind"] == "cluster"], labels)
    before_labels = before_labels or labels
    before = _label_areas(previous.histogram, before_labels) if previous is not None else pd.DataFrame()
    names = list(labels.palette.labels) + sorted(set(before.columns) - set(labels.palette.labels))
    keys = _region_key(regions["region_id"])
    now = now.reindex(index=keys, columns=names, fill_value=0.0)
    seen = np.isin(keys, before.index.to_numpy()) if previous is not None else np.zeros(len(keys), bool)
    before = before.reindex(index=keys, columns=names, fill_value=0.0)
    out: dict[str, Any] = {"region_id": regions["region_id"].to_numpy(),
                           "region_name": regions["region_name"].to_numpy(),
                           "previous_run": previous.run_id if previous is not None else None}
    tot_now, tot_before = now.sum(axis=1).to_numpy(), before.sum(axis=1).to_numpy()
    frac_now = now.to_numpy() / np.where(tot_now > 0, tot_now, 1.0)[:, None]
    frac_before = before.to_numpy() / np.where(tot_before > 0, tot_before, 1.0)[:, None]
    dfrac = np.where(seen[:, None], frac_now - frac_before, np.nan)
    dkm2 = np.where(seen[:, None], now.to_numpy() - before.to_numpy(), np.nan)
    out["mapped_km2"] = tot_now
    out["mapped_km2_before"] = np.where(seen, tot_before, np.nan)
    out["changed_share"] = np.where(seen, 0.5 * np.abs(np.nan_to_num(dfrac)).sum(axis=1), np.nan)
    has = seen & (np.abs(np.nan_to_num(dfrac)).max(axis=1, initial=0.0) > 1e-9)
    safe = np.nan_to_num(dfrac)
    gain = safe.argmax(axis=1) if names else np.zeros(len(keys), np.int64)
    loss = safe.argmin(axis=1) if names else np.zeros(len(keys), np.int64)
    rows = np.arange(len(keys))
    g, lo = safe[rows, gain] if names else np.zeros(len(keys)), safe[rows, loss] if names else np.zeros(len(keys))
    out["largest_gain"] = [names[gain[i]] if has[i] and g[i] > 1e-9 else None for i in rows]
    out["largest_gain_dfrac"] = np.where(has, g, np.nan)
    out["largest_loss"] = [names[loss[i]] if has[i] and lo[i] < -1e-9 else None for i in rows]
    out["largest_loss_dfrac"] = np.where(has, lo, np.nan)
    keys = column_keys(names)  # the current labels first: their keys are those of the regions layer
    for j, name in enumerate(names):
        out[f"dfrac_{keys[name]}"] = dfrac[:, j]
        out[f"dkm2_{keys[name]}"] = dkm2[:, j]
    return gpd.GeoDataFrame(out, geometry=regions.geometry.values, crs=regions.crs)


def tile_changes(previous: PreviousRun | None, tiles: gpd.GeoDataFrame, labels: ClusterLabels,
                 before_labels: ClusterLabels | None = None) -> gpd.GeoDataFrame:
    """Tiles whose label changed since the previous run: same raster file, same cell, another label.

    A tile is the same when its raster file name, grid row and column match and its cell centre
    lies within a hundredth of a cell of the old one (so a changed tiling never pairs other cells).
    """
    cols = ["tile_id", "raster", "row", "col", "region_id", "old_cluster", "new_cluster", "old_label", "new_label",
            "change"]
    empty = gpd.GeoDataFrame({c: pd.Series([], dtype=object if "label" in c or c in ("raster", "change", "region_id")
                                           else np.int64) for c in cols},
                             geometry=gpd.GeoSeries([], crs=tiles.crs), crs=tiles.crs)
    if previous is None or previous.tiles.empty or tiles.empty:
        return empty
    cx, cy = _centres(tiles)
    now = pd.DataFrame({"i": np.arange(len(tiles)), "raster": tiles["raster"].to_numpy(),
                        "row": tiles["row"].to_numpy(), "col": tiles["col"].to_numpy(), "cx": cx, "cy": cy})
    m = now.merge(previous.tiles, on=["raster", "row", "col"], suffixes=("", "_old"))
    b = tiles.geometry.bounds
    size = np.hypot((b["maxx"] - b["minx"]).to_numpy(), (b["maxy"] - b["miny"]).to_numpy())[m["i"].to_numpy()]
    same_place = np.hypot(m["cx"] - m["cx_old"], m["cy"] - m["cy_old"]).to_numpy() <= 0.01 * size
    if previous.crs is not None and tiles.crs is not None and previous.crs != tiles.crs.to_string():
        same_place[:] = False
    m = m[same_place]
    sel = tiles.iloc[m["i"].to_numpy()]
    old_cluster = m["cluster"].to_numpy().astype(np.int64)
    new_cluster = sel["cluster"].to_numpy().astype(np.int64)
    old_label = np.asarray([(before_labels or labels).label_of(int(c)) for c in old_cluster], dtype=object)
    new_label = np.asarray([labels.label_of(int(c)) for c in new_cluster], dtype=object)
    changed = old_label != new_label
    if not changed.any():
        return empty
    sel = sel[changed]
    return gpd.GeoDataFrame({
        "tile_id": sel["tile_id"].to_numpy().astype(np.int64), "raster": sel["raster"].to_numpy(),
        "row": sel["row"].to_numpy().astype(np.int64), "col": sel["col"].to_numpy().astype(np.int64),
        "region_id": sel["region_id"].to_numpy(), "old_cluster": old_cluster[changed],
        "new_cluster": new_cluster[changed], "old_label": old_label[changed], "new_label": new_label[changed],
        "change": [f"{a} -> {b}" for a, b in zip(old_label[changed], new_label[changed], strict=True)],
    }, geometry=sel.geometry.values, crs=tiles.crs)


def change_styles(labels: ClusterLabels) -> list[LayerStyle]:
    """QGIS default styles for the change layers, from the one palette."""
    palette = labels.palette
    tip = ("<b>[% region_name %]</b><br>since run [% previous_run %]: [% round(changed_share * 100, 1) %] % "
           "of the mapped area changed label<br>" + "<br>".join(
               f"{escape(lb)}: [% round(\"dfrac_{palette.key(lb)}\" * 100, 1) %] points, "
               f"[% round(\"dkm2_{palette.key(lb)}\", 3) %] km²" for lb in palette.labels))
    return [
        LayerStyle("changes", "settlements largest gain",
                   categorized_qml("largest_gain", palette,
                                   aliases={"region_name": "Region", "largest_gain": "Label that grew most",
                                            "largest_loss": "Label that shrank most",
                                            "changed_share": "Share of mapped area that changed label",
                                            "previous_run": "Compared with run"},
                                   outline_width=0.2, map_tip=tip, display_field="region_name"),
                   "regions coloured by the label whose share grew most since the previous run"),
        LayerStyle("tile_changes", "settlements new label",
                   categorized_qml("new_label", palette,
                                   aliases={"old_label": "Label before", "new_label": "Label now",
                                            "change": "Change", "raster": "Source raster"},
                                   outline_width=0.05, map_tip="[% change %]", display_field="change"),
                   "tiles whose label changed since the previous run, coloured by their new label"),
    ]


# ------------------------------------------------------------------------------------ runs

#: Integer columns of the runs table; -1 marks a value an older version did not record.
RUN_INT_COLUMNS = ["k", "tiles_total", "tiles_kept", "tiles_embedded", "tiles_reused", "tiles_skipped",
                   "tiles_skipped_nodata", "tiles_skipped_invalid", "tiles_outside_regions", "cells_clipped",
                   "tiles_changed", "refit", "restarts"]


def run_columns(run_info: dict[str, Any] | None, cluster_info: dict[str, Any], previous: PreviousRun | None,
                n_tile_changes: int) -> dict[str, Any]:
    """The runs-table fields this module adds: timings, refit report, k-means restarts' agreement, what it
    was compared with."""
    info = run_info or {}
    m = cluster_info.get("matching") or {}
    restarts = cluster_info.get("restarts") or {}
    return {
        "started_utc": info.get("started_utc"),
        "stage_seconds": json.dumps(info.get("stage_seconds", {})),
        "refit": int(bool(m)),
        "clusters_kept": json.dumps(m.get("kept", [])),
        "clusters_new": json.dumps(m.get("new", [])),
        "clusters_gone": json.dumps(m.get("gone", [])),
        "restarts": int(restarts.get("restarts", 1)),
        "restart_ari_min": float(restarts.get("min", float("nan"))),
        "restart_ari_mean": float(restarts.get("mean", float("nan"))),
        "previous_run_id": previous.run_id if previous is not None else None,
        "tiles_changed": int(n_tile_changes),
        "state_key": info.get("state_key"),
    }


def concat_runs(old: pd.DataFrame, row: pd.DataFrame) -> pd.DataFrame:
    """Append this run's row to the history, keeping integer columns integer."""
    runs = pd.concat([old, row], ignore_index=True)
    for c in RUN_INT_COLUMNS:
        if c in runs.columns:
            runs[c] = pd.to_numeric(runs[c], errors="coerce").fillna(-1).astype(np.int64)
    return runs
