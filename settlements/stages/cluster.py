"""The cluster stage: k-means on the embeddings (FAISS), cluster ids kept stable across runs.

Reads the embed stage's artifacts; writes ``clusters.npz`` (centroids, only when fitted anew),
``assignments.parquet`` (cluster and distance per kept tile) and ``clusters.json``; a refit also
rewrites the labels file with the clusters renumbered to keep their names.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from ..clustering import KMeansClusterer
from ..config import PipelineConfig, check_k
from ..embedding.cache import NpyRows
from ..executors import Executor, LocalExecutor
from ..identity import align_to_anchors, anchor_tiles, keep_cluster_ids, relabel_after_refit
from ..store import Workspace, read_json, read_table, settings_key, write_json, write_table
from ..tiling import ground_order


def cluster(cfg: PipelineConfig, ws: Workspace, refit: bool = False, executor: Executor | None = None
            ) -> dict[str, Any]:
    """Assign tiles to clusters: the saved centroids when they fit these embeddings, else fit anew.

    A refit's centroids, assignments and renumbered labels file are staged like everything else: a
    run killed after the refit leaves the previous ones, and its rerun refits from them again.
    """
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
