"""The Mumbai reference: which tiles are informal settlements, by the hand-made masks; the same search run
on colour statistics (the baseline a CNN must beat); clusters named by their majority mask class. Used by
the tests and by ``benchmarks/similar.py`` and ``benchmarks/transfer.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import rasterio
import yaml
from rasterio.windows import Window

from settlements.config import SIMILAR_CONTEXT, LabelSource, PipelineConfig, SimilarOptions
from settlements.embedding.cache import NpyRows
from settlements.rasters import RasterInfo
from settlements.search import Space
from settlements.similar import Neighbours, Ranking, rank
from settlements.store import read_table, workspace
from settlements.supervised.evaluation import majority_mapping, standardise
from settlements.supervised.train import colour_features
from settlements.supervised.training_labels import tile_labels

#: Mask code of informal settlements; 1-6 are labelled classes (0 unlabelled, 255 nodata).
INFORMAL = 1


def mask_of(image: Path) -> Path:
    return image.with_name(image.name.replace("_image.tif", "_mask.tif"))


def informal_share(infos: list[RasterInfo], tiles: pd.DataFrame) -> np.ndarray:
    """Per tile: the share of its cell's labelled mask pixels that are informal settlements.

    A tile counts as informal at >= 0.5 (the mumbai_train README's rule)."""
    out = np.zeros(len(tiles))
    for r, group in tiles.groupby("raster"):
        with rasterio.open(mask_of(infos[int(r)].path)) as src:
            for pos, (c, row, w, h) in zip(group.index, group[["cell_col", "cell_row", "cell_w", "cell_h"]]
                                           .itertuples(index=False), strict=True):
                m = src.read(1, window=Window(c, row, w, h))
                labelled = (m >= 1) & (m <= 6)
                out[tiles.index.get_loc(pos)] = (m == INFORMAL).sum() / max(int(labelled.sum()), 1)
    return out


def example_draws(informal_rows: np.ndarray, seeds: range | list[int], n: int = 5) -> list[np.ndarray]:
    """``n`` informal tiles (embedding rows) per seed, drawn without replacement."""
    return [np.sort(np.random.default_rng(s).choice(informal_rows, n, replace=False)) for s in seeds]


def precision(ranked_rows: np.ndarray, informal: np.ndarray, n: int) -> float:
    """Share of informal tiles among the first ``n`` ranked (examples already left out)."""
    return float(informal[ranked_rows[:n]].mean())


def all_ranked(space: Space, examples: np.ndarray, negatives: np.ndarray | None = None,
               neighbours: Neighbours | None = None, context: float = SIMILAR_CONTEXT) -> Ranking:
    """Every tile but the examples, best first (exact search), as ``settlements similar`` ranks them."""
    neg = np.empty(0, np.int64) if negatives is None else negatives
    return rank(space, examples, neg, SimilarOptions(len(space.rows), None, "exact", 1, None, context), neighbours)


def colour_space(infos: list[RasterInfo], tiles: pd.DataFrame, folder: Path) -> Space:
    """Standardised colour statistics of every kept tile (rows in embedding order) as a search space."""
    feats = standardise(colour_features(infos, tiles.sort_values("emb_row")))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "colour.npy"
    np.save(path, feats)
    return Space(NpyRows(path), feats.mean(axis=0).astype(np.float32), "colour", folder)


def reference_labels(patches: Path) -> dict[str, Any]:
    """The mumbai_train README's reference per tile, as a ``training.labels`` source: informal if informal
    settlements cover >= 50 % of its cell; formal if built-up + impervious >= 50 % and informal < 10 %; not
    built up if vegetation + barren + water >= 50 % and informal < 10 %; else mixed (no class)."""
    return {"source": "raster", "path": str(patches / "*_mask.tif"),
            "classes": {1: "informal", 2: "built-up", 3: "impervious", 4: "vegetation", 5: "barren", 6: "water"},
            "ignore": [0], "min_share": 0.5,
            "groups": {"informal": {"classes": ["informal"]},
                       "formal": {"classes": ["built-up", "impervious"], "below": {"informal": 0.1}},
                       "not built up": {"classes": ["vegetation", "barren", "water"], "below": {"informal": 0.1}}}}


def tile_reference(cfg: PipelineConfig, reference: dict[str, Any]) -> pd.DataFrame:
    """``tile_id, class`` of the pipeline's kept tiles that the reference gives a class."""
    return tile_labels(cfg, LabelSource.model_validate(reference))


def name_by_majority(cfg: PipelineConfig, reference: dict[str, Any]) -> dict[int, str]:
    """What an analyst does by eye, done by the masks: each cluster of the pipeline's last run named by the
    majority reference class of its tiles (a cluster without a labelled tile: 'unlabelled'), written into its
    labels file (colours left to the palette). Returns the names."""
    assign = read_table(workspace(cfg).assignments, "cluster")
    merged = assign.merge(tile_reference(cfg, reference), on="tile_id")
    mapping, _ = majority_mapping(merged["cluster"].to_numpy(), merged["class"].to_numpy())
    data = yaml.safe_load(cfg.labels_path.read_text())
    names = {int(cid): mapping.get(int(cid), "unlabelled") for cid in data["clusters"]}
    for cid, entry in data["clusters"].items():
        entry.update(name=names[int(cid)], colour=None)
    cfg.labels_path.write_text(yaml.safe_dump(data, sort_keys=False))
    return names
