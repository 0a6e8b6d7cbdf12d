"""Files on disk: where each artifact lives, atomic writes, the one commit point of a command, input keys.

Nothing here computes; it only stores and finds. :class:`Workspace` names every artifact and model of
a pipeline's work folder (its outputs are named by :mod:`settlements.products`). Every write goes to a
temporary file in the same folder and is renamed into place, so a killed command never leaves a
half-written artifact; a :class:`Commit` renames all of a command's files into place at one commit
point (every command that writes opens one: :func:`settlements.pipeline.door`). Every temporary name
starts with :data:`TEMP_PREFIX`, and only such names are ever removed as leftovers. Input rasters are
found (globs) and keyed by content here.

Light to import (no numpy, no pandas): the nothing-to-do check of ``settlements run`` uses it.
(The embedding cache and embedding arrays are in :mod:`settlements.embedding.cache`.)
"""

from __future__ import annotations

import errno
import glob
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
from typing import TYPE_CHECKING, Any

from . import interrupts
from .config import PipelineConfig, RasterInput
from .errors import OutputError, RasterError, StageError

if TYPE_CHECKING:
    import pandas as pd

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
    then finds on disk is exactly what any kill at that point leaves. ``step=SIGINT`` or ``step=SIGTERM``
    sends that signal instead: Ctrl-C or a service manager's stop at that very moment.
    """
    point, _, name = os.environ.get(CRASH_ENV, "").partition("=")
    if point == step:
        os.kill(os.getpid(), {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM}.get(name, signal.SIGKILL))


_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def _space_hint(folder: Path) -> str | None:
    """Why a write may have failed for lack of room: the disk is (nearly) full, or a file size limit."""
    import resource

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


def read_json_if(path: Path) -> Any:
    """The JSON in ``path``, or None where it is missing or not JSON (a cache's own record, rebuilt then)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_table(target: Path, df: pd.DataFrame) -> None:
    write_atomic(target, lambda p: df.to_parquet(p, index=False))


def read_table(path: Path, stage: str) -> pd.DataFrame:
    import pandas as pd  # imported where used: this module stays light for the nothing-to-do check

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


def fingerprint(path: Path) -> str:
    """Content key of a raster file: size, and SHA-256 of its first and last MiB.

    Cheap on huge files yet changes whenever GDAL would read different header or pixels at
    either end; a rewritten file of equal size with different middle pixels is not caught
    (documented in the README).
    """
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), 2)
            h.update(f.read(1 << 20))
    return h.hexdigest()[:32]


def expand_inputs(specs: list[RasterInput]) -> list[tuple[Path, RasterInput]]:
    """Expand glob patterns so one config entry can name several files (sorted, stable)."""
    out: list[tuple[Path, RasterInput]] = []
    for spec in specs:
        pattern = str(spec.path)
        if any(ch in pattern for ch in "*?["):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise RasterError(f"{pattern}: no raster matches this pattern")
            out.extend((Path(m), spec) for m in matches)
        else:
            out.append((Path(pattern), spec))
    return out


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
        if not pairs:  # nothing staged (nothing to do, a prune): no journal, nothing to rename
            self.discard()
            return []
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


# ------------------------------------------------------------------------------- the work folder

@dataclass(frozen=True)
class Workspace:
    """Where each stage's artifact lives for one pipeline (its work folder), and the run's own files there.

    With a ``commit`` (a run in progress), artifacts are written staged (:meth:`out`) and read back
    from there until the commit puts them, the outputs and the labels file in place together.
    """

    root: Path
    labels_file: Path | None = None
    commit: Commit | None = None

    def _at(self, name: str) -> Path:
        return self.current(self.root / name)

    # stage artifacts: tile -> rasters, tiles, regions, shares; embed -> embedded, embeddings, embed_meta;
    # cluster -> cluster_input (embeddings averaged with their neighbours'), clusters, cluster_meta, assignments
    rasters = property(lambda self: self._at("rasters.json"))
    tiles = property(lambda self: self._at("tiles.parquet"))
    regions = property(lambda self: self._at("regions.parquet"))
    shares = property(lambda self: self._at("shares.parquet"))
    embedded = property(lambda self: self._at("embedded.parquet"))
    embeddings = property(lambda self: self._at("embeddings.npy"))
    embed_meta = property(lambda self: self._at("embedding.json"))
    cluster_input = property(lambda self: self._at("cluster_input.npy"))
    clusters = property(lambda self: self._at("clusters.npz"))
    cluster_meta = property(lambda self: self._at("clusters.json"))
    assignments = property(lambda self: self._at("assignments.parquet"))
    cache = property(lambda self: self.root / "cache")
    # ``settlements train``: the models (each with the settings that made it) and the training's record,
    # committed together; the fine tuning's checkpoint is work state, written each epoch (never staged),
    # so an interrupted training resumes where it stopped
    top_model = property(lambda self: self._at("supervised/top_model.pt"))
    fine_tuned = property(lambda self: self._at("supervised/fine_tuned.pt"))
    training = property(lambda self: self._at("supervised/training.json"))
    finetune_checkpoint = property(lambda self: self.root / "supervised" / "finetune_checkpoint.pt")
    # ``settlements export-embeddings``: the files it wrote (the only ones it may write over)
    exports = property(lambda self: self._at("exports.json"))
    engines = property(lambda self: self.root / "engines")  # exported networks, gate verdicts (embedding.choice)
    # the runner's own: the lock, the commit journal, the record of the last successful run
    lock = property(lambda self: self.root / ".lock")
    journal = property(lambda self: self.root / ".settlements-commit.json")
    last_run = property(lambda self: self.root / "last_run.json")

    @property
    def labels(self) -> Path:
        """The labels YAML as this run sees it (its own staged version once it wrote one)."""
        assert self.labels_file is not None
        return self.current(self.labels_file)

    def current(self, path: Path) -> Path:
        return self.commit.current(path) if self.commit is not None else path

    def out(self, path: Path) -> Path:
        """Where this run writes ``path``: staged until the commit, or in place without one."""
        return self.commit.stage(path) if self.commit is not None else path

    def out_dir(self, folder: Path) -> Path:
        """Where this run writes files of ``folder`` under their own names: a staging folder in it until the
        commit (a QGIS project and a COG's sidecars name their neighbours), or the folder without one."""
        return self.commit.folder(folder) if self.commit is not None else folder


def workspace(cfg: PipelineConfig, commit: Commit | None = None) -> Workspace:
    """The pipeline's work folder, outside any commit (or that of ``commit``)."""
    return Workspace(cfg.work_dir, cfg.labels_path, commit)
