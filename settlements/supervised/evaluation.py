"""Honest evaluation: spatially blocked cross-validation and clustering quality against reference labels.

Tiles are grouped into square blocks of ground, ``block_tiles`` x ``block_tiles`` stride cells; whole
blocks go to folds, so neighbouring (overlapping, autocorrelated) tiles never sit on both sides of a split.
Every method is scored on the same held-out blocks. The k-means baseline uses the pipeline's
clusters (fitted without labels) and maps each cluster to the majority training label of the
training folds only.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import (
    adjusted_rand_score,
    confusion_matrix,
    normalized_mutual_info_score,
    precision_recall_fscore_support,
)

from ..config import Length
from ..rasters import RasterInfo

MACRO = "macro avg"


def block_side_m(stride: Length, infos: list[RasterInfo], tiles: pd.DataFrame, block_tiles: int) -> float:
    """The side of a block in ground metres: ``block_tiles`` strides.

    A stride in pixels is a ground length per raster: then the median over the tiles of their
    raster's stride cell.
    """
    if stride.unit == "m":
        return block_tiles * stride.value
    per_raster = tiles.groupby("raster").agg(w=("cell_w", "max"), h=("cell_h", "max"))
    ground = {int(r): float(np.sqrt(row.w * infos[int(r)].pixel_w_m * row.h * infos[int(r)].pixel_h_m))
              for r, row in per_raster.iterrows()}
    return block_tiles * float(np.median(tiles["raster"].map(ground).to_numpy()))


def spatial_blocks(tiles: pd.DataFrame, side_m: float) -> np.ndarray:
    """Block id of each tile: the ``side_m`` square of ground (equal-area metres) its cell centre lies in.

    On the ground, not on a raster's grid: tiles of neighbouring files share a block, and a scene cut
    into many files gets the blocks (and ids, numbered in the blocks' order on the ground) of one mosaic.
    """
    bx = np.floor(tiles["ground_x"].to_numpy() / side_m).astype(np.int64)
    by = np.floor(tiles["ground_y"].to_numpy() / side_m).astype(np.int64)
    codes, _ = pd.factorize(pd.MultiIndex.from_arrays([by, bx]), sort=True)
    return codes.astype(np.int64)


def block_folds(blocks: np.ndarray, weights: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold of each tile: blocks in a seeded random order, each to the fold with least weight so far."""
    ids = np.unique(blocks)
    if len(ids) < folds:
        from ..errors import ConfigError

        raise ConfigError(f"training.evaluation: only {len(ids)} spatial blocks for {folds} folds "
                          "(lower folds or block_tiles)")
    order = np.random.default_rng(seed).permutation(ids)
    per_block = pd.Series(weights).groupby(blocks).sum().reindex(ids, fill_value=0.0)
    load = np.zeros(folds)
    fold_of = {}
    for i, b in enumerate(order):
        f = i if i < folds else int(np.argmin(load))  # every fold gets at least one block
        fold_of[b] = f
        load[f] += per_block[b]
    return np.asarray([fold_of[b] for b in blocks], dtype=np.int64)


def majority_mapping(clusters: np.ndarray, y: np.ndarray) -> tuple[dict[int, str], str]:
    """Cluster -> its most frequent label among ``y``, and the overall majority for unseen clusters."""
    frame = pd.DataFrame({"c": clusters, "y": y})
    mapping = frame.groupby("c")["y"].agg(lambda s: s.value_counts().index[0]).to_dict()
    return {int(k): str(v) for k, v in mapping.items()}, str(frame["y"].value_counts().index[0])


def class_scores(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Per-class precision, recall, F1, support, plus a macro-average row (class ``macro avg``)."""
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=classes, zero_division=0)
    out = pd.DataFrame({"class": classes, "precision": p, "recall": r, "f1": f, "support": s.astype(np.int64)})
    macro = pd.DataFrame({"class": [MACRO], "precision": [p.mean()], "recall": [r.mean()], "f1": [f.mean()],
                          "support": [int(s.sum())]})
    return pd.concat([out, macro], ignore_index=True)


def confusion_long(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> pd.DataFrame:
    m = confusion_matrix(y_true, y_pred, labels=classes)
    return pd.DataFrame({"true": np.repeat(classes, len(classes)), "predicted": np.tile(classes, len(classes)),
                         "count": m.ravel().astype(np.int64)})


def purity(y_true: np.ndarray, clusters: np.ndarray) -> float:
    """Share of tiles whose cluster's majority reference class is their own class."""
    frame = pd.DataFrame({"c": clusters, "y": y_true})
    return float(frame.groupby("c")["y"].agg(lambda s: s.value_counts().iloc[0]).sum() / max(len(frame), 1))


def cluster_quality(y_true: np.ndarray, clusters: np.ndarray) -> dict[str, float]:
    return {"nmi": float(normalized_mutual_info_score(y_true, clusters)),
            "ari": float(adjusted_rand_score(y_true, clusters)), "purity": purity(y_true, clusters)}


def colour_statistics(pixels: np.ndarray, valid: np.ndarray, bins: int = 8) -> np.ndarray:
    """Per band: mean, std and a ``bins``-bin histogram (shares) of valid scaled pixels in [0, 1]."""
    px = pixels[:, valid] if valid.any() else pixels.reshape(pixels.shape[0], -1)
    feats = []
    for band in px:
        hist = np.histogram(np.clip(band, 0, 1), bins=bins, range=(0.0, 1.0))[0] / max(band.size, 1)
        feats.extend([float(band.mean()), float(band.std()), *hist.tolist()])
    return np.asarray(feats, dtype=np.float32)


def standardise(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per column, so means, spreads and histogram shares weigh alike."""
    sd = x.std(axis=0)
    return ((x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)).astype(np.float32)
