"""The embedding cache and embedding arrays on disk.

Embeddings are cached per raster content and settings (a *shard*), in chunk files written as tiles
are embedded, so a killed run resumes from its last chunk and a rerun embeds only new tiles.
:class:`NpyRows` reads rows of an assembled ``embeddings.npy`` on demand.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import interrupts
from ..errors import OutputError
from ..store import TEMP_PREFIX, stale_temps, write_atomic
from ..tiling import WINDOW_COLUMNS


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
