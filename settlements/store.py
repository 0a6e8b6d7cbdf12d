"""Artifacts on disk: atomic writes, tables, embedding arrays, the embedding cache.

Nothing here computes; it only stores and finds. Every write goes to a temporary file in the
same folder and is renamed into place, so a killed run never leaves a half-written artifact; a
:class:`Commit` renames a whole run's files into place at one commit point. Every temporary name
starts with :data:`TEMP_PREFIX`, and only such names are ever removed as leftovers.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import interrupts
from .errors import OutputError, StageError

# The 8 integers that identify a tile's pixels in a raster: tile window and stride cell window.
WINDOW_COLUMNS = ["tile_col", "tile_row", "tile_w", "tile_h", "cell_col", "cell_row", "cell_w", "cell_h"]

#: Every temporary file and folder this project makes starts with this; nothing else is ever removed
#: as a leftover (a user's ``.env.settings.json`` or ``.draft.chapter1.md`` stays).
TEMP_PREFIX = ".settlements-tmp-"

#: Test hook: a process whose environment names a step of :meth:`Commit.commit` here SIGKILLs itself there.
CRASH_ENV = "SETTLEMENTS_CRASH_AT"


def is_temp(path: Path) -> bool:
    return path.name.startswith(TEMP_PREFIX)


def crash_point(step: str) -> None:
    """Fault injection for the crash-safety tests: a real SIGKILL of this process at ``step``.

    Only when the environment variable ``SETTLEMENTS_CRASH_AT`` names the step; what the next run
    then finds on disk is exactly what any kill at that point leaves.
    """
    if os.environ.get(CRASH_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


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
        # the target's name ends the temporary one: drivers that go by the extension see the right one
        end = f".{target.name}" + ("" if suffix is None or target.name.endswith(suffix) else suffix)
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=end, dir=target.parent)
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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
        interrupts.check()  # a signal whose raise was swallowed stops the run here, between chunks
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
                trash = shard.with_name(f"{TEMP_PREFIX}trash-{shard.name}")
                os.replace(shard, trash)
                shutil.rmtree(trash, ignore_errors=True)
        if self.root.exists():
            for trash in self.root.glob(f"{TEMP_PREFIX}trash-*"):
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


def stale_temps(folder: Path, name_end: str = "") -> list[Path]:
    """Temporary files and folders a killed run left in ``folder`` (only names with :data:`TEMP_PREFIX`,
    ending with ``name_end``). Call only while holding the pipeline's lock."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if is_temp(p) and p.name.endswith(name_end))


def remove_stale_temps(*folders: Path, name_end: str = "", subfolders: bool = True) -> int:
    """Delete what :func:`stale_temps` finds in each folder (and one level of its subfolders); count them."""
    n = 0
    for folder in folders:
        if not folder.is_dir():
            continue
        subs = [p for p in folder.iterdir() if p.is_dir() and not is_temp(p)] if subfolders else []
        for sub in [folder, *subs]:
            for tmp in stale_temps(sub, name_end):
                if tmp.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    tmp.unlink(missing_ok=True)
                n += 1
    return n


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver them: a commit is never cut short by
    them (a SIGKILL is what the journal is for). Only the main thread can change signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    old = {s: signal.signal(s, lambda signum, _frame: held.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        if held:
            signal.raise_signal(held[0])


def _write_journal(journal: Path, renames: list[tuple[Path, Path]]) -> None:
    base = journal.parent
    body = json.dumps({"renames": [[os.path.relpath(s, base), os.path.relpath(t, base)] for s, t in renames]})

    def _w(p: Path) -> None:
        with p.open("w", encoding="utf-8") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())

    write_atomic(journal, _w)


class Commit:
    """A run's files built beside their final places and renamed into place together, at one commit point.

    :meth:`stage` gives a temporary name beside a file (same folder, so the rename is atomic);
    :meth:`folder` a staging folder whose files keep their final names (a QGIS project names its
    GeoPackage). :meth:`commit` first writes ``journal`` (atomically), the list of renames, then
    renames, then deletes the journal. A process killed between renames leaves the journal, and
    :func:`finish_commit`, run by whoever next takes the pipeline's lock, completes them: readers
    after that see every new file, and a run killed before the journal leaves every old one.
    Used as a context manager it commits when the block succeeds and removes what it staged when not.
    """

    def __init__(self, journal: Path) -> None:
        self.journal = journal
        self.token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._entries: list[tuple[Path, Path]] = []  # (staged file or staging folder, final file or folder)
        self._guards: list[tuple[Path, Callable[[], bool], str]] = []

    def __enter__(self) -> Commit:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if kind is not None:
            self.discard()
            return
        try:
            self.commit()
        except BaseException:
            if not self.journal.exists():  # nothing renamed: what was staged is garbage
                self.discard()
            raise

    def stage(self, target: Path) -> Path:
        """The staged path of ``target`` (write there; it replaces ``target`` at the commit)."""
        for staged, final in self._entries:
            if target in (staged, final) and not staged.is_dir():
                return staged
        staged = target.with_name(f"{TEMP_PREFIX}{self.token}.{target.name}")
        self._entries.append((staged, target))
        return staged

    def current(self, target: Path) -> Path:
        """Where ``target``'s content is now for this run: its staged version once written, else ``target``."""
        for staged, final in self._entries:
            if staged.is_dir():
                if final == target.parent and (staged / target.name).is_file():
                    return staged / target.name
            elif final == target and staged.is_file():
                return staged
        return target

    def staged(self, target: Path) -> bool:
        return self.current(target) != target

    def folder(self, final_dir: Path) -> Path:
        """A staging folder in ``final_dir``; its files move into ``final_dir`` under their own names."""
        for staged, final in self._entries:
            if final == final_dir and staged.is_dir():
                return staged
        staged = final_dir / f"{TEMP_PREFIX}{self.token}"
        staged.mkdir(parents=True, exist_ok=True)
        self._entries.append((staged, final_dir))
        return staged

    def guard(self, check: Callable[[], bool], path: Path, problem: str) -> None:
        """Refuse to commit unless ``check()`` still holds then (e.g. a file nobody edited meanwhile)."""
        self._guards.append((path, check, problem))

    def renames(self) -> list[tuple[Path, Path]]:
        """Every (staged, final) file pair, in order; a staging folder's GeoPackages last."""
        pairs: list[tuple[Path, Path]] = []
        for staged, final in self._entries:
            if staged.is_dir():
                files = sorted((p for p in staged.iterdir() if p.is_file() and not is_temp(p)),
                               key=lambda p: (p.suffix == ".gpkg", p.name))
                pairs += [(f, final / f.name) for f in files]
            elif staged.is_file():
                pairs.append((staged, final))
        return pairs

    def commit(self) -> list[Path]:
        """Rename every staged file into place (see the class); return the final paths."""
        interrupts.check()  # an interrupted run commits nothing, even if the signal's raise was swallowed
        for path, check, problem in self._guards:
            if not check():
                raise OutputError(f"{path}: {problem}")
        pairs = self.renames()
        crash_point("commit:staged")
        try:
            with signals_deferred():
                _write_journal(self.journal, pairs)
                crash_point("commit:journal")
                for i, (staged, final) in enumerate(pairs, 1):
                    os.replace(staged, final)
                    crash_point(f"commit:rename:{i}")
                self.journal.unlink()
        except OSError as exc:  # the journal could not be written: nothing was renamed
            if self.journal.exists():
                raise
            raise OutputError(f"{self.journal.parent}: cannot commit outputs: {exc.strerror or exc}") from None
        self.discard()  # the emptied staging folders
        return [final for _, final in pairs]

    def discard(self) -> None:
        """Remove everything staged (after a failure, or the emptied folders after the commit)."""
        for staged, _ in self._entries:
            if staged.is_dir():
                shutil.rmtree(staged, ignore_errors=True)
            else:
                _remove_quietly(staged)


def finish_commit(journal: Path) -> int:
    """Complete the renames of a commit whose process was killed half-way; return how many were left.

    Idempotent (a rename already done is skipped), so a kill during this is finished by the next call.
    Only names with :data:`TEMP_PREFIX` (or inside such a folder) are ever moved. Hold the pipeline's lock.
    """
    if not journal.exists():
        return 0
    try:
        pairs = [(journal.parent / s, journal.parent / t) for s, t in json.loads(journal.read_text())["renames"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OutputError(f"{journal}: unreadable commit journal ({exc}); the outputs beside it may mix two runs: "
                          "delete it and run again with --force") from None
    n = 0
    with signals_deferred():
        for staged, final in pairs:
            if (is_temp(staged) or is_temp(staged.parent)) and staged.is_file():
                os.replace(staged, final)
                n += 1
        for folder in {s.parent for s, _ in pairs if is_temp(s.parent)}:
            shutil.rmtree(folder, ignore_errors=True)
        journal.unlink()
    return n


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
