"""Scheduled reprocessing: the run lock, "nothing to do" detection, cache pruning.

A scheduler (cron, systemd) reruns pipelines blindly; this module makes that cheap and safe.
The *state key* of a pipeline hashes everything a run's outputs depend on that can change
between runs: the resolved config, each input raster's path and fingerprint, the region files,
the labels file and the package version. A successful run saves it in ``work/<name>/last_run.json``
(committed with its outputs) with the name, size and SHA-256 of every output; a later run with the
same key, whose outputs are all present and unchanged, has nothing to do (exit code 3).

The lock also guards the pipeline's folders: each holds a marker naming the pipeline that owns
it, so a second pipeline pointed at the same folder stops with a clear error, and whoever takes the
lock first completes a commit that a killed run left half done (:func:`settlements.store.finish_commit`).

This module is kept free of torch so the nothing-to-do path of ``settlements run`` stays fast.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from . import __version__
from .config import PipelineConfig, check_wait
from .errors import ConfigError, OutputError, RunLockedError
from .products import outputs
from .store import (
    TEMP_PREFIX,
    Commit,
    check_writable_dir,
    ensure_dir,
    expand_inputs,
    fingerprint,
    finish_commit,
    sha256_file,
    workspace,
    write_json,
)

log = logging.getLogger(__name__)

#: Exit codes for schedulers: 0 outputs written, 2 bad input (or the pipeline is locked),
#: 3 nothing to do, 4 inputs are an example scene not fetched yet (``make data``; nothing run),
#: 1 any other failure (a bug or the machine: see the traceback).
EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_NOTHING_TO_DO, EXIT_NOT_FETCHED = 0, 1, 2, 3, 4


#: The marker file naming the pipeline that owns a work or output folder.
OWNER_FILE = ".settlements-pipeline.json"


def _owner(cfg: PipelineConfig, folder: Path) -> dict[str, str | None]:
    """The marker's content: the config path is relative, so a folder tree moved as a whole stays owned."""
    source = None if cfg.source is None else os.path.relpath(cfg.source, folder.resolve())
    return {"pipeline": cfg.name, "config": source}


def check_owner(cfg: PipelineConfig, folder: Path, key: str) -> None:
    """Raise when ``folder`` belongs to another pipeline: another name, or another config that still exists.

    (A marker whose config is gone, with this pipeline's name, is taken over: the config was moved.)
    """
    marker = folder / OWNER_FILE
    if not marker.is_file():
        return
    try:
        mark = json.loads(marker.read_text(encoding="utf-8"))
        name, config = str(mark["pipeline"]), mark.get("config")
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{key}: {marker}: unreadable owner marker; delete it if pipeline '{cfg.name}' should "
                          "use this folder") from None
    other = None if config is None else (folder.resolve() / str(config)).resolve()
    mine = None if cfg.source is None else cfg.source.resolve()
    if name == cfg.name and (other is None or mine is None or other == mine or not other.is_file()):
        return
    raise ConfigError(f"{key}: {folder} belongs to pipeline '{name}'" + (f" ({other})" if other else "")
                      + f"; give pipeline '{cfg.name}' a folder of its own (two pipelines in one folder would "
                      "overwrite each other's files and state)")


def _claim(cfg: PipelineConfig, folder: Path, key: str) -> bool:
    """Mark ``folder`` as this pipeline's unless it is already; True when this call made the marker.

    The marker is created whole and at once (a hard link of a finished file, which fails when the name
    exists), so of two pipelines claiming one folder at the same moment exactly one gets it, and the
    other is told whose it is. A marker of this pipeline that names its config otherwise (a config moved
    away, see :func:`check_owner`) is rewritten.
    """
    check_owner(cfg, folder, key)
    marker = folder / OWNER_FILE
    mine = _owner(cfg, folder)
    try:
        if json.loads(marker.read_text(encoding="utf-8")) == mine:
            return False
    except (OSError, ValueError):
        pass
    existed = marker.exists()
    try:
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=f".{OWNER_FILE}", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(mine, f)
        try:
            if existed:
                os.replace(tmp, marker)  # ours, with another config path: taken over (check_owner allowed it)
            else:
                os.link(tmp, marker)
        except FileExistsError:  # another pipeline made it a moment ago
            check_owner(cfg, folder, key)
            return False
        finally:
            Path(tmp).unlink(missing_ok=True)
    except OSError as exc:
        raise OutputError(f"{key}: cannot claim folder {folder}: {exc.strerror or exc}") from None
    return not existed


@contextmanager
def claimed(cfg: PipelineConfig) -> Iterator[None]:
    """The pipeline's work and output folders claimed before any work starts (created where missing).

    Two pipelines pointed at one folder (each holding its own lock) cannot both get it: the second
    stops with one line naming the first, before it computes anything. A command that fails leaves
    no marker it made, nor a folder it created and left empty.
    """
    made: list[Path] = []
    created: list[Path] = []
    try:
        for folder, key in ((cfg.work_dir, "output.work_dir"), (cfg.output_dir, "output.dir")):
            check_writable_dir(folder, key)
            created += [p for p in [folder, *folder.parents] if not p.exists()][::-1]
            ensure_dir(folder, key)
            if _claim(cfg, folder, key):
                made.append(folder / OWNER_FILE)
        yield
    except BaseException:
        for marker in made:
            marker.unlink(missing_ok=True)
        for folder in reversed(created):
            try:
                folder.rmdir()  # only if empty: whatever the command left there stays
            except OSError:
                pass
        raise


@contextmanager
def pipeline_lock(cfg: PipelineConfig, timeout: float = 0) -> Iterator[None]:
    """Hold the pipeline's lock: one run (or prune) of a pipeline at a time, never interleaved writes.

    ``timeout`` 0 fails at once with :class:`RunLockedError`; a positive value waits that many
    seconds first. The lock is an OS file lock, so it is released when a killed run's process dies.
    Once held: the folders must be this pipeline's (:func:`check_owner`), and a commit that a killed
    run left half done is completed.
    """
    check_wait(timeout)
    check_writable_dir(cfg.work_dir, "output.work_dir")
    ensure_dir(cfg.work_dir, "output.work_dir")
    ws = workspace(cfg)
    lock = FileLock(str(ws.lock))
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        waited = f" after waiting {timeout:g} s" if timeout > 0 else ""
        raise RunLockedError(f"{cfg.source}: another run of pipeline '{cfg.name}' is in progress "
                             f"(lock {ws.lock}){waited}; try again when it finishes, "
                             "or pass --wait SECONDS") from None
    try:
        check_owner(cfg, cfg.work_dir, "output.work_dir")
        check_owner(cfg, cfg.output_dir, "output.dir")
        finished = finish_commit(ws.journal)
        if finished:
            log.warning("%s: completed the commit of a run killed while replacing its outputs (%d file(s))",
                        cfg.name, finished)
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
    """Everything the outputs depend on that a scheduler might see change (the model file whose clusters the
    pipeline takes too, by SHA-256).

    Not included: the pretrained weights when they come from the hub cache or a package (pin
    them with ``embedding.weights``, a file, which is included), and library versions.
    """
    try:
        inputs: list[dict[str, Any]] = [{"path": str(p), "fingerprint": fingerprint(p)}
                                        for p, _ in expand_inputs(cfg.rasters)]
    except (OSError, ValueError):
        inputs = [{"unreadable": True}]  # the run itself reports the problem
    regions = [f for r in cfg.regions if r.path is not None for f in _file_keys(r.path)]
    weights = _file_keys(cfg.embedding.weights) if cfg.embedding.weights else []
    parts = {"version": __version__, "config": cfg.to_yaml_dict(), "inputs": inputs, "regions": regions,
             "weights": weights, "labels": labels_hash(cfg)}
    if cfg.clustering.model is not None:  # its clusters, names and colours: another file, another map
        model = cfg.clustering.model
        parts["model"] = sha256_file(model) if model.is_file() else "missing"
    return parts


def state_key(cfg: PipelineConfig, parts: dict[str, Any] | None = None) -> str:
    """Short hash of :func:`state_parts`."""
    parts = state_parts(cfg) if parts is None else parts
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def output_paths(cfg: PipelineConfig) -> dict[str, Path]:
    """The files of the cluster map a run writes, by what they are (names from :mod:`settlements.products`)."""
    files = outputs(cfg)
    m = files.cluster_map
    paths = {"gpkg": m.gpkg, "atlas": files.atlas, "histograms": m.histograms, "map": m.picture,
             "cluster_map": m.raster, "project": files.project}
    return {kind: path for kind, path in paths.items() if path is not None}


def file_record(path: Path) -> dict[str, Any]:
    """What :func:`unchanged` compares: size, SHA-256, and the stat fields that let it skip the hash."""
    st = path.stat()
    return {"size": st.st_size, "sha256": sha256_file(path), "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def unchanged(path: Path, record: dict[str, Any]) -> bool:
    """True when ``path`` still has the content ``record`` describes.

    The same size, modification time and inode (a rename keeps both) means the same file, untouched:
    the hash is read only when they differ, so the check stays cheap on a large GeoPackage.
    """
    try:
        st = path.stat()
    except OSError:
        return False
    if st.st_size != record.get("size"):
        return False
    if st.st_mtime_ns == record.get("mtime_ns") and st.st_ino == record.get("inode"):
        return True
    return sha256_file(path) == record.get("sha256")


def up_to_date(cfg: PipelineConfig) -> bool:
    """True when the last successful run saw exactly this state and every output it wrote is unchanged."""
    path = workspace(cfg).last_run
    if not path.exists():
        return False
    try:
        last = json.loads(path.read_text())
        outputs = last["outputs"]
    except (OSError, ValueError, KeyError, TypeError):  # unreadable, or written by a version without output hashes
        return False
    if last.get("state_key") != state_key(cfg) or not outputs:
        return False
    return all(unchanged(cfg.output_dir / name, record) for name, record in outputs.items())


def record_success(cfg: PipelineConfig, run_id: str, parts: dict[str, Any], outputs: list[Path],
                   commit: Commit) -> None:
    """Stage ``last_run.json``: the state a finished run saw and its outputs, committed with them.

    ``parts`` are taken when the run started, so a raster that arrives during a run is still new
    to the next one. When the run itself writes the labels file (the first run's template, pulled
    table edits, or a refit renumbering), the file as it writes it is what it saw. ``outputs``:
    the staged output files, recorded under their final names.
    """
    labels = commit.current(cfg.labels_path)
    if labels != cfg.labels_path:
        parts = {**parts, "labels": hashlib.sha256(labels.read_bytes()).hexdigest()}
    write_json(commit.stage(workspace(cfg).last_run), {
        "state_key": state_key(cfg, parts), "run_id": run_id,
        "outputs": {p.name: file_record(p) for p in sorted(outputs)}})


def keep_recorded(cfg: PipelineConfig, commit: Commit, replaced: dict[Path, Path]) -> None:
    """Outputs of the last run that a command replaces (final path -> its staged version): where the file
    is still what that run wrote, record the new one in its place (committed with it), so a scheduled
    rerun still has nothing to do. A file edited since (a clusters table, drawn layers) stays unrecorded,
    so the next run still pulls the edits."""
    path = workspace(cfg).last_run
    try:
        last = json.loads(commit.current(path).read_text())
        records = last["outputs"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    changed = False
    for final, staged in replaced.items():
        record = records.get(final.name) if final.parent == cfg.output_dir else None
        if record is not None and unchanged(final, record):
            records[final.name] = file_record(staged)
            changed = True
    if changed:
        write_json(commit.stage(path), last)
