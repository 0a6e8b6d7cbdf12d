"""``settlements predict``: per-tile class and probability, per-region class histograms, styled for QGIS.

The supervised map is a labelled-tile map like the cluster map (:mod:`settlements.export.tile_map`):
``<name>_supervised.gpkg`` (layers ``predicted_tiles``, ``predicted_regions``, table
``predicted_histogram``, default styles), ``<name>_predicted.tif`` (a paletted COG of class codes, one
pixel per tile cell), ``supervised_map.png`` and ``supervised_histograms.png`` (names from
:mod:`settlements.products`), all written through the command's commit (:func:`settlements.pipeline.predict`).
A class takes its colour and code from the pipeline's legend: a class named like a cluster has the
cluster's colour (the analyst's, when the labels file gives one) and code.

The network is the pipeline's own (``train``), or a portable model file's (``--model FILE`` or
``training.model``, :mod:`settlements.transfer`); the GeoPackage's ``prediction`` table records which, and
the file's SHA-256.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd

from ..config import DEFAULT_PREDICT_MODEL, PipelineConfig, PredictModel
from ..errors import ModelFileError, StageError
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
from ..store import Workspace, read_json, read_table
from ..tile_tables import kept_tiles
from ..transfer import (
    Model,
    check_embedding,
    embedder,
    fine_tuned_state,
    ground_sizes,
    ground_warning,
    load_model,
    scalings,
    top_model_of,
)
from .finetune import FineTuner, TileImages, torch_device
from .top_model import TopModel, load_state
from .train import TopModelInputs, training_settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Chosen:
    """The network ``predict`` uses (``top_model`` or ``fine_tuned``): the pipeline's own (``file`` None), or
    one of a portable model file's, with the warning (another pixel size, tile size or scaling) it gives."""

    network: str
    file: Model | None = None
    warning: str | None = None


def choose_model(cfg: PipelineConfig, ws: Workspace, model: PredictModel | Path) -> Chosen:
    """``auto``: the fine-tuned network when there is one (the pipeline's: when the config fine tunes and it was
    trained), else the top model. A model file (``--model FILE``, or ``training.model``) gives its own, once
    it is known to fit the pipeline's embeddings (:func:`settlements.transfer.check_embedding`)."""
    from_config = cfg.training.model if cfg.training is not None else None
    if isinstance(model, Path) or from_config is not None:
        path = model if isinstance(model, Path) else from_config
        assert path is not None
        m = load_model(path)
        held = m.networks()
        name = "auto" if isinstance(model, Path) else model
        if not held:
            raise ModelFileError(f"{path}: holds no top model or fine-tuned network (its pipeline was not trained); "
                                 "export it after `settlements train`")
        if name == "auto":
            name = "fine_tuned" if "fine_tuned" in held else "top_model"
        elif name not in held:
            raise ModelFileError(f"{path}: holds no {name.replace('_', ' ')} network (it holds: {', '.join(held)})")
        info = read_json(ws.embed_meta, "run")
        check_embedding(m, embedder(cfg, info["layer"], info["weights_sha256"]))
        pixel_m, tile_m = ground_sizes(load_infos(ws), kept_tiles(ws))
        warning = ground_warning(m, pixel_m, tile_m, scalings(cfg))
        if warning:
            log.warning("model: %s", warning)
        return Chosen(name, m, warning)
    if model == "auto":
        ft = training_settings(cfg).finetune.enabled and ws.fine_tuned.exists()
        model = "fine_tuned" if ft else "top_model"
    path = ws.fine_tuned if model == "fine_tuned" else ws.top_model
    if not path.exists():
        raise StageError(f"{path}: missing; run `settlements train {cfg.source}` first")
    return Chosen(model)


def tile_probabilities(cfg: PipelineConfig, ws: Workspace, chosen: Chosen, tiles: pd.DataFrame
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Class names and (n_tiles, n_classes) probabilities for ``tiles`` (every kept tile, in embedding order:
    the top model's neighbours come from all of them)."""
    m = chosen.file
    if chosen.network == "fine_tuned":
        e = cfg.embedding
        ft = (FineTuner.from_state(fine_tuned_state(m), m.path, e.backbone, e.layer, e.weights) if m is not None
              else FineTuner.load(ws.fine_tuned, e.backbone, e.layer, e.weights))
        ft.net_.to(torch_device(cfg.training.finetune.device if cfg.training is not None else "auto"))
        data = TileImages(load_infos(ws), tiles, ft.input_size)
        return ft.classes_, ft.predict_proba(data)
    emb = np.load(ws.embeddings, mmap_mode="r")
    rows: int | None
    if m is not None:
        top, neighbours = top_model_of(m)
        source, rows = m.path, len(emb)
    else:
        state = load_state(ws.top_model)
        top, neighbours = TopModel.from_state(state, ws.top_model), state.get("neighbours") is True
        source, rows = ws.top_model, state.get("embedding_rows")
    if rows != len(emb) or int(top.head_.mean.shape[0]) != emb.shape[1] * (2 if neighbours else 1):
        raise StageError(f"{source}: trained on other embeddings; run `settlements train {cfg.source}`")
    inputs = TopModelInputs.of(emb, tiles, load_infos(ws)) if neighbours else None
    feats = np.asarray(emb, dtype=np.float32) if inputs is None else inputs.with_neighbours
    return top.classes_, top.predict_proba(feats[tiles["emb_row"].to_numpy()])


def prediction_record(chosen: Chosen) -> pd.DataFrame:
    """The supervised GeoPackage's ``prediction`` table: which network, from which model file (by SHA-256),
    with which warning."""
    m = chosen.file
    return pd.DataFrame([{"model": chosen.network, "model_file": str(m.path) if m is not None else "",
                          "model_sha256": m.sha256 if m is not None else "",
                          "model_warnings": json.dumps([chosen.warning] if chosen.warning else []),
                          "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}])


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


def predict(cfg: PipelineConfig, ws: Workspace, model: PredictModel | Path = DEFAULT_PREDICT_MODEL
            ) -> dict[str, Path]:
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
    network = chosen.network
    layer = tiles_layer(t, infos, cfg.output.crs,
                        lambda k, info: k[cols].assign(raster=info.path.name, model=network).reset_index(drop=True))
    which = network if chosen.file is None else f"{network} of {chosen.file.path.name}"
    titles = (f"{cfg.name}: tiles by predicted class ({which})", f"{cfg.name}: predicted class histograms ({which})")
    m = tile_map(every, layer, shares, regions, [i.crs for i in infos], cfg.output.crs, legend, titles,
                 label_field="class", dominant_field="dominant_class")
    files = outputs(cfg).supervised_map
    stage = ws.out_dir(cfg.output_dir)
    every_file = outputs(cfg)
    with named_as_final(stage, cfg.output_dir):
        write_tile_map(m, files.in_folder(stage), PREDICTED_LAYERS, predicted_styles(legend, which),
                       cfg.output.max_plot_regions, extra={"prediction": prediction_record(chosen)})
        if every_file.gpkg.is_file():  # the project shows the supervised map too (where a run made one)
            project = write_pipeline_project(every_file, stage, infos, f"settlements: {cfg.name}",
                                             analyst_layer_names(every_file.gpkg))
            assert ws.commit is not None
            keep_recorded(cfg, ws.commit, {every_file.project: project})
    log.info("prediction (%s): %s", which, pd.Series(classes[best]).value_counts().to_dict())
    written = {"gpkg": files.gpkg, "class_map": files.raster, "map": files.picture, "histograms": files.histograms}
    return {kind: path for kind, path in written.items() if path is not None}
