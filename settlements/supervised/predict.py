"""``settlements predict``: per-tile class and probability, per-region class histograms, styled for QGIS.

Writes ``outputs/<name>/<name>_supervised.gpkg`` (layers ``predicted_tiles``, ``predicted_regions``,
table ``predicted_histogram``, default styles from the palette), ``<name>_predicted.tif`` (a paletted COG
of class codes, one pixel per tile cell), ``supervised_map.png`` and ``supervised_histograms.png``: the
same shapes as the cluster outputs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd

from ..config import DEFAULT_PREDICT_MODEL, PipelineConfig, PredictModel
from ..errors import StageError
from ..export import plots
from ..export.geopackage import LayerStyle, write_geopackage
from ..export.layers import regions_layer, tile_regions, tiles_layer
from ..export.raster import code_grid, tile_cells, write_cluster_map
from ..export.styles import categorized_qml
from ..histograms import region_histograms
from ..palette import build_palette
from ..rasters import load_infos
from ..reprocess import pipeline_lock
from ..store import read_table, workspace
from .finetune import FineTuner, TileImages, torch_device
from .top_model import TopModel, load_state
from .train import TopModelInputs, supervised_paths, training_settings
from .training_labels import kept_tiles

log = logging.getLogger(__name__)

def choose_model(cfg: PipelineConfig, model: PredictModel) -> str:
    """``auto``: the fine-tuned model when the config fine tunes and it exists, else the top model."""
    paths = supervised_paths(cfg)
    if model == "auto":
        ft = training_settings(cfg).finetune.enabled and paths.fine_tuned.exists()
        model = "fine_tuned" if ft else "top_model"
    path = paths.fine_tuned if model == "fine_tuned" else paths.top_model
    if not path.exists():
        raise StageError(f"{path}: missing; run `settlements train {cfg.source}` first")
    return model


def tile_probabilities(cfg: PipelineConfig, model: str, tiles: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Class names and (n_tiles, n_classes) probabilities for ``tiles`` (every kept tile, in embedding order:
    the top model's neighbours come from all of them)."""
    paths = supervised_paths(cfg)
    if model == "fine_tuned":
        e = cfg.embedding
        ft = FineTuner.load(paths.fine_tuned, e.backbone, e.layer, e.weights)
        ft.net_.to(torch_device(training_settings(cfg).finetune.device))
        data = TileImages(load_infos(workspace(cfg)), tiles, ft.input_size)
        return ft.classes_, ft.predict_proba(data)
    state = load_state(paths.top_model)
    top = TopModel.from_state(state, paths.top_model)
    ws = workspace(cfg)
    emb = np.load(ws.embeddings, mmap_mode="r")
    neighbours = state.get("neighbours") is True
    if state.get("embedding_rows") != len(emb) or state.get("dim") != emb.shape[1] * (2 if neighbours else 1):
        raise StageError(f"{paths.top_model}: trained on other embeddings; run `settlements train {cfg.source}`")
    inputs = TopModelInputs.of(emb, tiles, load_infos(ws)) if neighbours else None
    feats = np.asarray(emb, dtype=np.float32) if inputs is None else inputs.with_neighbours
    return top.classes_, top.predict_proba(feats[tiles["emb_row"].to_numpy()])


def predict(cfg: PipelineConfig, model: PredictModel = DEFAULT_PREDICT_MODEL) -> dict[str, Path]:
    """Predict every kept tile with the chosen model and write the supervised outputs."""
    with pipeline_lock(cfg):
        return _predict(cfg, model)


def _predict(cfg: PipelineConfig, model: PredictModel) -> dict[str, Path]:
    ws = workspace(cfg)
    paths = supervised_paths(cfg)
    chosen = choose_model(cfg, model)
    tiles = kept_tiles(ws)
    classes, proba = tile_probabilities(cfg, chosen, tiles)
    best = proba.argmax(axis=1)
    palette = build_palette(dict(enumerate(classes)), {})
    regions = gpd.read_parquet(ws.regions)
    shares = read_table(ws.shares, "tile")
    meta = read_table(ws.embedded, "embed")
    every = meta[["tile_id", "kept", "valid_cell"]].merge(
        pd.DataFrame({"tile_id": tiles["tile_id"], "cluster": best, "label": classes[best]}), on="tile_id",
        how="left")
    wide, long = region_histograms(every, shares, regions.drop(columns="geometry"), list(classes), len(classes))
    wide = wide.drop(columns=[f"{p}_c{i}" for i in range(len(classes)) for p in ("n", "frac", "km2")])
    wide = wide.rename(columns={"dominant_label": "dominant_class"})
    long = long[long["kind"] == "label"].drop(columns="kind")
    regions_out = regions_layer(wide, regions, cfg.output.crs)
    t = tiles.assign(**{"class": classes[best], "probability": proba.max(axis=1).astype(np.float64)})
    for j, c in enumerate(classes):
        t[f"p_{palette.key(c)}"] = proba[:, j].astype(np.float64)
    t = t.merge(tile_regions(shares, regions), on="tile_id", how="left")
    infos = load_infos(ws)
    cols = ["tile_id", "class", "probability", *[f"p_{palette.key(c)}" for c in classes], "region_id", "row", "col"]
    tiles_out = tiles_layer(t, infos, cfg.output.crs,
                            lambda k, info: k[cols].assign(raster=info.path.name, model=chosen).reset_index(drop=True))
    tip = "<b>[% region_name %]</b><br>dominant: [% dominant_class %]<br>" + "<br>".join(
        f"{c}: [% round(\"frac_{palette.key(c)}\" * 100, 1) %] %" for c in classes)
    styles = [
        LayerStyle("predicted_tiles", "settlements predicted class",
                   categorized_qml("class", palette, aliases={"class": "Predicted class",
                                                              "probability": "Probability",
                                                              "region_id": "Region", "raster": "Source raster"},
                                   outline_width=0.02, display_field="class"),
                   f"tiles coloured by the class predicted by the {chosen}"),
        LayerStyle("predicted_regions", "settlements dominant class",
                   categorized_qml("dominant_class", palette,
                                   aliases={"region_name": "Region", "dominant_class": "Dominant class",
                                            "area_km2": "Area (km²)", "mapped_km2": "Mapped area (km²)"},
                                   outline_width=0.2, map_tip=tip, display_field="region_name"),
                   "regions coloured by their dominant predicted class"),
    ]
    write_geopackage(paths.gpkg, {"predicted_tiles": tiles_out, "predicted_regions": regions_out,
                                  "predicted_histogram": long}, styles)
    out = cfg.output_dir
    class_map = out / f"{cfg.name}_predicted.tif"  # the cluster map's twin: class codes, one pixel per tile cell
    write_cluster_map(class_map, code_grid(tile_cells(t.assign(label=t["class"]), [i.crs for i in infos], palette)),
                      palette)
    plots.label_map(out / "supervised_map.png", tiles_out.rename(columns={"class": "label"}), regions_out,
                    palette, f"{cfg.name}: tiles by predicted class ({chosen})")
    plots.histograms(out / "supervised_histograms.png", wide, palette, cfg.output.max_plot_regions,
                     f"{cfg.name}: predicted class histograms ({chosen})")
    log.info("prediction (%s): %s", chosen, pd.Series(classes[best]).value_counts().to_dict())
    return {"gpkg": paths.gpkg, "class_map": class_map, "map": out / "supervised_map.png",
            "histograms": out / "supervised_histograms.png"}
