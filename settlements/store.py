"""Artifacts on disk: atomic writes, tables, embedding arrays, the embedding cache.

Nothing here computes; it only stores and finds. Every write goes to a temporary file in the
same folder and is renamed into place, so a killed run never leaves a half-written artifact.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import OutputError, StageError

# The 8 integers that identify a tile's pixels in a raster: tile window and stride cell window.
WINDOW_COLUMNS = ["tile_col", "tile_row", "tile_w", "tile_h", "cell_col", "cell_row", "cell_w", "cell_h"]


_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def _space_hint(folder: Path) -> str | None:
    """Why a write may have failed for lack of room: the disk is (nearly) full, or a file size limit."""
    import resource
    import shutil

    try:
        if shutil.disk_usage(folder).free < 16 << 20:
            return "disk full"
    except OSError:
        pass
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if soft != resource.RLIM_INFINITY:
        return f"file size limit of {soft} bytes reached"
    return None


def _write_failure(target: Path, exc: BaseException) -> OutputError:
    """One-line :class:`OutputError` for a failed write; says so when the disk (or a size limit) is full.

    GDAL and sqlite often report a full disk as some later failure, so free space is checked too.
    """
    err = getattr(exc, "errno", None)
    text = (str(getattr(exc, "strerror", None) or exc).splitlines() or [type(exc).__name__])[0]
    hint = _space_hint(target.parent)
    if hint is None and (err in _FULL or any(w in text.lower() for w in ("no space", "too large", "disk is full"))):
        hint = "disk full"
    return OutputError(f"{target}: cannot write{f' ({hint})' if hint else ''}: {text}")


def _is_write_error(exc: BaseException) -> bool:
    """Errors a writer raises when the disk refuses: OSError, GDAL's via pyogrio/rasterio, sqlite's."""
    import sqlite3

    names = {"DataSourceError", "DataLayerError", "FieldError", "GeometryError", "RasterioIOError", "CPLE_BaseError"}
    return isinstance(exc, (OSError, sqlite3.Error)) or any(c.__name__ in names for c in type(exc).__mro__)


def ensure_dir(path: Path, key: str) -> None:
    """Create a folder (and parents) or raise one clear :class:`OutputError` naming the config key."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{key}: cannot create folder {path}: {exc.strerror or exc}") from None


def check_writable_dir(path: Path, key: str) -> None:
    """Fail early (before any CNN work) when ``path`` could not be created or written; create nothing.

    Walks up to the first existing ancestor: it must be a folder we may write to.
    """
    probe = path
    while not probe.exists():
        if probe.is_symlink() or probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{key}: cannot create folder {path}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"{key}: folder {probe} is not writable")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


@contextmanager
def atomic_path(target: Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` if the block succeeds.

    Whatever fails (disk full, folder not writable), the temporary file is removed and ``target``
    keeps its earlier content.
    """
    tmp_path: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or target.suffix or ".tmp",
                                   dir=target.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes 0600 files; outputs get the usual umask permissions
            os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, target)
    except BaseException as exc:
        if tmp_path is not None:
            _remove_quietly(tmp_path)
        if not isinstance(exc, OutputError) and _is_write_error(exc):
            raise _write_failure(target, exc) from None
        raise


def _remove_quietly(path: Path) -> None:
    """Remove a temporary file and the sidecars GDAL/sqlite may leave beside it (-journal, -wal, -shm)."""
    for p in (path, *(path.with_name(path.name + s) for s in ("-journal", "-wal", "-shm"))):
        try:
            p.unlink(missing_ok=True)
        except OSError:
            pass


def write_atomic(target: Path, writer: Callable[[Path], Any]) -> None:
    with atomic_path(target) as tmp:
        writer(tmp)


def write_json(target: Path, obj: Any) -> None:
    write_atomic(target, lambda p: p.write_text(json.dumps(obj, indent=2, default=str)))


def read_json(path: Path, stage: str) -> Any:
    if not path.exists():
        raise StageError(f"{path}: missing; run `settlements {stage}` first")
    return json.loads(path.read_text())


def write_table(target: Path, df: pd.DataFrame) -> None:
    write_atomic(target, lambda p: df.to_parquet(p, index=False))


def read_table(path: Path, stage: str) -> pd.DataFrame:
    if not path.exists():
        raise StageError(f"{path}: missing; run `settlements {stage}` first")
    return pd.read_parquet(path)


def settings_key(parts: dict[str, Any]) -> str:
    """A short stable hash of JSON-able settings, used to name cache shards."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


class EmbeddingCache:
    """Embeddings keyed by (raster content, preprocessing, backbone+weights) then by window.

    A shard is a folder of chunk files, each written atomically as soon as its tiles are
    embedded, so a killed run resumes from the last finished chunk.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def shard(self, key: str) -> Path:
        return self.root / key

    def load(self, key: str, dim: int) -> tuple[pd.DataFrame, np.ndarray]:
        """All cached rows of a shard: window columns + validity, and their embeddings (or NaN)."""
        frames, arrays = [], []
        folder = self.shard(key)
        for chunk in sorted(folder.glob("chunk-*.npz")) if folder.exists() else []:
            try:
                with np.load(chunk) as z:
                    frames.append(pd.DataFrame({
                        **{c: z["windows"][:, i] for i, c in enumerate(WINDOW_COLUMNS)},
                        "valid_tile": z["valid_tile"], "valid_cell": z["valid_cell"],
                    }))
                    arrays.append(z["embeddings"])
            except (OSError, ValueError, KeyError):
                chunk.unlink(missing_ok=True)  # a chunk from an older format or a broken disk
        if not frames:
            cols = {c: np.empty(0, np.int64) for c in WINDOW_COLUMNS}
            return (pd.DataFrame({**cols, "valid_tile": np.empty(0, np.float32),
                                  "valid_cell": np.empty(0, np.float32)}), np.empty((0, dim), np.float32))
        table = pd.concat(frames, ignore_index=True)
        emb = np.concatenate(arrays, axis=0)
        # a window embedded twice (threshold lowered, then re-run) keeps its latest row
        last = ~table.duplicated(WINDOW_COLUMNS, keep="last").to_numpy()
        return table[last].reset_index(drop=True), emb[last]

    def append(self, key: str, windows: np.ndarray, valid_tile: np.ndarray, valid_cell: np.ndarray,
               embeddings: np.ndarray) -> None:
        """Store one chunk; ``embeddings`` rows are NaN for tiles that were not embedded."""
        folder = self.shard(key)
        folder.mkdir(parents=True, exist_ok=True)
        n = len(list(folder.glob("chunk-*.npz")))
        # several Dask workers (processes or threads) may append to one shard at once: names stay unique
        target = folder / f"chunk-{n:06d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.npz"
        embedded = ~np.isnan(embeddings[:, 0]) if embeddings.shape[1] else np.zeros(len(embeddings), bool)

        def _write(p: Path) -> None:
            with p.open("wb") as f:
                np.savez(f, windows=windows.astype(np.int64), valid_tile=valid_tile.astype(np.float32),
                         valid_cell=valid_cell.astype(np.float32), embeddings=embeddings.astype(np.float32),
                         embedded=embedded)

        write_atomic(target, _write)

    def index(self, key: str) -> pd.DataFrame:
        """Every cached window of a shard with its validity and where its row lives, without the embeddings.

        Columns: the window columns, valid_tile, valid_cell, embedded (bool), chunk (file name), chunk_row.
        A window cached twice keeps its latest row, as in :meth:`load`.
        """
        frames = []
        folder = self.shard(key)
        for chunk in sorted(folder.glob("chunk-*.npz")) if folder.exists() else []:
            try:
                with np.load(chunk) as z:  # members are read lazily: the embeddings stay on disk
                    w = z["windows"]
                    embedded = z["embedded"] if "embedded" in z.files else ~np.isnan(z["embeddings"][:, 0])
                    frames.append(pd.DataFrame({
                        **{c: w[:, i] for i, c in enumerate(WINDOW_COLUMNS)},
                        "valid_tile": z["valid_tile"], "valid_cell": z["valid_cell"],
                        "embedded": embedded.astype(bool), "chunk": chunk.name,
                        "chunk_row": np.arange(len(w), dtype=np.int64),
                    }))
            except (OSError, ValueError, KeyError):
                chunk.unlink(missing_ok=True)  # a chunk from an older format or a broken disk
        if not frames:
            cols = {c: np.empty(0, np.int64) for c in WINDOW_COLUMNS}
            return pd.DataFrame({**cols, "valid_tile": np.empty(0, np.float32), "valid_cell": np.empty(0, np.float32),
                                 "embedded": np.empty(0, bool), "chunk": np.empty(0, object),
                                 "chunk_row": np.empty(0, np.int64)})
        table = pd.concat(frames, ignore_index=True)
        return table[~table.duplicated(WINDOW_COLUMNS, keep="last")].reset_index(drop=True)

    def chunk_embeddings(self, key: str, chunk: str) -> np.ndarray:
        """The embedding rows of one chunk file (NaN rows for tiles that were not embedded)."""
        with np.load(self.shard(key) / chunk) as z:
            return z["embeddings"]


    def shards(self) -> list[Path]:
        """Every shard folder in the cache (hidden leftovers of an interrupted prune excluded)."""
        if not self.root.exists():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def prune(self, keep: set[str], dry_run: bool = False) -> PruneReport:
        """Remove shards whose key is not in ``keep``, and temp files of killed runs; report bytes freed.

        A shard is first renamed to a hidden name, then deleted, so a prune killed half-way never
        leaves a half-deleted shard under a live key.
        """
        removed: list[str] = []
        freed = 0
        for shard in self.shards():
            if shard.name in keep:
                for tmp in stale_temps(shard):
                    freed += tmp.stat().st_size
                    if not dry_run:
                        tmp.unlink(missing_ok=True)
                continue
            freed += folder_bytes(shard)
            removed.append(shard.name)
            if not dry_run:
                trash = shard.with_name(f".trash-{shard.name}")
                os.replace(shard, trash)
                shutil.rmtree(trash, ignore_errors=True)
        if self.root.exists():
            for trash in self.root.glob(".trash-*"):
                freed += folder_bytes(trash)
                if not dry_run:
                    shutil.rmtree(trash, ignore_errors=True)
        kept = [s.name for s in self.shards() if s.name in keep]
        return PruneReport(removed=removed, kept=kept, freed_bytes=freed)


@dataclass(frozen=True)
class PruneReport:
    removed: list[str]
    kept: list[str]
    freed_bytes: int


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# The temporary names atomic_path makes: "." + target name + "." + 8 random characters + suffix.
_TEMP_RE = re.compile(r"^\..+\.[a-z0-9_]{8}\.[A-Za-z0-9]+$")


def stale_temps(folder: Path) -> list[Path]:
    """Temporary files that a killed run left in ``folder`` (call only while holding the run lock)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and _TEMP_RE.match(p.name))


def remove_stale_temps(*folders: Path) -> int:
    """Delete what :func:`stale_temps` finds in each folder (and one level of subfolders); count them."""
    n = 0
    for folder in folders:
        if not folder.is_dir():
            continue
        for sub in [folder, *(p for p in folder.iterdir() if p.is_dir())]:
            for tmp in stale_temps(sub):
                tmp.unlink(missing_ok=True)
                n += 1
    return n


def remove_stale_staging(out_dir: Path, tag: str) -> int:
    """Delete staging folders a killed run of pipeline ``tag`` left in ``out_dir`` (hold its lock)."""
    stale = list(out_dir.glob(f".staging-{tag}-*")) if out_dir.is_dir() else []
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    return len(stale)


@contextmanager
def staged_outputs(out_dir: Path, tag: str) -> Iterator[Path]:
    """Yield a hidden staging folder in ``out_dir``; on success move its files into ``out_dir``.

    ``tag`` (the pipeline name) keeps pipelines that share an output folder out of each other's way.

    Outputs are built there completely before any previous output is replaced; GeoPackages are
    moved last, so a GeoPackage never names a run whose pictures are not yet in place.
    """
    stage = out_dir / f".staging-{tag}-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        yield stage
        files = sorted((p for p in stage.iterdir() if p.is_file() and not _TEMP_RE.match(p.name)),
                       key=lambda p: (p.suffix == ".gpkg", p.name))
        for f in files:
            os.replace(f, out_dir / f.name)
    except OutputError as exc:  # name the output, not the hidden staging folder it was built in
        raise OutputError(str(exc).replace(str(stage), str(out_dir))) from None
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot write outputs: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


class NpyRows:
    """Rows of a 2-D ``.npy`` file read on demand with plain reads, never mapped.

    A memory map would count every page touched towards the process's resident memory; k-means
    sampling and batched assignment over a huge embedding file only need the rows they ask for.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        with path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            self.offset = f.tell()
        if fortran or len(shape) != 2:
            raise OutputError(f"{path}: expected a C-ordered 2-D array, got shape {shape}")
        self.shape: tuple[int, int] = (int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(dtype)
        self._row = self.shape[1] * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, f: Any, start: int, stop: int) -> np.ndarray:
        f.seek(self.offset + start * self._row)
        data = np.fromfile(f, dtype=self.dtype, count=(stop - start) * self.shape[1])
        return data.reshape(stop - start, self.shape[1])

    def __getitem__(self, item: slice | np.ndarray) -> np.ndarray:
        with self.path.open("rb") as f:
            if isinstance(item, slice):
                start, stop, step = item.indices(len(self))
                if step != 1:
                    raise IndexError("NpyRows supports contiguous slices only")
                return self._read(f, start, max(start, stop))
            idx = np.asarray(item, dtype=np.int64)
            out = np.empty((len(idx), self.shape[1]), dtype=self.dtype)
            order = np.argsort(idx, kind="stable")
            sidx = idx[order]
            # read runs of consecutive rows at once
            breaks = np.flatnonzero(np.diff(sidx) != 1) + 1
            for run in np.split(np.arange(len(sidx)), breaks):
                if len(run):
                    out[order[run]] = self._read(f, int(sidx[run[0]]), int(sidx[run[-1]]) + 1)
            return out
