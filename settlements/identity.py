"""Cluster identity across runs: ids that stay put, so the analyst's names stay on their clusters.

A rerun assigns tiles to the saved centroids. A refit matches the new centroids to the old ones
(Hungarian assignment, mutual nearest neighbours) and renumbers the labels file; a first fit in a
fresh work folder takes the ids whose anchor tiles (listed in the labels file) its clusters hold.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from .clustering import KMeansClusterer, match_centroids
from .labels import ClusterLabels, read_labels, write_labels
from .palette import default_cluster_name

log = logging.getLogger(__name__)


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
