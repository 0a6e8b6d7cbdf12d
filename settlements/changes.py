"""Change since the previous run: per-region label shares and areas, and the tiles whose label changed.

Changes are measured in the *current* cluster names: the previous run's per-cluster areas and
tile clusters are named with today's labels file, so renaming a cluster is not a change, while a
tile that moved to a cluster with another name is. Cluster ids are comparable across runs because
reruns reuse the saved centroids and ``--refit`` keeps the ids of matching clusters
(:mod:`settlements.identity`). The previous run is read by :mod:`settlements.export.previous`.
"""

from __future__ import annotations

from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd

from .export.previous import PreviousRun, box_centres
from .labels import ClusterLabels
from .palette import column_keys, default_cluster_name


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
    names = list(labels.legend().labels) + sorted(set(before.columns) - set(labels.legend().labels))
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
    columns = column_keys(names)  # the current labels first: their keys are those of the regions layer
    for j, name in enumerate(names):
        out[f"dfrac_{columns[name]}"] = dfrac[:, j]
        out[f"dkm2_{columns[name]}"] = dkm2[:, j]
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
    cx, cy = box_centres(tiles)
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
