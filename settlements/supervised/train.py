"""``settlements train``: training labels -> top model -> (fine tuning) -> blocked cross-validation.

Models go to ``work/<name>/supervised/`` (each with the settings that made it, and ``training.json``);
the evaluation to ``outputs/<name>/``: ``evaluation.csv``, ``confusion.csv``, ``confusion.png`` and
``cluster_quality.csv`` (names from :class:`settlements.store.Workspace` and :mod:`settlements.products`).
All of them are written through the command's commit (:func:`settlements.pipeline.train`): a training
that fails (its evaluation too) or is interrupted replaces none of the last good ones. The fine
tuning's checkpoint is work state, written each epoch, so a rerun with the same settings resumes there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rasterio.windows import Window
from sklearn.metrics import f1_score

from ..clustering import KMeansClusterer
from ..config import FineTuneSettings, PipelineConfig, TopModelSettings, Training
from ..errors import ConfigError, StageError, TrainingError
from ..neighbours import neighbour_mean, tile_neighbours, with_neighbours
from ..products import outputs
from ..progress import counted, step
from ..rasters import OpenRasters, RasterInfo, load_infos, read_tile
from ..store import Workspace, read_table, write_atomic, write_json
from ..tile_tables import kept_tiles
from ..tiling import ground_order
from .evaluation import (
    block_folds,
    block_side_m,
    class_scores,
    cluster_quality,
    colour_statistics,
    confusion_long,
    majority_mapping,
    spatial_blocks,
    standardise,
)
from .figures import confusion_figure
from .finetune import FineTuner, TileImages, targets_of
from .top_model import TopModel, save_state
from .training_labels import tile_labels

log = logging.getLogger(__name__)

METHODS = ("kmeans", "top_model", "fine_tuned")


def training_settings(cfg: PipelineConfig) -> Training:
    if cfg.training is None:
        raise ConfigError(f"{cfg.source}: training: section missing (add training.labels, e.g. "
                          "{source: clusters} or {source: polygons, path: labels.gpkg, class_field: class})")
    return cfg.training


def scored_against(t: Training) -> tuple[str, str]:
    """What the blocked evaluation scores against, short (a CSV column) and in words (pictures, printed lines).

    Without a ``reference`` the scores are against the training labels themselves: they say how well a
    method reproduces those labels on held-out blocks, not how right the labels are. With ``source:
    clusters`` the k-means row scores the clusters against their own names.
    """
    if t.reference is not None:
        return f"reference ({t.reference.source})", f"against the reference ({t.reference.source})"
    assert t.labels is not None, "train refuses a training section without labels before any scoring"
    return (f"training labels ({t.labels.source})",
            f"against the training labels themselves ({t.labels.source}), not an independent reference")


def make_top_model(settings: TopModelSettings) -> TopModel:
    return TopModel(**settings.model_dump(exclude={"neighbours"}))


def feature_parts(settings: TopModelSettings) -> int:
    """Embeddings side by side in the rows a top model of ``settings`` (neighbours resolved) sees."""
    return 2 if settings.neighbours is True else 1


#: Folds of the blocked cross-validation that decides ``neighbours: auto`` (on the training labels only).
NEIGHBOUR_FOLDS = 3


@dataclass(frozen=True)
class TopModelInputs:
    """Both feature sets a top model may see, per embedding row: the tile alone, and beside the mean of its
    neighbours' (``tiles``: every kept tile, in embedding order)."""

    alone: np.ndarray
    with_neighbours: np.ndarray
    near: np.ndarray  # each row's neighbours (:func:`settlements.neighbours.tile_neighbours`)

    @classmethod
    def of(cls, emb: np.ndarray, tiles: pd.DataFrame, infos: list[RasterInfo]) -> TopModelInputs:
        alone = np.asarray(emb, dtype=np.float32)
        near = tile_neighbours(tiles, infos)
        return cls(alone, neighbour_mean(alone, near), near)

    def features(self, settings: TopModelSettings) -> np.ndarray:
        if settings.neighbours == "auto":
            raise ValueError("training.top_model.neighbours: resolve 'auto' first (resolve_neighbours)")
        return self.with_neighbours if settings.neighbours else self.alone


def resolve_neighbours(settings: TopModelSettings, inputs: TopModelInputs, y: np.ndarray, blocks: np.ndarray,
                       train: np.ndarray, seed: int) -> tuple[TopModelSettings, dict[str, float]]:
    """``settings`` with ``neighbours`` decided: as given, or (``auto``) the feature set whose top model
    scores the better macro F1 in a blocked cross-validation over the ``train`` rows (labels ``y``,
    spatial ``blocks``); a tie, or folds too few to compare, keep the tile alone. Returns the scores too."""
    if settings.neighbours != "auto":
        return settings, {}
    alone = settings.model_copy(update={"neighbours": False})
    rows = np.flatnonzero(train)
    if len(np.unique(blocks[rows])) < NEIGHBOUR_FOLDS:
        return alone, {}
    folds = block_folds(blocks[rows], np.ones(len(rows)), NEIGHBOUR_FOLDS, seed)
    yt = y[rows].astype(str)
    scores: dict[str, float] = {}
    for name, candidate in (("alone", alone), ("neighbours", settings.model_copy(update={"neighbours": True}))):
        x = inputs.features(candidate)[rows]
        truth, pred = [], []
        for f in range(NEIGHBOUR_FOLDS):
            tr, te = folds != f, folds == f
            if not te.any() or len(np.unique(yt[tr])) < 2:
                return alone, {}
            truth.append(yt[te])
            pred.append(make_top_model(candidate).fit(x[tr], yt[tr], parts=feature_parts(candidate)).predict(x[te]))
        scores[name] = float(f1_score(np.concatenate(truth), np.concatenate(pred), average="macro", zero_division=0))
    return settings.model_copy(update={"neighbours": scores["neighbours"] > scores["alone"]}), scores


def make_finetuner(cfg: PipelineConfig, ft: FineTuneSettings) -> FineTuner:
    return FineTuner.from_settings(cfg.embedding, ft)


def fine_tune(cfg: PipelineConfig, infos: list[RasterInfo], tiles: pd.DataFrame, y: np.ndarray, emb: np.ndarray,
              checkpoint: Path | None = None) -> FineTuner:
    """Fine tune on labelled ``tiles`` (class ``y``), holding out whole spatial blocks (column ``block``) for
    early stopping.

    The starting top model is fitted on the training split only, so the validation loss of epoch 0
    (the top model itself) is as honest as that of later epochs.
    """
    t = training_settings(cfg)
    ft = t.finetune
    blocks = tiles["block"].to_numpy()
    n_split = max(2, round(1 / ft.val_fraction))
    if len(np.unique(blocks)) < n_split:
        raise TrainingError(f"training.finetune: {len(np.unique(blocks))} spatial blocks are too few for a "
                            f"{ft.val_fraction:.0%} validation split (lower evaluation.block_tiles)")
    val = block_folds(blocks, np.ones(len(tiles)), n_split, ft.seed) == 0
    # the fine-tuned network sees one tile: its head starts from a top model of that tile alone
    top = make_top_model(t.top_model).fit(emb[tiles["emb_row"].to_numpy()[~val]], y[~val])
    keep = np.isin(y, top.classes_)
    rng = np.random.default_rng(ft.seed)
    if ft.max_tiles is not None and keep.sum() > ft.max_tiles:
        keep[rng.choice(np.flatnonzero(keep), int(keep.sum()) - ft.max_tiles, replace=False)] = False
    targets = np.zeros(len(y), dtype=np.int64)
    targets[keep] = targets_of(y[keep], top.classes_)

    def images(mask: np.ndarray, aug: bool) -> TileImages:
        return TileImages(infos, tiles[mask & keep], cfg.embedding.input_size, targets[mask & keep], aug,
                          ft.max_shift, ft.seed)

    extra = {"pipeline": cfg.name, "labels": t.labels.model_dump(mode="json") if t.labels is not None else None,
             "top_model": top.state()["params"]}
    return make_finetuner(cfg, ft).fit(images(~val, ft.augment), images(val, False), top, checkpoint, extra)


def _class_column(tiles: pd.DataFrame, labels: pd.DataFrame) -> np.ndarray:
    return tiles[["tile_id"]].merge(labels, on="tile_id", how="left")["class"].to_numpy(dtype=object)


def evaluate(cfg: PipelineConfig, ws: Workspace, infos: list[RasterInfo], tiles: pd.DataFrame, emb: np.ndarray,
             y_train: np.ndarray, y_ref: np.ndarray, inputs: TopModelInputs | None = None) -> dict[str, Any]:
    """Blocked cross-validation of every method on the same held-out blocks; clustering quality. Every file and
    the returned ``macro_f1`` name what they score against (:func:`scored_against`).

    A held-out tile's neighbours may lie in a training block: the top model then sees their imagery's
    embeddings (as it does when predicting), never their labels. ``inputs``: :meth:`TopModelInputs.of` these
    tiles, when the caller has them.
    """
    t = training_settings(cfg)
    inputs = inputs or TopModelInputs.of(emb, tiles, infos)
    blocks = tiles["block"].to_numpy()
    ev = t.evaluation
    files = outputs(cfg)
    has_train, has_ref = pd.notna(y_train), pd.notna(y_ref)
    fold = block_folds(tiles["block"].to_numpy(), has_ref.astype(float), ev.folds, ev.seed)
    assign = read_table(ws.assignments, "cluster")
    clusters = tiles[["tile_id"]].merge(assign, on="tile_id", how="left")["cluster"].to_numpy()
    do_ft = t.finetune.enabled and ev.finetune
    methods = [m for m in METHODS if m != "fine_tuned" or do_ft]
    truth: list[np.ndarray] = []
    preds: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    for f in counted(range(ev.folds), "cross-validation", "fold"):
        tr, te = (fold != f) & has_train, (fold == f) & has_ref
        if not te.any():
            continue
        if len(np.unique(y_train[tr].astype(str))) < 2:
            raise TrainingError(f"training.evaluation: fold {f} has fewer than two training classes "
                                "(use fewer folds or smaller blocks)")
        truth.append(y_ref[te].astype(str))
        mapping, fallback = majority_mapping(clusters[tr], y_train[tr].astype(str))
        preds["kmeans"].append(np.asarray([mapping.get(int(c), fallback) for c in clusters[te]], dtype=str))
        # ``neighbours: auto`` is decided inside the fold, on its training tiles alone
        chosen, _ = resolve_neighbours(t.top_model, inputs, y_train, blocks, tr, ev.seed)
        feats = inputs.features(chosen)
        top = make_top_model(chosen).fit(feats[tr], y_train[tr], parts=feature_parts(chosen))
        preds["top_model"].append(top.predict(feats[te]))
        if do_ft:
            ftm = fine_tune(cfg, infos, tiles[tr].reset_index(drop=True), y_train[tr].astype(str), emb)
            test = TileImages(infos, tiles[te], cfg.embedding.input_size)
            preds["fine_tuned"].append(ftm.predict(test))
    y_true = np.concatenate(truth)
    classes = sorted(set(y_true) | {c for p in preds.values() for c in np.concatenate(p)})
    scores = pd.concat([class_scores(y_true, np.concatenate(preds[m]), classes).assign(method=m)
                        for m in methods], ignore_index=True)
    against, in_words = scored_against(t)
    scores = scores[["method", "class", "precision", "recall", "f1", "support"]].assign(against=against)
    confusion = pd.concat([confusion_long(y_true, np.concatenate(preds[m]), classes).assign(method=m)
                           for m in methods], ignore_index=True)[["method", "true", "predicted", "count"]]
    confusion = confusion.assign(against=against)
    stage = ws.out_dir(cfg.output_dir)  # committed with the models
    write_atomic(stage / files.evaluation.name, lambda p: scores.to_csv(p, index=False, float_format="%.4f"))
    write_atomic(stage / files.confusion.name, lambda p: confusion.to_csv(p, index=False))
    confusion_figure(stage / files.confusion_png.name, confusion, classes, scores,
                     f"{cfg.name}: blocked {ev.folds}-fold cross-validation ({ev.block_tiles}x{ev.block_tiles}-tile "
                     f"blocks), {len(y_true)} held-out tiles,\n{in_words}",
                     "reference" if t.reference is not None else "training label")
    quality = clustering_quality(cfg, infos, tiles, emb, y_ref, inputs.near).assign(against=against)
    write_atomic(stage / files.cluster_quality.name, lambda p: quality.to_csv(p, index=False, float_format="%.4f"))
    macro = {str(m): round(float(f), 3) for m, f in
             scores[scores["class"] == "macro avg"].set_index("method")["f1"].items()}
    log.info("blocked cross-validation macro F1 %s: %s", in_words, macro)
    return {"evaluation": files.evaluation, "confusion": files.confusion, "confusion_png": files.confusion_png,
            "cluster_quality": files.cluster_quality, "macro_f1": macro, "scored_against": in_words,
            "folds": ev.folds}


def colour_features(infos: list[RasterInfo], tiles: pd.DataFrame) -> np.ndarray:
    """Per-band mean, std and 8-bin histogram of each tile's scaled pixels (what the CNN sees)."""
    out = np.empty((len(tiles), 10 * 3), dtype=np.float32)
    with OpenRasters(infos) as sources:
        cols = ["raster", "tile_col", "tile_row", "tile_w", "tile_h"]
        rows = tiles[cols].itertuples(index=False)
        for i, (r, c, row, w, h) in enumerate(counted(rows, "colour statistics", "tile", total=len(tiles))):
            px, valid = read_tile(sources[r], infos[r], Window(c, row, w, h))
            out[i] = colour_statistics(px, valid)
    return out


def clustering_quality(cfg: PipelineConfig, infos: list[RasterInfo], tiles: pd.DataFrame, emb: np.ndarray,
                       y_ref: np.ndarray, near: np.ndarray) -> pd.DataFrame:
    """NMI, ARI, purity vs the reference: k-means (same settings, neighbours included) on CNN embeddings vs
    colour statistics (``near``: each tile's neighbours)."""
    c = cfg.clustering
    has = pd.notna(y_ref)
    order = ground_order(tiles["ground_x"].to_numpy(), tiles["ground_y"].to_numpy())
    rows = []
    for name, raw in (("cnn", np.asarray(emb, dtype=np.float32)),
                      ("colour", standardise(colour_features(infos, tiles)))):
        feats = with_neighbours(raw, near, c.neighbour_weight, c.l2_normalize)
        km = KMeansClusterer.from_settings(c, pca=name == "cnn")
        labels, _ = km.fit(feats, order).predict(feats)
        rows.append({"features": name, **cluster_quality(y_ref[has].astype(str), labels[has])})
    return pd.DataFrame(rows, columns=["features", "nmi", "ari", "purity"])


def blocked_tiles(cfg: PipelineConfig, ws: Workspace, infos: list[RasterInfo]) -> pd.DataFrame:
    """The embedded tiles with their spatial ``block``: one partition of the ground for training and evaluation."""
    tiles = kept_tiles(ws)
    side = block_side_m(cfg.tiling.stride_length, infos, tiles, training_settings(cfg).evaluation.block_tiles)
    tiles["block"] = spatial_blocks(tiles, side)
    return tiles


def train(cfg: PipelineConfig, ws: Workspace) -> dict[str, Any]:
    """Top model on every labelled tile, then fine tuning when asked, then the blocked evaluation; every file
    written through ``ws`` (a command's commit: :func:`settlements.pipeline.train`)."""
    t = training_settings(cfg)
    if t.labels is None:
        raise ConfigError(f"{cfg.source}: training.model: the supervised model comes from {t.model}; there is nothing "
                          "to train here (`settlements predict` uses it; to train here, give training.labels)")
    if not ws.embeddings.exists():
        raise StageError(f"{ws.embeddings}: missing; run `settlements run {cfg.source}` first")
    infos = load_infos(ws)
    tiles = blocked_tiles(cfg, ws, infos)
    emb = np.load(ws.embeddings, mmap_mode="r")
    labels = tile_labels(cfg, t.labels)
    reference = tile_labels(cfg, t.reference) if t.reference is not None else labels
    y_train, y_ref = _class_column(tiles, labels), _class_column(tiles, reference)
    has = pd.notna(y_train)
    if has.sum() < 2:
        raise TrainingError(f"training.labels: only {int(has.sum())} tiles are labelled")
    inputs = TopModelInputs.of(emb, tiles, infos)
    step("%s: train: top model on %d labelled tiles", cfg.name, int(has.sum()))
    chosen, scores = resolve_neighbours(t.top_model, inputs, y_train, tiles["block"].to_numpy(), has,
                                        t.evaluation.seed)
    if scores:
        log.info("top model: neighbours %s (blocked %d-fold macro F1 on the training labels: alone %.3f, with "
                 "neighbours %.3f)", "on" if chosen.neighbours else "off", NEIGHBOUR_FOLDS, scores["alone"],
                 scores["neighbours"])
    top = make_top_model(chosen).fit(inputs.features(chosen)[has], y_train[has].astype(str),
                                     parts=feature_parts(chosen))
    config = cfg.to_yaml_dict()
    state = {**top.state(), "config": config, "embedding_rows": int(len(emb)), "neighbours": chosen.neighbours}
    top_model = ws.top_model  # its final path: nothing staged it yet
    save_state(ws.out(top_model), state)
    result: dict[str, Any] = {"labelled_tiles": int(has.sum()), "classes": [str(c) for c in top.classes_],
                              "top_model": top_model, "neighbours": chosen.neighbours,
                              "neighbours_macro_f1": scores, "neighbours_folds": NEIGHBOUR_FOLDS,
                              "class_counts": {str(k): int(v) for k, v in
                                               pd.Series(y_train[has]).value_counts().items()}}
    if t.finetune.enabled:
        step("%s: train: fine tuning", cfg.name)
        ws.finetune_checkpoint.parent.mkdir(parents=True, exist_ok=True)
        ft = fine_tune(cfg, infos, tiles[has].reset_index(drop=True), y_train[has].astype(str), np.asarray(emb),
                       ws.finetune_checkpoint)
        fine_tuned = ws.fine_tuned
        ft.save(ws.out(fine_tuned), {"config": config})
        result.update(fine_tuned=fine_tuned, best_epoch=ft.best_epoch_)
    if t.evaluation.enabled:
        step("%s: train: blocked %d-fold evaluation", cfg.name, t.evaluation.folds)
        result.update(evaluate(cfg, ws, infos, tiles, np.asarray(emb), y_train, y_ref, inputs))
    write_json(ws.out(ws.training),
               {k: (str(v) if isinstance(v, Path) else v) for k, v in result.items()}
               | {"config": config})
    return result
