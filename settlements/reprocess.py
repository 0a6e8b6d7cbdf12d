"""Scheduled reprocessing: the run lock, "nothing to do" detection, cache pruning.

A scheduler (cron, systemd) reruns pipelines blindly; this module makes that cheap and safe.
The *state key* of a pipeline hashes everything a run's outputs depend on that can change
between runs: the resolved config, each input raster's path and fingerprint, the region files,
the labels file and the package version. After a successful run it is saved in
``work/<name>/last_run.json``; a later run with the same key, whose outputs are all present and
whose GeoPackage still ends with that run, has nothing to do (exit code 3).

This module is kept free of torch so the nothing-to-do path of ``settlements run`` stays fast.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from . import __version__
from .config import PipelineConfig
from .errors import RunLockedError
from .rasters import expand_inputs, fingerprint
from .store import check_writable_dir, ensure_dir, write_json

log = logging.getLogger(__name__)

#: Exit codes for schedulers: 0 outputs written, 2 bad input (or the pipeline is locked),
#: 3 nothing to do, 1 any other failure (a bug or the machine: see the traceback).
EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_NOTHING_TO_DO = 0, 1, 2, 3


def lock_path(cfg: PipelineConfig) -> Path:
    return cfg.work_dir / ".lock"


def last_run_path(cfg: PipelineConfig) -> Path:
    return cfg.work_dir / "last_run.json"


@contextmanager
def pipeline_lock(cfg: PipelineConfig, timeout: float = 0) -> Iterator[None]:
    """Hold the pipeline's lock: one run (or prune) of a pipeline at a time, never interleaved writes.

    ``timeout`` 0 fails at once with :class:`RunLockedError`; a positive value waits that many
    seconds first. The lock is an OS file lock, so it is released when a killed run's process dies.
    """
    check_writable_dir(cfg.work_dir, "output.work_dir")
    ensure_dir(cfg.work_dir, "output.work_dir")
    lock = FileLock(str(lock_path(cfg)))
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        waited = f" after waiting {timeout:g} s" if timeout > 0 else ""
        raise RunLockedError(f"{cfg.source}: another run of pipeline '{cfg.name}' is in progress "
                             f"(lock {lock_path(cfg)}){waited}; try again when it finishes, "
                             "or pass --wait SECONDS") from None
    try:
        yield
    finally:
        lock.release()


def _file_keys(path: Path) -> list[dict[str, str]]:
    """Fingerprints of a vector file and its sidecars (a shapefile is several files)."""
    if not path.exists():
        return [{"path": str(path), "fingerprint": "missing"}]
    files = [path] if path.suffix.lower() != ".shp" else sorted(path.parent.glob(path.stem + ".*"))
    return [{"path": str(p), "fingerprint": fingerprint(p)} for p in files if p.is_file()]


def labels_hash(cfg: PipelineConfig) -> str | None:
    path = cfg.labels_path
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def state_parts(cfg: PipelineConfig) -> dict[str, Any]:
    """Everything the outputs depend on that a scheduler might see change.

    Not included: the pretrained weights when they come from the hub cache or a package (pin
    them with ``embedding.weights``, a file, which is included), and library versions.
    """
    try:
        inputs = [{"path": str(p), "fingerprint": fingerprint(p)} for p, _ in expand_inputs(cfg.rasters)]
    except (OSError, ValueError):
        inputs = [{"unreadable": True}]  # the run itself reports the problem
    regions = [f for r in cfg.regions if r.path is not None for f in _file_keys(r.path)]
    weights = _file_keys(cfg.embedding.weights) if cfg.embedding.weights else []
    return {"version": __version__, "config": cfg.to_yaml_dict(), "inputs": inputs, "regions": regions,
            "weights": weights, "labels": labels_hash(cfg)}


def state_key(cfg: PipelineConfig, parts: dict[str, Any] | None = None) -> str:
    """Short hash of :func:`state_parts`."""
    parts = state_parts(cfg) if parts is None else parts
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def output_paths(cfg: PipelineConfig) -> dict[str, Path]:
    d = cfg.output_dir
    return {"gpkg": d / f"{cfg.name}.gpkg", "atlas": d / "atlas.png", "histograms": d / "histograms.png",
            "map": d / "map.png"}


def last_run_value(gpkg: Path, column: str) -> tuple | None:
    """``column`` of the last row of a GeoPackage's ``runs`` table, read-only (raises sqlite3.Error)."""
    con = sqlite3.connect(f"file:{gpkg}?mode=ro", uri=True)
    try:
        return con.execute(f"SELECT {column} FROM runs ORDER BY fid DESC LIMIT 1").fetchone()
    finally:
        con.close()


def last_run_id(gpkg: Path) -> str | None:
    """The ``run_id`` of the last row of a GeoPackage's ``runs`` table (None if unreadable)."""
    try:
        row = last_run_value(gpkg, "run_id")
    except sqlite3.Error:
        return None
    return row[0] if row else None


def up_to_date(cfg: PipelineConfig) -> bool:
    """True when the last successful run saw exactly this state and its outputs are all in place."""
    path = last_run_path(cfg)
    if not path.exists():
        return False
    try:
        last = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    outputs = output_paths(cfg)
    if last.get("state_key") != state_key(cfg) or not all(p.is_file() for p in outputs.values()):
        return False
    return last_run_id(outputs["gpkg"]) == last.get("run_id")


def record_success(cfg: PipelineConfig, run_id: str, parts: dict[str, Any], labels_written: bool) -> None:
    """Remember the state a finished run saw (written last, so a killed run never records one).

    ``parts`` are taken when the run started, so a raster that arrives during a run is still new
    to the next one. When the run itself wrote the labels file (the first run's template, or a
    refit renumbering), the file as written is what it saw.
    """
    if labels_written:
        parts = {**parts, "labels": labels_hash(cfg)}
    write_json(last_run_path(cfg), {"state_key": state_key(cfg, parts), "run_id": run_id})


def current_cache_keys(cfg: PipelineConfig) -> set[str]:
    """The embedding-cache shards the current config uses (one per input raster)."""
    from .embedding.backbones import build_backbone
    from .pipeline import check_inputs, embedding_key, inference_settings
    from .rasters import compute_scaling

    infos, _ = check_inputs(cfg)
    specs = [spec for _, spec in expand_inputs(cfg.rasters)]
    e = cfg.embedding
    backbone = build_backbone(e.backbone, e.layer, e.weights, allow_download=False)
    precision = inference_settings(cfg).precision
    return {embedding_key(compute_scaling(info, spec), cfg, backbone.weights.sha256, backbone.layer, precision)
            for info, spec in zip(infos, specs, strict=True)}
