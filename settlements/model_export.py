"""``settlements model export``: one portable model file from a pipeline's work folder.

The file (:mod:`settlements.model_file`: plain arrays and JSON) holds everything that made the
embeddings (backbone, layer, weights SHA-256, input size, the ImageNet normalisation, band count,
scaling, pixel and tile size on the ground), the named clusters (centroids, ids, names, colours, how
tight each was where it was named) and the legend they make, and, when the pipeline was trained, its
top model and fine-tuned network. Another pipeline uses it with ``clustering: {model: FILE}``,
``training: {model: FILE}`` or ``predict --model FILE`` (:mod:`settlements.transfer`).

Written through the command's commit (:func:`settlements.pipeline.export_model`); never over a file of
the pipeline's own, nor over an existing file that is not a model file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .clustering import KMeansClusterer
from .config import PipelineConfig
from .embedding.backbones import resolve_layer
from .embedding.infer import IMAGENET_MEAN, IMAGENET_STD
from .errors import ModelFileError, OutputError, StageError
from .export.embeddings import protected_files
from .export.previous import last_run_id
from .labels import read_labels
from .model_file import read_header, write_model_file
from .palette import default_cluster_name
from .products import outputs
from .rasters import load_infos
from .stages.cluster import fit_key
from .store import Workspace, read_json, read_table, write_atomic
from .supervised.top_model import TopModel, load_state
from .tile_tables import kept_tiles
from .transfer import Header, distance_statistics, ground_sizes, scalings

log = logging.getLogger(__name__)


def check_target(cfg: PipelineConfig, ws: Workspace, target: Path) -> None:
    """Refuse (one :class:`OutputError`) a target that is a file of the pipeline's own (its default model file
    aside), lies in its work folder, is a folder, or exists and is not a model file."""
    protected = protected_files(cfg, ws)
    protected.pop(outputs(cfg).model.resolve(), None)
    real = target.resolve()
    what = protected.get(real) or ("in the pipeline's work folder" if real.is_relative_to(ws.root.resolve()) else None)
    if what is not None:
        raise OutputError(f"{target}: {what}; a model goes in a file of its own (give -o another name)")
    if target.is_dir():
        raise OutputError(f"{target}: is a folder; give -o the model file's name")
    if target.exists() or target.is_symlink():
        try:
            read_header(target)
        except ModelFileError:
            raise OutputError(f"{target}: exists and is not a settlements model file; nothing was replaced (delete it, "
                              "or give -o another name)") from None


def _clusters(cfg: PipelineConfig, ws: Workspace, info: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray],
                                                                                    dict[str, Any]]:
    """The clusters' header section, their arrays, and the legend their names make."""
    meta = read_json(ws.cluster_meta, "cluster")
    c = cfg.clustering
    if meta.get("k") != c.k or (c.model is None and meta.get("fit_key") != fit_key(cfg, info)):
        raise StageError(f"{ws.clusters}: made with other clustering settings than {cfg.source} has now; run "
                         f"`settlements run {cfg.source}` first")
    km = KMeansClusterer.load(ws.clusters)
    assign = read_table(ws.assignments, "cluster")
    labels = read_labels(ws.labels, c.k)
    legend = labels.legend()
    stats = distance_statistics(assign["cluster"].to_numpy(), assign["distance"].to_numpy(), c.k)
    items = [{"id": i, "name": labels.label_of(i), "colour": legend.colour(labels.label_of(i)),
              "anchors": len(labels.anchors.get(i, ())), **stats[i]} for i in range(c.k)]
    section = {"k": c.k, "l2_normalize": bool(km.l2_normalize), "neighbour_weight": c.neighbour_weight,
               "pca_dim": None if km.components_ is None else int(km.components_.shape[0]), "seed": c.seed,
               "items": items}
    arrays = {"clusters.centroids": km.cluster_centers_}
    if km.components_ is not None:
        arrays.update({"clusters.components": km.components_, "clusters.mean": km.mean_})
    named = sum(labels.label_of(i) != default_cluster_name(i) for i in range(c.k))
    if not named:
        log.warning("model: no cluster of pipeline '%s' is named yet (%s): the model's clusters carry their "
                    "default names", cfg.name, cfg.labels_path)
    legend_section = {"labels": list(legend.labels), "colours": list(legend.colours), "codes": list(legend.codes),
                      "column_keys": list(legend.column_keys)}
    return section, arrays, {"legend": legend_section, "named": named}


def _top_model(ws: Workspace, info: dict[str, Any], rows: int) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    if not ws.top_model.exists():
        return None
    state = load_state(ws.top_model)
    TopModel.from_state(state, ws.top_model)  # a top model this version reads, or one error line
    parts = 2 if state.get("neighbours") is True else 1
    if state.get("embedding_rows") != rows or state.get("dim") != info["dim"] * parts:
        raise StageError(f"{ws.top_model}: trained on other embeddings than the pipeline's now; run `settlements "
                         "train` again first")
    section = {"classes": state["classes"], "params": state["params"], "dim": state["dim"],
               "neighbours": state.get("neighbours") is True, "n_train": state.get("n_train")}
    return section, {f"top_model.{k}": v.numpy() for k, v in state["head"].items()}


def _fine_tuned(ws: Workspace, info: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    if not ws.fine_tuned.exists():
        return None
    blob = load_state(ws.fine_tuned)
    try:
        params = dict(blob["params"])
        node = resolve_layer(params["backbone"], params.get("layer") or "final")
        section = {"classes": list(blob["classes"]), "head_hidden": int(blob["head_hidden"]),
                   "trainable": list(blob["trainable"]), "best_epoch": blob["best_epoch"],
                   "history": blob["history"],
                   # the file is data: no path of this machine, no device of it
                   "params": {**params, "layer": node, "weights": None, "device": "auto", "num_workers": 0}}
        tensors = {f"fine_tuned.{k}": v.numpy() for k, v in blob["model"].items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ModelFileError(f"{ws.fine_tuned}: not a fine-tuned model this version wrote; train again") from None
    if (params["backbone"], node) != (info["backbone"], info["layer"]):
        raise StageError(f"{ws.fine_tuned}: fine tuned from {params['backbone']} at {node}, but the pipeline embeds "
                         f"with {info['backbone']} at {info['layer']}; run `settlements train` again first")
    return section, tensors


def export_model(cfg: PipelineConfig, ws: Workspace, target: Path) -> dict[str, Any]:
    """Write the pipeline's model to ``target`` through ``ws`` (a command's commit); say what it holds."""
    check_target(cfg, ws, target)
    info = read_json(ws.embed_meta, "run")
    if info.get("input_size", cfg.embedding.input_size) != cfg.embedding.input_size:
        raise StageError(f"{ws.embeddings}: embedded at another input size than {cfg.source} has now; run "
                         f"`settlements run {cfg.source}` first")
    if not ws.clusters.exists():
        raise StageError(f"{ws.clusters}: missing; run `settlements run {cfg.source}` first")
    rows = len(np.load(ws.embeddings, mmap_mode="r"))
    clusters, arrays, extra = _clusters(cfg, ws, info)
    pixel_m, tile_m = ground_sizes(load_infos(ws), kept_tiles(ws))
    header: dict[str, Any] = {
        "settlements_version": __version__, "pipeline": cfg.name, "run_id": last_run_id(outputs(cfg).gpkg),
        "embedding": {"backbone": info["backbone"], "layer": info["layer"], "dim": info["dim"],
                      "weights_sha256": info["weights_sha256"], "input_size": cfg.embedding.input_size,
                      "precision": info.get("precision"),
                      "normalisation": {"mean": IMAGENET_MEAN.view(3).tolist(), "std": IMAGENET_STD.view(3).tolist()}},
        "imagery": {"band_counts": sorted({len(r.bands) for r in cfg.rasters}), "scalings": scalings(cfg),
                    "pixel_size_m": pixel_m, "tile_size_m": tile_m, "tile_size": str(cfg.tiling.tile_size),
                    "stride": str(cfg.tiling.stride_length), "dtypes": sorted({i.dtype for i in load_infos(ws)})},
        "clusters": clusters, "legend": extra["legend"],
    }
    held = []
    for name, part in (("top_model", _top_model(ws, info, rows)), ("fine_tuned", _fine_tuned(ws, info))):
        if part is not None:
            header[name], tensors = part
            arrays.update(tensors)
            held.append(name)
    # through the schema every reader checks (settlements.transfer.Header): what is written is what is read
    checked = Header.model_validate(header).model_dump(mode="json")
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = ws.out(target)
    write_atomic(staged, lambda p: write_model_file(p, checked, arrays))
    sha = read_header(staged)[1]
    log.info("model of pipeline '%s' (%d clusters, %d named; %s) written to %s", cfg.name, cfg.clustering.k,
             extra["named"], ", ".join(held) or "no supervised network", target)
    return {"model": target, "sha256": sha, "k": cfg.clustering.k, "named": extra["named"], "networks": held,
            "classes": {name: header[name]["classes"] for name in held}}
