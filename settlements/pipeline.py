"""The runner: every command that writes, through one door; the stages in order; the run's own record.

The door (:func:`door`) is the same for every command that writes (``run`` and the stage commands,
``train``, ``predict``, ``similar``, ``export-embeddings``, ``labels pull``, ``labels-template``, ``cache
prune``): the pipeline's lock (:func:`settlements.reprocess.pipeline_lock`, waiting ``--wait`` seconds),
its work and output folders claimed before any work starts (:func:`settlements.reprocess.claimed`), the
leftovers of killed commands removed, and one commit (:class:`settlements.store.Commit`): everything the
command writes (artifacts, outputs, models, the labels file, the record of its success) is staged beside
its final place and renamed into place at one commit point, so a command that fails or is interrupted
leaves every earlier output as it was: the outputs are those of the last completed command.

tile -> embed -> cluster -> export (:mod:`settlements.stages`). A run whose inputs, settings and labels
are unchanged since its last success has nothing to do (:func:`settlements.reprocess.up_to_date`).
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import __version__
from . import similar as similar_query
from .config import ExportFormat, PipelineConfig, PredictModel, SimilarOptions, check_executor, check_refit
from .errors import ConfigError, RunLockedError, SettlementsError
from .executors import Executor, make_executor
from .export.previous import last_run_id, last_run_value
from .labels import default_labels, pipeline_of, pull_edits, read_labels, write_labels
from .products import outputs
from .progress import step
from .reprocess import (
    claimed,
    labels_hash,
    output_paths,
    pipeline_lock,
    record_success,
    state_key,
    state_parts,
    up_to_date,
)
from .similar import SimilarReport
from .stages import cluster, embed, export, tile
from .store import Commit, Workspace, ensure_dir, read_table, remove_stale_temps, workspace

log = logging.getLogger(__name__)


@contextmanager
def committing(cfg: PipelineConfig) -> Iterator[Workspace]:
    """A workspace whose writes are staged, and committed together when the block ends (discarded when not)."""
    with Commit(workspace(cfg).journal) as commit:
        seen = labels_hash(cfg)
        # the labels file is the analyst's: never replace an edit made while this command was working
        commit.guard(lambda: not commit.staged(cfg.labels_path) or labels_hash(cfg) == seen, cfg.labels_path,
                     "edited while the run was writing its own version of it; nothing was replaced: run again")
        yield workspace(cfg, commit)


def clear_leftovers(cfg: PipelineConfig) -> None:
    """Temporary files that killed commands left in the pipeline's folders and beside its labels file."""
    n = (remove_stale_temps(cfg.work_dir, cfg.work_dir / "cache", cfg.output_dir)
         + remove_stale_temps(cfg.labels_path.parent, name_end=f".{cfg.labels_path.name}", subfolders=False))
    if n:
        log.info("removed %d temporary file(s) left by an interrupted command", n)


@contextmanager
def door(cfg: PipelineConfig, wait: float = 0, ws: Workspace | None = None) -> Iterator[Workspace]:
    """The one way in for every command that writes: the pipeline's lock (waiting up to ``wait`` seconds), its
    folders claimed, leftovers removed, and a workspace whose writes commit together when the block ends.

    ``ws``: a workspace of a command already inside (a run's stages), used as it is.
    """
    if ws is not None and ws.commit is not None:
        yield ws
        return
    with pipeline_lock(cfg, wait), claimed(cfg):
        clear_leftovers(cfg)
        with committing(cfg) as w:
            yield w


# -------------------------------------------------------------------------------- single stages

def stage_tile(cfg: PipelineConfig, ws: Workspace | None = None, wait: float = 0) -> dict[str, int]:
    """The tile stage (:func:`settlements.stages.tile.tile`), committed on its own unless ``ws`` is a run's."""
    with door(cfg, wait, ws) as w:
        return tile.tile(cfg, w)


def stage_embed(cfg: PipelineConfig, executor: Executor | None = None, ws: Workspace | None = None,
                wait: float = 0) -> dict[str, int]:
    """The embed stage (:func:`settlements.stages.embed.embed`); the cache is written as chunks finish."""
    with door(cfg, wait, ws) as w:
        return embed.embed(cfg, w, executor)


def stage_cluster(cfg: PipelineConfig, refit: bool = False, executor: Executor | None = None,
                  ws: Workspace | None = None, wait: float = 0) -> dict[str, Any]:
    """The cluster stage (:func:`settlements.stages.cluster.cluster`)."""
    with door(cfg, wait, ws) as w:
        return cluster.cluster(cfg, w, refit, executor)


def stage_export(cfg: PipelineConfig, run_started: float | None = None,
                 counters: dict[str, Any] | None = None, run_info: dict[str, Any] | None = None,
                 ws: Workspace | None = None, wait: float = 0) -> dict[str, Path]:
    """The export stage (:func:`settlements.stages.export.export`), with this run's record for ``runs``."""
    with door(cfg, wait, ws) as w:
        return export.export(cfg, w, run_started, counters, {**(run_info or {}), "versions": versions()})


def versions() -> dict[str, str]:
    import faiss
    import pyogrio
    import rasterio
    import torch
    import torchvision

    return {"settlements": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "faiss": getattr(faiss, "__version__", "?"),
            "rasterio": rasterio.__version__, "gdal": rasterio.__gdal_version__, "pyogrio": pyogrio.__version__}


# ------------------------------------------------------------------------------ other commands

def pull_labels(gpkg: Path, config: Path | None = None, wait: float = 0) -> tuple[list[str], dict[str, Path]]:
    """``settlements labels pull``: edits in ``gpkg`` -> the labels YAML -> every output, regenerated.

    The pipeline is :func:`settlements.labels.pipeline_of`; outputs are rewritten beside ``gpkg``,
    wherever it now lies. The labels file and the outputs are committed together.
    """
    gpkg = Path(gpkg)
    if not gpkg.is_file():
        raise ConfigError(f"{gpkg}: GeoPackage not found")
    cfg = pipeline_of(gpkg, config)
    cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": gpkg.resolve().parent})})
    with door(cfg, wait) as ws:
        changes = pull_edits(gpkg, ws.labels, cfg.name, cfg.clustering.k, target=ws.out(cfg.labels_path),
                             shown=cfg.labels_path)
        return changes, stage_export(cfg, ws=ws)


def labels_template(cfg: PipelineConfig, force: bool = False, wait: float = 0) -> Path:
    """``settlements labels-template``: the labels YAML with the current clusters' sizes and anchor tiles,
    names and colours kept (``force`` to rewrite an existing file)."""
    from .identity import anchor_tiles

    with door(cfg, wait) as ws:
        if not ws.cluster_meta.exists():
            raise SettlementsError(f"{ws.cluster_meta}: no clusters yet; run `settlements run {cfg.source}` first")
        sizes = json.loads(ws.cluster_meta.read_text())["sizes"]
        if cfg.labels_path.exists() and not force:
            raise SettlementsError(f"{cfg.labels_path}: exists; use --force to rewrite it (names are kept)")
        k = cfg.clustering.k
        labels = read_labels(ws.labels, k) if ws.labels.exists() else default_labels(k)
        write_labels(ws.out(cfg.labels_path), cfg.name, labels, dict(enumerate(sizes)),
                     anchor_tiles(read_table(ws.assignments, "cluster")), out_dir=cfg.output_dir)
    return cfg.labels_path


def prune_cache(cfg: PipelineConfig, dry_run: bool = False, wait: float = 0) -> Any:
    """``settlements cache prune``: remove the cache shards the config no longer uses (each shard renamed away
    before it is deleted, so a killed prune leaves none half gone); returns the
    :class:`~settlements.embedding.cache.PruneReport`."""
    from .embedding.cache import EmbeddingCache
    from .stages.embed import cache_keys

    with door(cfg, wait) as ws:
        return EmbeddingCache(ws.cache).prune(cache_keys(cfg), dry_run=dry_run)


def similar(cfg: PipelineConfig, examples: str, layer: str | None, negatives: str | None,
            negatives_layer: str | None, opts: SimilarOptions, wait: float = 0) -> SimilarReport:
    """``settlements similar``: the query (:mod:`settlements.similar`) and its layers, committed into the run's
    GeoPackage with the QGIS project that shows them."""
    started = time.time()
    with door(cfg, wait) as ws:
        found = similar_query.query(cfg, ws, examples, layer, negatives, negatives_layer, opts)
        similar_query.write(cfg, ws, found)
    return found.report(time.time() - started)


def train(cfg: PipelineConfig, wait: float = 0) -> dict[str, Any]:
    """``settlements train`` (:mod:`settlements.supervised.train`): models, record and evaluation committed
    together, so a training that fails or is interrupted replaces none of the last good ones."""
    from .supervised.train import train as train_models

    with door(cfg, wait) as ws:
        return train_models(cfg, ws)


def predict(cfg: PipelineConfig, model: PredictModel | Path, wait: float = 0) -> dict[str, Path]:
    """``settlements predict`` (:mod:`settlements.supervised.predict`): the supervised map, committed at once."""
    from .supervised.predict import predict as predict_tiles

    with door(cfg, wait) as ws:
        return predict_tiles(cfg, ws, model)


def export_embeddings(cfg: PipelineConfig, fmt: ExportFormat, output: Path | None = None, wait: float = 0
                      ) -> dict[str, Path]:
    """``settlements export-embeddings`` (:mod:`settlements.export.embeddings`): only files of its own."""
    from .export.embeddings import export as export_files

    with door(cfg, wait) as ws:
        return export_files(cfg, ws, fmt, output)


def export_model(cfg: PipelineConfig, output: Path | None = None, wait: float = 0) -> dict[str, Any]:
    """``settlements model export`` (:mod:`settlements.model_export`): the portable model file, committed at
    once (default: the output folder's ``<name>_model.npz``)."""
    from .model_export import export_model as write_model

    with door(cfg, wait) as ws:
        return write_model(cfg, ws, Path(output) if output is not None else outputs(cfg).model)


@contextmanager
def file_door(targets: list[Path], wait: float = 0) -> Iterator[Commit]:
    """The door of a command whose files belong to no pipeline (``compare``; ``targets`` in one folder): a lock
    beside the first, the leftovers of a killed command there removed (its half-done commit completed),
    one commit."""
    from filelock import FileLock, Timeout

    from .store import finish_commit

    first = targets[0]
    folder = first.parent
    ensure_dir(folder, "-o")
    lock = FileLock(str(folder / f".{first.name}.lock"))
    try:
        lock.acquire(timeout=wait)
    except Timeout:
        raise RunLockedError(f"{first}: another command is writing it; try again when it finishes, or pass "
                             "--wait SECONDS") from None
    try:
        journal = folder / f".{first.name}.settlements-commit.json"
        finish_commit(journal)
        for target in targets:
            remove_stale_temps(folder, name_end=f".{target.name}", subfolders=False)
        with Commit(journal) as commit:
            yield commit
    finally:
        lock.release()


def compare(cfgs: list[PipelineConfig], output: Path, wait: float = 0) -> dict[str, Any]:
    """``settlements compare`` (:mod:`settlements.compare`): every pipeline's regions in one GeoPackage and their
    label shares in one figure, committed together; each pipeline read under its own lock."""
    from .compare import check_legends, check_target, read_pipeline, shares_png, write_comparison

    check_target(cfgs, output)
    read = []
    for cfg in cfgs:
        if not outputs(cfg).gpkg.is_file():
            read_pipeline(cfg)  # its one error line, before the lock would make its work folder
        with pipeline_lock(cfg, wait):
            read.append(read_pipeline(cfg))
    legend = check_legends(read)
    png = shares_png(output)
    with file_door([output, png], wait) as commit:
        result = write_comparison(read, legend, commit.stage(output), commit.stage(png))
    return {**result, "gpkg": output, "figure": png}


# ------------------------------------------------------------------------------------------ run

@dataclass
class RunReport:
    tiles: dict[str, int] = field(default_factory=dict)
    embedding: dict[str, int] = field(default_factory=dict)
    clustering: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0
    nothing_to_do: bool = False
    run_id: str | None = None


def run(cfg: PipelineConfig, refit: bool = False, lock_timeout: float = 0, skip_unchanged: bool = False,
        executor: str = "local", scheduler: str | None = None, n_workers: int | None = None) -> RunReport:
    """All stages, through the door.

    With ``skip_unchanged`` (what ``settlements run`` does unless ``--force``), a pipeline whose
    inputs, settings and labels are unchanged since its last successful run, with outputs in
    place, is left alone and the report says ``nothing_to_do``. ``executor="dask"`` spreads
    embedding and assignment over a Dask cluster.
    """
    started = time.time()
    check_executor(executor, scheduler)
    check_refit(cfg, refit)
    tile.check_output_settings(cfg)
    ensure_dir(cfg.work_dir, "output.work_dir")
    with door(cfg, lock_timeout) as ws:
        if skip_unchanged and not refit and up_to_date(cfg):
            log.info("%s: inputs, settings and labels unchanged since the last run; nothing to do", cfg.name)
            return RunReport(nothing_to_do=True, seconds=time.time() - started, outputs=output_paths(cfg))
        parts = state_parts(cfg)
        key = state_key(cfg, parts)
        report = RunReport()
        seconds: dict[str, float] = {}
        t0 = time.time()
        report.tiles = stage_tile(cfg, ws)
        seconds["tile"] = time.time() - t0
        step("%s: 1/4 tile: %d tiles over %d raster(s) (%.1f s)", cfg.name, report.tiles["tiles"],
             report.tiles["rasters"], seconds["tile"])
        t0 = time.time()
        ex = make_executor(executor, scheduler, n_workers)
        try:
            report.embedding = stage_embed(cfg, ex, ws)
            seconds["embed"] = time.time() - t0
            step("%s: 2/4 embed: %d embedded, %d reused from cache (%.1f s)", cfg.name,
                 report.embedding["tiles_embedded"], report.embedding["tiles_reused"], seconds["embed"])
            t0 = time.time()
            report.clustering = stage_cluster(cfg, refit=refit, executor=ex, ws=ws)
            seconds["cluster"] = time.time() - t0
            step("%s: 3/4 cluster: k=%d (%.1f s)", cfg.name, cfg.clustering.k, seconds["cluster"])
        finally:
            ex.close()
        info = {"started_utc": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
                "stage_seconds": seconds, "state_key": key}
        t0 = time.time()
        report.outputs = stage_export(cfg, started, report.embedding, info, ws)
        seconds["export"] = time.time() - t0
        step("%s: 4/4 export (%.1f s)", cfg.name, seconds["export"])
        assert ws.commit is not None
        recorded = ws.current(report.outputs["gpkg"])
        report.run_id = last_run_id(recorded)
        # the duration the runs table records, from the start to the last output written: one figure everywhere
        report.seconds = float((last_run_value(recorded, "duration_s") or (time.time() - started,))[0])
        staged = sorted(ws.commit.folder(cfg.output_dir).iterdir())
        record_success(cfg, str(report.run_id), parts, staged, ws.commit)
    return report


__all__ = ["run", "door", "stage_tile", "stage_embed", "stage_cluster", "stage_export", "pull_labels",
           "labels_template", "prune_cache", "similar", "train", "predict", "export_embeddings", "export_model",
           "compare", "RunReport"]
