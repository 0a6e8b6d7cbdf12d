"""The runner: the stages in order, under the pipeline's lock, committed together; the run's own record.

tile -> embed -> cluster -> export (:mod:`settlements.stages`). Artifacts live in the work folder;
outputs are written only by ``export``. Everything a run writes (artifacts, outputs, the labels
file, the record of its success) is staged beside its final place and renamed into place at one
commit point (:class:`settlements.store.Commit`), so a failed or killed run leaves the earlier ones
untouched. A run whose inputs, settings and labels are unchanged since its last success has
nothing to do (:func:`settlements.reprocess.up_to_date`).
"""

from __future__ import annotations

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
from .config import PipelineConfig, SimilarOptions, check_executor
from .errors import ConfigError
from .executors import Executor, make_executor
from .export.previous import last_run_id
from .labels import pipeline_of, pull_edits
from .reprocess import (
    claim,
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
from .store import Commit, Workspace, ensure_dir, remove_stale_temps, workspace

log = logging.getLogger(__name__)


@contextmanager
def committing(cfg: PipelineConfig, ws: Workspace | None = None) -> Iterator[Workspace]:
    """``ws`` when it belongs to a run's commit; else a workspace whose writes commit when the block ends."""
    if ws is not None and ws.commit is not None:
        yield ws
        return
    with Commit(workspace(cfg).journal) as commit:
        seen = labels_hash(cfg)
        # the labels file is the analyst's: never replace an edit made while this run was working
        commit.guard(lambda: not commit.staged(cfg.labels_path) or labels_hash(cfg) == seen, cfg.labels_path,
                     "edited while the run was writing its own version of it; nothing was replaced: run again")
        yield workspace(cfg, commit)
        claim(cfg, cfg.work_dir, commit)


# -------------------------------------------------------------------------------- single stages

def stage_tile(cfg: PipelineConfig, ws: Workspace | None = None) -> dict[str, int]:
    """The tile stage (:func:`settlements.stages.tile.tile`), committed on its own unless ``ws`` is a run's."""
    with committing(cfg, ws) as w:
        return tile.tile(cfg, w)


def stage_embed(cfg: PipelineConfig, executor: Executor | None = None, ws: Workspace | None = None
                ) -> dict[str, int]:
    """The embed stage (:func:`settlements.stages.embed.embed`); the cache is written as chunks finish."""
    with committing(cfg, ws) as w:
        return embed.embed(cfg, w, executor)


def stage_cluster(cfg: PipelineConfig, refit: bool = False, executor: Executor | None = None,
                  ws: Workspace | None = None) -> dict[str, Any]:
    """The cluster stage (:func:`settlements.stages.cluster.cluster`)."""
    with committing(cfg, ws) as w:
        return cluster.cluster(cfg, w, refit, executor)


def stage_export(cfg: PipelineConfig, run_started: float | None = None,
                 counters: dict[str, Any] | None = None, run_info: dict[str, Any] | None = None,
                 ws: Workspace | None = None) -> dict[str, Path]:
    """The export stage (:func:`settlements.stages.export.export`), with this run's record for ``runs``."""
    with committing(cfg, ws) as w:
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


def pull_labels(gpkg: Path, config: Path | None = None, wait: float = 0) -> tuple[list[str], dict[str, Path]]:
    """``settlements labels pull``: edits in ``gpkg`` -> the labels YAML -> every output, regenerated.

    The pipeline is :func:`settlements.labels.pipeline_of`; outputs are rewritten beside ``gpkg``,
    wherever it now lies. Under the pipeline's lock, the labels file and the outputs are committed together.
    """
    gpkg = Path(gpkg)
    if not gpkg.is_file():
        raise ConfigError(f"{gpkg}: GeoPackage not found")
    cfg = pipeline_of(gpkg, config)
    cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": gpkg.resolve().parent})})
    with pipeline_lock(cfg, wait), committing(cfg) as ws:
        changes = pull_edits(gpkg, ws.labels, cfg.name, cfg.clustering.k, target=ws.out(cfg.labels_path))
        return changes, stage_export(cfg, ws=ws)


def similar(cfg: PipelineConfig, examples: str, layer: str | None, negatives: str | None,
            negatives_layer: str | None, opts: SimilarOptions, wait: float = 0) -> SimilarReport:
    """``settlements similar``: the query (:mod:`settlements.similar`) under the pipeline's lock, its
    layers committed into the run's GeoPackage, so a run can never interleave and a killed query
    leaves the GeoPackage as it was."""
    started = time.time()
    with pipeline_lock(cfg, wait):
        found = similar_query.query(cfg, workspace(cfg), examples, layer, negatives, negatives_layer, opts)
        with committing(cfg) as ws:
            similar_query.write(cfg, ws, found)
    return found.report(time.time() - started)


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
    """All stages under the pipeline's lock.

    With ``skip_unchanged`` (what ``settlements run`` does unless ``--force``), a pipeline whose
    inputs, settings and labels are unchanged since its last successful run, with outputs in
    place, is left alone and the report says ``nothing_to_do``. ``executor="dask"`` spreads
    embedding and assignment over a Dask cluster.
    """
    started = time.time()
    check_executor(executor, scheduler)
    tile.check_output_settings(cfg)
    ensure_dir(cfg.work_dir, "output.work_dir")
    with pipeline_lock(cfg, lock_timeout):
        if skip_unchanged and not refit and up_to_date(cfg):
            log.info("%s: inputs, settings and labels unchanged since the last run; nothing to do", cfg.name)
            return RunReport(nothing_to_do=True, seconds=time.time() - started,
                             outputs=output_paths(cfg))
        n = (remove_stale_temps(cfg.work_dir, cfg.work_dir / "cache", cfg.output_dir)
             + remove_stale_temps(cfg.labels_path.parent, name_end=f".{cfg.labels_path.name}", subfolders=False))
        if n:
            log.info("removed %d temporary file(s) left by an interrupted run", n)
        parts = state_parts(cfg)
        key = state_key(cfg, parts)
        report = RunReport()
        seconds: dict[str, float] = {}
        with committing(cfg) as ws:
            t0 = time.time()
            report.tiles = stage_tile(cfg, ws)
            seconds["tile"] = time.time() - t0
            t0 = time.time()
            ex = make_executor(executor, scheduler, n_workers)
            try:
                report.embedding = stage_embed(cfg, ex, ws)
                seconds["embed"] = time.time() - t0
                t0 = time.time()
                report.clustering = stage_cluster(cfg, refit=refit, executor=ex, ws=ws)
                seconds["cluster"] = time.time() - t0
            finally:
                ex.close()
            info = {"started_utc": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
                    "stage_seconds": seconds, "state_key": key}
            t0 = time.time()
            report.outputs = stage_export(cfg, started, report.embedding, info, ws)
            seconds["export"] = time.time() - t0
            assert ws.commit is not None
            report.run_id = last_run_id(ws.current(report.outputs["gpkg"]))
            staged = sorted(ws.commit.folder(cfg.output_dir).iterdir())
            record_success(cfg, str(report.run_id), parts, staged, ws.commit)
        report.seconds = time.time() - started
        return report


__all__ = ["run", "stage_tile", "stage_embed", "stage_cluster", "stage_export", "pull_labels", "RunReport"]
