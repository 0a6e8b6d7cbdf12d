"""The cluster stage: k-means on the embeddings (FAISS), cluster ids kept stable across runs.

Reads the embed stage's artifacts; writes ``cluster_input.npy`` (each embedding averaged with its
neighbours', what k-means sees; absent with ``neighbour_weight`` 0), ``clusters.npz`` (centroids, only
when fitted anew), ``assignments.parquet`` (cluster and distance per kept tile) and ``clusters.json``; a
refit also rewrites the labels file with the clusters renumbered to keep their names. With
``clustering.model`` the tiles are assigned to a model file's clusters instead, which bring their names.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..clustering import KMeansClusterer
from ..config import PipelineConfig, check_k, check_refit
from ..embedding.cache import NpyRows
from ..errors import StageError
from ..executors import Executor, LocalExecutor
from ..identity import align_to_anchors, anchor_tiles, keep_cluster_ids, relabel_after_refit
from ..labels import read_labels, write_labels
from ..neighbours import tile_neighbours, write_with_neighbours
from ..rasters import load_infos
from ..store import Workspace, read_json, read_table, settings_key, write_json, write_table
from ..tiling import ground_order
from ..transfer import (
    check_embedding,
    clusters_key,
    embedder,
    far_share,
    far_warning,
    ground_sizes,
    ground_warning,
    label_snapshot,
    labels_to_write,
    load_model,
    model_clusters,
    model_labels,
    scalings,
)

log = logging.getLogger(__name__)


def cluster(cfg: PipelineConfig, ws: Workspace, refit: bool = False, executor: Executor | None = None
            ) -> dict[str, Any]:
    """Assign tiles to clusters: the saved centroids when they fit these embeddings, else fit anew.

    A refit's centroids, assignments and renumbered labels file are staged like everything else: a
    run killed after the refit leaves the previous ones, and its rerun refits from them again.
    """
    if cfg.clustering.model is not None:
        return cluster_with_model(cfg, ws, refit, executor)
    meta = read_table(ws.embedded, "embed")
    info = read_json(ws.embed_meta, "embed")
    c = cfg.clustering
    source = cluster_input(ws, meta, c.neighbour_weight, c.l2_normalize)
    emb = NpyRows(source)  # rows read on demand: the sample, then assignment blocks
    key = fit_key(cfg, info)
    previous = json.loads(ws.cluster_meta.read_text()) if ws.cluster_meta.exists() else None
    reuse = not refit and previous is not None and previous.get("fit_key") == key and ws.clusters.exists()
    check_k(c.k, len(emb), "valid tiles")
    space_key = embedding_space(info)
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
    labels, dist = (executor or LocalExecutor()).assign(model, source)
    kept = meta[meta["kept"]].sort_values("emb_row")
    assignments = pd.DataFrame({"tile_id": kept["tile_id"].to_numpy(), "cluster": labels, "distance": dist})
    if not reuse:
        model.save(ws.out(ws.clusters))
    write_table(ws.out(ws.assignments), assignments)
    sizes = np.bincount(labels, minlength=c.k)
    if matching is not None:
        relabel_after_refit(cfg.name, ws.labels, ws.out(cfg.labels_path), matching, sizes, anchor_tiles(assignments),
                            cfg.output_dir)
    # the agreement of the restarts and the sameness of the embeddings of the fit in use (carried over while
    # its centroids are reused)
    restarts = previous.get("restarts") if reuse and previous is not None else model.restart_agreement_
    same = previous.get("sameness") if reuse and previous is not None else model.sameness_
    write_json(ws.out(ws.cluster_meta), {
        "fit_key": key, "space_key": space_key, "k": c.k, "sizes": sizes.tolist(), "reused_centroids": reuse,
        "trained_on": getattr(model, "n_train_", None), "restarts": restarts, "sameness": same,
        "matching": matching, "anchored": anchored})
    return {"k": c.k, "sizes": sizes.tolist(), "reused_centroids": reuse, "matching": matching,
            "restarts": restarts, "sameness": same}


def fit_key(cfg: PipelineConfig, info: dict[str, Any]) -> str:
    """What a k-means fit depends on: the clustering settings and the embeddings (``embedding.json``)."""
    return settings_key({"clustering": cfg.clustering.model_dump(exclude={"model"}), "backbone": info["backbone"],
                         "layer": info["layer"], "weights": info["weights_sha256"]})


def embedding_space(info: dict[str, Any]) -> str:
    """What makes centroids comparable: the backbone, layer and weights of the embeddings (``embedding.json``)."""
    return settings_key({"backbone": info["backbone"], "layer": info["layer"], "weights": info["weights_sha256"]})


def cluster_with_model(cfg: PipelineConfig, ws: Workspace, refit: bool, executor: Executor | None
                       ) -> dict[str, Any]:
    """Assign every tile to the clusters of ``clustering.model`` (:mod:`settlements.transfer`): nothing is fitted.

    The embeddings must be made as the model's were (one error naming both values, else); another pixel
    size, tile size or scaling is a warning line, recorded with the clusters (and so in the ``runs``
    table). The labels file starts from the model's names and colours and stays the analyst's
    (:func:`~settlements.transfer.labels_to_write`).
    """
    c = cfg.clustering
    assert c.model is not None
    check_refit(cfg, refit)
    m = load_model(c.model)
    meta = read_table(ws.embedded, "embed")
    info = read_json(ws.embed_meta, "embed")
    check_embedding(m, embedder(cfg, info["layer"], info["weights_sha256"]))
    source = cluster_input(ws, meta, c.neighbour_weight, c.l2_normalize)
    model = model_clusters(m)
    labels, dist = (executor or LocalExecutor()).assign(model, source)
    kept = meta[meta["kept"]].sort_values("emb_row")
    assignments = pd.DataFrame({"tile_id": kept["tile_id"].to_numpy(), "cluster": labels, "distance": dist})
    model.save(ws.out(ws.clusters))
    write_table(ws.out(ws.assignments), assignments)
    sizes = np.bincount(labels, minlength=c.k)
    previous = json.loads(ws.cluster_meta.read_text()) if ws.cluster_meta.exists() else None
    given, key = model_labels(m), clusters_key(m)
    current = read_labels(ws.labels, c.k) if ws.labels.exists() else None
    new, why = labels_to_write(given, key, current, (previous or {}).get("model"), previous is not None)
    if new is not None:
        write_labels(ws.out(cfg.labels_path), cfg.name, new, dict(enumerate(sizes.tolist())),
                     anchor_tiles(assignments), cfg.output_dir)
        log.info("%s: %s (%s)", cfg.labels_path, why, c.model)
    tiles = _kept_tiles(ws, meta)
    pixel_m, tile_m = ground_sizes(load_infos(ws), tiles if tiles is not None else read_table(ws.tiles, "tile"))
    far = far_share(m, labels, dist)
    warnings = [w for w in (ground_warning(m, pixel_m, tile_m, scalings(cfg)), far_warning(m, far)) if w]
    for w in warnings:
        log.warning("model: %s", w)
    used = {"file": str(c.model), "sha256": m.sha256, "clusters_key": key, "labels": label_snapshot(given),
            "warnings": warnings, "far_share": far}
    write_json(ws.out(ws.cluster_meta), {
        "fit_key": None, "space_key": embedding_space(info), "k": c.k, "sizes": sizes.tolist(),
        "reused_centroids": True, "trained_on": None, "restarts": None, "matching": None, "anchored": None,
        "model": used})
    return {"k": c.k, "sizes": sizes.tolist(), "reused_centroids": True, "matching": None, "restarts": None,
            "model": used}


def cluster_input(ws: Workspace, meta: pd.DataFrame, weight: float, normalise: bool) -> Path:
    """The embeddings k-means sees: the stored ones, or each averaged with its neighbours' (``cluster_input.npy``)."""
    if weight == 0:
        return ws.embeddings
    kept = _kept_tiles(ws, meta)
    if kept is None:
        raise StageError(f"{ws.tiles}: tiles of an older version (no ground position); run the pipeline again")
    target = ws.out(ws.cluster_input)
    write_with_neighbours(ws.embeddings, target, tile_neighbours(kept, load_infos(ws)), weight, normalise)
    return target


def _kept_tiles(ws: Workspace, meta: pd.DataFrame) -> pd.DataFrame | None:
    """The tile table's rows of the kept tiles, in embedding order (None for tiles of an older version)."""
    tiles = read_table(ws.tiles, "tile")
    if "ground_x" not in tiles.columns:
        return None
    return meta[meta["kept"]].sort_values("emb_row")[["tile_id"]].merge(tiles, on="tile_id", how="left")


def _ground_order(ws: Workspace, meta: pd.DataFrame) -> np.ndarray | None:
    """Embedding rows in the order of their tiles on the ground (None for tiles of an older version)."""
    kept = _kept_tiles(ws, meta)
    return None if kept is None else ground_order(kept["ground_x"].to_numpy(), kept["ground_y"].to_numpy())
