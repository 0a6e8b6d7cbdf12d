"""Per-region cluster and label histograms: counts, fractions and equal-area km2.

A tile stands for its stride cell. Its area in a region is the cell clipped to the region,
times the cell's share of valid pixels, so label areas add up to the region's imaged area.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd


def region_histograms(tiles: pd.DataFrame, shares: pd.DataFrame, regions: pd.DataFrame,
                      keys: Mapping[str, str], k: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Wide per-region table and long (region, kind, class) table.

    ``keys``: each label, in order, with its column key (a legend's, :attr:`settlements.palette.Legend.keys`:
    unique, never a table column); the long table's ``class`` holds the label's own text. ``k`` > 0 adds
    the same numbers per cluster (columns ``n_c0``, ...; rows of kind ``cluster``).

    ``tiles``: tile_id, kept, valid_cell, label (and cluster, with ``k``). ``shares``: tile_id, region,
    area_m2. ``regions``: region (index), region_id, region_name, area_m2.
    """
    columns = ["tile_id", "kept", "valid_cell", "label", *(["cluster"] if k else [])]
    s = shares.merge(tiles[columns], on="tile_id", how="left")
    s["kept"] = s["kept"].fillna(False).astype(bool)
    s["valid_cell"] = s["valid_cell"].fillna(0.0)
    s["valid_m2"] = s["area_m2"] * s["valid_cell"]
    mapped = s[s["kept"]]

    out = regions[["region", "region_id", "region_name"]].copy()
    out["area_km2"] = regions["area_m2"].to_numpy() / 1e6
    grouped = s.groupby("region")
    out["imaged_km2"] = out["region"].map(grouped["valid_m2"].sum()).fillna(0.0) / 1e6
    mg = mapped.groupby("region")
    out["mapped_km2"] = out["region"].map(mg["valid_m2"].sum()).fillna(0.0) / 1e6
    out["n_tiles"] = out["region"].map(mg["tile_id"].nunique()).fillna(0).astype(np.int64)
    skipped = s[~s["kept"]].groupby("region")["tile_id"].nunique()
    out["n_skipped"] = out["region"].map(skipped).fillna(0).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["valid_fraction"] = np.where(out["area_km2"] > 0, out["imaged_km2"] / out["area_km2"], 0.0)

    long_parts = []
    wide: dict[str, pd.Series] = {}
    kinds: list[tuple[str, str, list[Any], Callable[[Any], str]]] = [("label", "label", list(keys), lambda c: keys[c])]
    if k:
        kinds.append(("cluster", "cluster", list(range(k)), lambda c: f"c{c}"))
    for kind, column, classes, name in kinds:
        counts = mapped.groupby(["region", column])["tile_id"].nunique().unstack(fill_value=0)
        areas = mapped.groupby(["region", column])["valid_m2"].sum().unstack(fill_value=0.0) / 1e6
        counts = counts.reindex(index=out["region"], columns=classes, fill_value=0)
        areas = areas.reindex(index=out["region"], columns=classes, fill_value=0.0)
        total = areas.sum(axis=1).to_numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            fracs = areas.div(np.where(total > 0, total, np.nan), axis=0).fillna(0.0)
        for c in classes:
            wide[f"n_{name(c)}"] = counts[c].to_numpy()
            wide[f"frac_{name(c)}"] = fracs[c].to_numpy()
            wide[f"km2_{name(c)}"] = areas[c].to_numpy()
        if kind == "label":
            dom = areas.idxmax(axis=1).where(total > 0)
            wide["dominant_label"] = dom.to_numpy()
        lp = pd.DataFrame({
            "region": np.repeat(out["region"].to_numpy(), len(classes)),
            "kind": kind,
            "class": np.tile(np.asarray([str(c) for c in classes], dtype=object), len(out)),
            "count": counts.to_numpy().ravel(),
            "fraction": fracs.to_numpy().ravel(),
            "km2": areas.to_numpy().ravel(),
        })
        long_parts.append(lp)
    out = pd.concat([out.reset_index(drop=True), pd.DataFrame(wide)], axis=1)
    long = pd.concat(long_parts, ignore_index=True)
    long = long.merge(out[["region", "region_id", "region_name"]], on="region")
    return out, long[["region_id", "region_name", "kind", "class", "count", "fraction", "km2"]]
