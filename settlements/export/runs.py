"""The ``runs`` table of the GeoPackage: one row per run that wrote outputs, appended to the history.

The row's clock, timing and state-key fields come from the runner (:mod:`settlements.pipeline`);
the counts from the stages (:mod:`settlements.stages.export`).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from .previous import PreviousRun

#: Integer columns of the runs table; -1 marks a value an older version did not record.
RUN_INT_COLUMNS = ["k", "tiles_total", "tiles_kept", "tiles_embedded", "tiles_reused", "tiles_skipped",
                   "tiles_skipped_nodata", "tiles_skipped_invalid", "tiles_outside_regions", "cells_clipped",
                   "tiles_changed", "refit", "restarts"]


def run_columns(run_info: dict[str, Any] | None, cluster_info: dict[str, Any], previous: PreviousRun | None,
                n_tile_changes: int) -> dict[str, Any]:
    """The runs-table fields this module adds: timings, refit report, k-means restarts' agreement, what it
    was compared with, the model file whose clusters it took (path and SHA-256; empty when it fitted its
    own) and that file's warnings (another pixel size, tile size or scaling; tiles far from its clusters)."""
    info = run_info or {}
    m = cluster_info.get("matching") or {}
    restarts = cluster_info.get("restarts") or {}
    model = cluster_info.get("model") or {}
    return {
        "model_file": model.get("file", ""),
        "model_sha256": model.get("sha256", ""),
        "model_warnings": json.dumps(model.get("warnings", [])),
        "model_far_share": float(model.get("far_share", float("nan"))),
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


def engine_columns(embed_info: dict[str, Any]) -> dict[str, Any]:
    """What embedded the run and the fidelity gate's figures: ``engine``, ``precision``, ``engine_cosine_p01``
    (1st percentile of the per-tile cosine to torch fp32) and ``engine_ari`` (k-means agreement) of the
    chosen engine (NaN: torch fp32, the reference, not gated), and ``engine_gate``: the setting, the reason,
    every verdict (refused ones too) and ``auto``'s measured tiles/s, as JSON."""
    gate = embed_info.get("engine_gate") or {}
    return {
        "engine": embed_info.get("engine", "torch"),
        "precision": embed_info.get("precision", "fp32"),
        "engine_cosine_p01": float(gate.get("cosine_p01", float("nan"))),
        "engine_ari": float(gate.get("ari", float("nan"))),
        "engine_gate": strict_json({k: embed_info.get(k) for k in (
            "engine_requested", "engine_reason", "engine_gate", "engine_refused", "engine_rates",
            "engine_model_sha256")}),
    }


def strict_json(value: Any) -> str:
    """JSON that any reader accepts: a NaN or infinity (a figure not measured) written as null."""
    def finite(v: Any) -> Any:
        if isinstance(v, float) and not np.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [finite(x) for x in v]
        return v
    return json.dumps(finite(value), allow_nan=False)


def concat_runs(old: pd.DataFrame, row: pd.DataFrame) -> pd.DataFrame:
    """Append this run's row to the history, keeping integer columns integer."""
    runs = pd.concat([old, row], ignore_index=True)
    for c in RUN_INT_COLUMNS:
        if c in runs.columns:
            runs[c] = pd.to_numeric(runs[c], errors="coerce").fillna(-1).astype(np.int64)
    return runs
