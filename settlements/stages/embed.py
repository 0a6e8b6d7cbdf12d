"""The embed stage: every tile through the CNN once, cached per raster content and settings.

Reads the tile stage's artifacts; writes ``embedded.parquet`` (per tile: validity, kept, row in the
array), ``embeddings.npy`` (kept tiles, streamed from the cache) and ``embedding.json``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import numpy as np
import pandas as pd

from ..config import PipelineConfig
from ..embedding.assemble import embed_counts, embedded_table, write_embeddings
from ..embedding.backbones import Backbone, build_backbone, resolve_layer
from ..embedding.cache import EmbeddingCache
from ..embedding.choice import Chooser, EngineChoice, Sample, describe
from ..embedding.infer import InferenceSettings
from ..errors import TilingError
from ..executors import EmbedJob, Executor, LocalExecutor
from ..progress import progress
from ..rasters import RasterInfo, compute_scaling, load_infos
from ..store import Workspace, expand_inputs, read_json_if, read_table, settings_key, workspace, write_json, write_table
from ..tiling import WINDOW_COLUMNS
from ..transfer import check_embedding, embedder, load_model
from .tile import check_inputs

log = logging.getLogger(__name__)


def no_tile_message(max_invalid_fraction: float) -> str:
    """Why no tile was embedded, with advice only where it can help."""
    if max_invalid_fraction >= 1:  # every tile qualifies: the CNN gave no usable features for any
        return ("tiling.max_invalid_fraction: no tile could be embedded although every tile qualifies "
                "(max_invalid_fraction 1); the pixels or their scaling give the CNN nothing (check rasters.scaling)")
    return (f"tiling.max_invalid_fraction: no tile has at least {1 - max_invalid_fraction:.0%} valid pixels in any "
            f"raster (most pixels are nodata, masked or non-finite); raise max_invalid_fraction (now "
            f"{max_invalid_fraction:g}, at most 1) or use smaller tiles")


def inference_settings(cfg: PipelineConfig) -> InferenceSettings:
    """Inference settings with the precision resolved for this machine's device.

    Resolved once here, so workers of another kind (a Dask cluster) compute what the cache key says.
    """
    settings = InferenceSettings.from_settings(cfg.embedding)
    settings.precision = settings.precision_name(settings.torch_device())
    return settings


def embedding_key(info: RasterInfo, cfg: PipelineConfig, weights_sha: str, layer: str,
                  precision: str = "fp32", engine: str = "torch", network_sha: str | None = None) -> str:
    """Cache key of a raster's embeddings: what changes pixels in, or features out (another engine: its
    name and the SHA-256 of the network it ran, which for int8 names the calibration too)."""
    e = cfg.embedding
    parts = {
        "raster": info.fingerprint, "bands": info.bands, "low": info.scale_low, "high": info.scale_high,
        "nodata": info.nodata, "input_size": e.input_size, "backbone": e.backbone, "layer": layer,
        "weights": weights_sha,
    }
    if precision != "fp32":  # torch fp32 keys stay those of earlier versions
        parts["precision"] = precision
    if engine != "torch":
        parts["engine"], parts["network"] = engine, network_sha
    return settings_key(parts)


def engine_chooser(cfg: PipelineConfig, ws: Workspace, backbone: Backbone, infos: list[RasterInfo],
                   tiles: pd.DataFrame, settings: InferenceSettings) -> Chooser:
    """The engine chooser of this run: its sample of the run's tiles, its work folder's exports and verdicts."""
    device = settings.torch_device()
    reference = [embedding_key(info, cfg, backbone.weights.sha256, backbone.layer) for info in infos]
    sample = Sample(infos, tiles["raster"].to_numpy(), tiles[WINDOW_COLUMNS].to_numpy(), reference, cfg.embedding,
                    1.0 - cfg.tiling.max_invalid_fraction, device)
    return Chooser(cfg.embedding, cfg.clustering, backbone, device, settings.precision, sample, ws.engines)


def choose_engine(cfg: PipelineConfig, ws: Workspace, backbone: Backbone, infos: list[RasterInfo],
                  tiles: pd.DataFrame, settings: InferenceSettings) -> EngineChoice:
    """What embeds this run (:mod:`settlements.embedding.choice`): the setting, gated on a sample of the run's
    tiles, or ``auto``'s fastest faithful engine."""
    t0 = time.perf_counter()
    choice = engine_chooser(cfg, ws, backbone, infos, tiles, settings).choose(len(tiles))
    choice.seconds = time.perf_counter() - t0
    log.info("%s", describe(choice))
    return choice


def embed(cfg: PipelineConfig, ws: Workspace, executor: Executor | None = None) -> dict[str, int]:
    """Embed every tile not already in the cache; assemble the pipeline's embedding array, streaming.

    The cache is written as chunks are embedded (a killed run resumes there); the rest is staged.
    """
    infos = load_infos(ws)
    tiles = read_table(ws.tiles, "tile")
    e = cfg.embedding
    model = load_model(cfg.clustering.model) if cfg.clustering.model is not None else None
    if model is not None:  # before any CNN work (and before weights another backbone would need are looked for)
        check_embedding(model, embedder(cfg, resolve_layer(e.backbone, e.layer)))
    backbone = build_backbone(e.backbone, e.layer, e.weights)
    if model is not None:
        check_embedding(model, embedder(cfg, backbone.layer, backbone.weights.sha256))
    settings = inference_settings(cfg)
    device = settings.torch_device()
    min_valid = 1.0 - cfg.tiling.max_invalid_fraction
    cache = EmbeddingCache(ws.cache)
    choice = choose_engine(cfg, ws, backbone, infos, tiles, settings)
    settings = replace(settings, engine=choice.engine, precision=choice.precision,
                       model_path=None if choice.exported is None else str(choice.exported.path),
                       model_sha256=choice.model_sha256)
    keys = [embedding_key(info, cfg, backbone.weights.sha256, backbone.layer, settings.precision, choice.engine,
                          choice.model_sha256) for info in infos]
    jobs, read = [], []
    by_raster = tiles.groupby("raster").indices  # one pass, not one scan of every tile per raster
    for r, info in enumerate(infos):
        rt = tiles.iloc[by_raster.get(r, np.empty(0, np.int64))]
        done = cache.index(keys[r])[[*WINDOW_COLUMNS, "valid_tile", "embedded"]]
        merged = rt[WINDOW_COLUMNS].merge(done, on=WINDOW_COLUMNS, how="left")
        # new windows, and windows cached as skipped that a lower threshold now keeps
        need = (merged["valid_tile"].isna() | ((merged["valid_tile"] >= min_valid - 1e-9)
                                               & (merged["embedded"] != True))).to_numpy()  # noqa: E712
        if need.any():
            jobs.append(EmbedJob(keys[r], info, rt[WINDOW_COLUMNS].to_numpy()[need], e.input_size, min_valid))
            read.append(rt["tile_id"].to_numpy()[need])
    n_new = sum(len(j.windows) for j in jobs)
    with progress(n_new, "embedding", "tile") as bar:
        (executor or LocalExecutor()).embed(jobs, backbone, settings, cache, bar)
    meta, source = embedded_table(tiles, keys, cache, min_valid)
    if len(source) == 0:
        raise TilingError(no_tile_message(cfg.tiling.max_invalid_fraction))
    write_embeddings(ws.out(ws.embeddings), source, keys, cache, backbone.dim)
    write_table(ws.out(ws.embedded), meta)
    counts = embed_counts(meta, np.concatenate(read) if read else np.empty(0, np.int64))
    write_json(ws.out(ws.embed_meta), {
        **counts, "backbone": backbone.name, "layer": backbone.layer, "dim": backbone.dim, "input_size": e.input_size,
        "weights_sha256": backbone.weights.sha256, "weights_source": backbone.weights.source,
        "weights_path": str(backbone.weights.path), "device": str(device), **choice.record(),
        "executor": getattr(executor, "name", "local"), "keys": keys,
    })
    log.info("embedding: %d read, %d embedded, %d reused, %d skipped (%d without valid pixels, %d too few)",
             n_new, counts["tiles_embedded"], counts["tiles_reused"], counts["tiles_skipped"],
             counts["tiles_skipped_nodata"], counts["tiles_skipped_invalid"])
    return counts


def cache_keys(cfg: PipelineConfig) -> set[str]:
    """The embedding-cache shards the current config uses (one per input raster): torch's at its precision
    (the reference, and the fallback of every other engine) and those of the engine the last run chose."""
    infos, _ = check_inputs(cfg)
    specs = [spec for _, spec in expand_inputs(cfg.rasters)]
    e = cfg.embedding
    backbone = build_backbone(e.backbone, e.layer, e.weights, allow_download=False)
    precision = inference_settings(cfg).precision
    keep = set()
    last = read_json_if(workspace(cfg).embed_meta) or {}
    for info, spec in zip(infos, specs, strict=True):
        info = compute_scaling(info, spec)
        keep.add(embedding_key(info, cfg, backbone.weights.sha256, backbone.layer, precision))
        keep.add(embedding_key(info, cfg, backbone.weights.sha256, backbone.layer))
        if last.get("engine") not in (None, "torch") and last.get("layer") == backbone.layer:
            keep.add(embedding_key(info, cfg, backbone.weights.sha256, backbone.layer, last.get("precision", "fp32"),
                                   last["engine"], last.get("engine_model_sha256")))
    return keep
