"""``settlements predict``: per-tile class and probability, per-region class histograms, styled for QGIS.

The supervised map is a labelled-tile map like the cluster map (:mod:`settlements.export.tile_map`):
``<name>_supervised.gpkg`` (layers ``predicted_tiles``, ``predicted_regions``, table
``predicted_histogram``, default styles), ``<name>_predicted.tif`` (a paletted COG of class codes, one
pixel per tile cell), ``supervised_map.png`` and ``supervised_histograms.png`` (names from
:mod:`settlements.products`), all written through the command's commit (:func:`settlements.pipeline.predict`).
A class takes its colour and code from the pipeline's legend: a class named like a cluster has the
cluster's colour (the analyst's, when the labels file gives one) and code.
"""

from __future__ import annotations

import logging
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd

from ..config import DEFAULT_PREDICT_MODEL, PipelineConfig, PredictModel
from ..errors import StageError
from ..export.geopackage import LayerStyle
from ..export.layers import tile_regions, tiles_layer
from ..export.qgis_project import write_pipeline_project
from ..export.styles import REGION_OUTLINE_MM, categorized_qml
from ..export.tile_map import PREDICTED_LAYERS, named_as_final, tile_map, write_tile_map
from ..labels import read_labels
from ..palette import Legend
from ..products import outputs
from ..rasters import load_infos
from ..reprocess import keep_recorded
from ..similar_examples import analyst_layer_names
from ..store import Workspace, read_table
from ..tile_tables import kept_tiles
from .finetune import FineTuner, TileImages, torch_device
from .top_model import TopModel, load_state
from .train import TopModelInputs, training_settings

log = logging.getLogger(__name__)


def choose_model(cfg: PipelineConfig, ws: Workspace, model: PredictModel) -> str:
    """``auto``: the fine-tuned model when the config fine tunes and it exists, else the top model."""
    if model == "auto":
        ft = training_settings(cfg).finetune.enabled and ws.fine_tuned.exists()
        model = "fine_tuned" if ft else "top_model"
    path = ws.fine_tuned if model == "fine_tuned" else ws.top_model
    if not path.exists():
        raise StageError(f"{path}: missing; run `settlements train {cfg.source}` first")
    return model


def tile_probabilities(cfg: PipelineConfig, ws: Workspace, model: str, tiles: pd.DataFrame
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Class names and (n_tiles, n_classes) probabilities for ``tiles`` (every kept tile, in embedding order:
    the top model's neighbours come from all of them)."""
    if model == "fine_tuned":
        e = cfg.embedding
        ft = FineTuner.load(ws.fine_tuned, e.backbone, e.layer, e.weights)
        ft.net_.to(torch_device(training_settings(cfg).finetune.device))
        data = TileImages(load_infos(ws), tiles, ft.input_size)
        return ft.classes_, ft.predict_proba(data)
    state = load_state(ws.top_model)
    top = TopModel.from_state(state, ws.top_model)
    emb = np.load(ws.embeddings, mmap_mode="r")
    neighbours = state.get("neighbours") is True
    if state.get("embedding_rows") != len(emb) or state.get("dim") != emb.shape[1] * (2 if neighbours else 1):
        raise StageError(f"{ws.top_model}: trained on other embeddings; run `settlements train {cfg.source}`")
    inputs = TopModelInputs.of(emb, tiles, load_infos(ws)) if neighbours else None
    feats = np.asarray(emb, dtype=np.float32) if inputs is None else inputs.with_neighbours
    return top.classes_, top.predict_proba(feats[tiles["emb_row"].to_numpy()])


def predicted_styles(legend: Legend, chosen: str) -> list[LayerStyle]:
    """Default QGIS styles of the supervised map, from the pipeline's legend."""
    tip = "<b>[% region_name %]</b><br>dominant: [% dominant_class %]<br>" + "<br>".join(
        f"{c}: [% round(\"frac_{legend.key(c)}\" * 100, 1) %] %" for c in legend.labels)
    return [
        LayerStyle(PREDICTED_LAYERS.tiles, "settlements predicted class",
                   categorized_qml("class", legend, aliases={"class": "Predicted class", "probability": "Probability",
                                                             "region_id": "Region", "raster": "Source raster"},
                                   outline_width=0.02, display_field="class"),
                   f"tiles coloured by the class predicted by the {chosen}"),
        LayerStyle(PREDICTED_LAYERS.regions, "settlements dominant class",
                   categorized_qml("dominant_class", legend,
                                   aliases={"region_name": "Region", "dominant_class": "Dominant class",
                                            "area_km2": "Area (km²)", "mapped_km2": "Mapped area (km²)"},
                                   outline_width=REGION_OUTLINE_MM, map_tip=tip, display_field="region_name",
                                   outline_only=True),
                   "regions outlined in their dominant predicted class's colour"),
    ]


def predict(cfg: PipelineConfig, ws: Workspace, model: PredictModel = DEFAULT_PREDICT_MODEL) -> dict[str, Path]:
    """Predict every kept tile with the chosen model; write the supervised map through ``ws``."""
    chosen = choose_model(cfg, ws, model)
    tiles = kept_tiles(ws)
    classes, proba = tile_probabilities(cfg, ws, chosen, tiles)
    best = proba.argmax(axis=1)
    legend = read_labels(ws.labels, cfg.clustering.k).legend(extra=list(classes)).only(list(classes))
    regions = gpd.read_parquet(ws.regions)
    shares = read_table(ws.shares, "tile")
    meta = read_table(ws.embedded, "embed")
    every = read_table(ws.tiles, "tile").merge(meta[["tile_id", "kept", "valid_cell"]], on="tile_id").merge(
        pd.DataFrame({"tile_id": tiles["tile_id"], "label": classes[best]}), on="tile_id", how="left")
    t = tiles.assign(**{"class": classes[best], "probability": proba.max(axis=1).astype(np.float64)})
    for j, c in enumerate(classes):
        t[f"p_{legend.key(c)}"] = proba[:, j].astype(np.float64)
    t = t.merge(tile_regions(shares, regions), on="tile_id", how="left")
    infos = load_infos(ws)
    cols = ["tile_id", "class", "probability", *[f"p_{legend.key(c)}" for c in classes], "region_id", "row", "col"]
    layer = tiles_layer(t, infos, cfg.output.crs,
                        lambda k, info: k[cols].assign(raster=info.path.name, model=chosen).reset_index(drop=True))
    titles = (f"{cfg.name}: tiles by predicted class ({chosen})", f"{cfg.name}: predicted class histograms ({chosen})")
    m = tile_map(every, layer, shares, regions, [i.crs for i in infos], cfg.output.crs, legend, titles,
                 label_field="class", dominant_field="dominant_class")
    files = outputs(cfg).supervised_map
    stage = ws.out_dir(cfg.output_dir)
    every_file = outputs(cfg)
    with named_as_final(stage, cfg.output_dir):
        write_tile_map(m, files.in_folder(stage), PREDICTED_LAYERS, predicted_styles(legend, chosen),
                       cfg.output.max_plot_regions)
        if every_file.gpkg.is_file():  # the project shows the supervised map too (where a run made one)
            project = write_pipeline_project(every_file, stage, infos, f"settlements: {cfg.name}",
                                             analyst_layer_names(every_file.gpkg))
            assert ws.commit is not None
            keep_recorded(cfg, ws.commit, {every_file.project: project})
    log.info("prediction (%s): %s", chosen, pd.Series(classes[best]).value_counts().to_dict())
    written = {"gpkg": files.gpkg, "class_map": files.raster, "map": files.picture, "histograms": files.histograms}
    return {kind: path for kind, path in written.items() if path is not None}
