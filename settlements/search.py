"""Similarity search over a run's stored embeddings: exact, or a FAISS IVF index built once and cached.

Tiles are compared as *centred unit vectors*: each embedding minus the mean embedding of the run,
scaled to length 1, so the score of two tiles is the cosine of their deviations from the typical
tile. Raw CNN features (after ReLU and pooling) all share a large common part, which makes every
pair of tiles look alike by raw cosine; centring removes it (the ``Must show`` figures of issue 17).

Every query is one vector in that space (the examples' mean direction, or the weights of a linear
model), so a score is one inner product. *Exact* search streams ``embeddings.npy`` block by block
(a matrix-vector product per block: bounded memory, every tile scored). An *index* (FAISS IVF with
8-bit scalar quantisation, a quarter of the embeddings' size) finds the best candidates of a large
run without reading them all; candidates are then re-scored exactly from their rows. The mean and
the index live in ``work/<name>/search/``, keyed by what the embeddings are (cache keys, the tiles
they belong to), and are rebuilt when those change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .embedding.cache import NpyRows
from .progress import counted
from .store import atomic_path, write_json

if TYPE_CHECKING:
    from .store import Workspace

log = logging.getLogger(__name__)

#: Rows per block read from ``embeddings.npy`` (8192 x 1280 float32 = 40 MB).
BLOCK_ROWS = 8192
#: IVF lists per square root of the tile count, and rows the coarse quantiser trains on per list.
IVF_LISTS_PER_SQRT = 4
IVF_TRAIN_PER_LIST = 64
#: Candidates an index search fetches per tile wanted; their exact scores pick the best.
REFINE_FACTOR = 4


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def embeddings_identity(ws: Workspace) -> str:
    """What the embeddings are: the cache keys of their rasters (content, preprocessing, model) and the
    table of which tile each row is; a new run with the same of both has the same vectors in the same rows."""
    info = json.loads(ws.embed_meta.read_text())
    h = hashlib.sha256(json.dumps({k: info.get(k) for k in ("keys", "backbone", "layer", "dim", "weights_sha256",
                                                             "precision")}, sort_keys=True).encode())
    h.update(ws.embedded.read_bytes())
    h.update(str(ws.embeddings.stat().st_size).encode())
    return h.hexdigest()[:32]


@dataclass
class Space:
    """The centred unit-vector space of one run's embeddings: its mean, and where its index would live."""

    rows: NpyRows
    mean: np.ndarray
    identity: str
    folder: Path

    def transform(self, x: np.ndarray) -> np.ndarray:
        return unit(np.asarray(x, dtype=np.float32) - self.mean).astype(np.float32)

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """Rows of ``embeddings.npy`` in the space."""
        return self.transform(self.rows[np.asarray(rows, dtype=np.int64)])

    def blocks(self, desc: str) -> Iterator[tuple[int, int]]:
        """(start, stop) of each block of rows, with a progress bar on large runs."""
        n = len(self.rows)
        starts = range(0, n, BLOCK_ROWS)
        for s in starts if n <= 4 * BLOCK_ROWS else counted(starts, desc, "block"):
            yield s, min(s + BLOCK_ROWS, n)


def search_space(ws: Workspace) -> Space:
    """The run's space; the mean comes from ``search/space.json`` when it belongs to these embeddings."""
    folder = ws.root / "search"
    identity = embeddings_identity(ws)
    rows = NpyRows(ws.embeddings)
    meta = folder / "space.json"
    if meta.exists():
        try:
            saved = json.loads(meta.read_text())
            if saved.get("identity") == identity and len(saved.get("mean", [])) == rows.shape[1]:
                return Space(rows, np.asarray(saved["mean"], dtype=np.float32), identity, folder)
        except (OSError, ValueError):
            pass
    space = Space(rows, mean_embedding(rows), identity, folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(meta, {"identity": identity, "n": len(rows), "mean": space.mean.tolist()})
    return space


def mean_embedding(rows: NpyRows) -> np.ndarray:
    """The mean row, summed block by block in float64."""
    total = np.zeros(rows.shape[1], dtype=np.float64)
    for s in range(0, len(rows), BLOCK_ROWS):
        total += rows[s:s + BLOCK_ROWS].sum(axis=0, dtype=np.float64)
    return (total / max(len(rows), 1)).astype(np.float32)


def exact_scores(space: Space, query: np.ndarray) -> np.ndarray:
    """Every tile's inner product with ``query`` (a vector of the space), streamed block by block; for
    several query vectors (rows), each tile's largest."""
    out = np.empty(len(space.rows), dtype=np.float32)
    q = np.asarray(query, dtype=np.float32)
    for s, e in space.blocks("scoring"):
        ip = space.transform(space.rows[s:e]) @ q.T
        out[s:e] = ip if ip.ndim == 1 else ip.max(axis=1)
    return out


class Index:
    """A FAISS IVF index (8-bit scalar quantiser, inner product) of a space, cached in its folder."""

    def __init__(self, space: Space, nprobe: int) -> None:
        import faiss

        self.space = space
        path, meta = space.folder / "index.faiss", space.folder / "index.json"
        n, d = space.rows.shape
        nlist = max(1, min(int(IVF_LISTS_PER_SQRT * math.sqrt(n)), n // 39 or 1))
        self.built = False
        if meta.exists() and path.exists():
            try:
                saved = json.loads(meta.read_text())
                if saved.get("identity") == space.identity and saved.get("nlist") == nlist:
                    self.index = faiss.read_index(str(path))
                    faiss.extract_index_ivf(self.index).nprobe = min(nprobe, nlist)
                    return
            except (OSError, ValueError, RuntimeError):
                pass
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit,
                                              faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        sample = np.sort(rng.choice(n, size=min(n, nlist * IVF_TRAIN_PER_LIST), replace=False))
        index.train(space.vectors(sample))
        for s, e in space.blocks("indexing"):
            index.add(space.transform(space.rows[s:e]))
        with atomic_path(path, suffix=".faiss") as tmp:
            faiss.write_index(index, str(tmp))
        write_json(meta, {"identity": space.identity, "nlist": nlist, "n": n, "kind": "IVF,SQ8"})
        index.nprobe = min(nprobe, nlist)
        self.index, self.built = index, True

    def top(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Embedding rows of the ``k`` best candidates and their exact scores, best first (several query
        vectors: each one's ``k`` best, scored by the largest product)."""
        q = np.atleast_2d(np.asarray(query, dtype=np.float32))
        _, found = self.index.search(q, REFINE_FACTOR * k)  # quantised scores reorder the edge: refine exactly
        rows, scores = _rescored(self.space, found[found >= 0], query)
        return rows[:k], scores[:k]

    def above(self, query: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """Embedding rows whose score is at least ``threshold`` (as the index sees them), exact scores."""
        lims, _, found = self.index.range_search(np.asarray(query, dtype=np.float32)[None, :],
                                                 float(threshold) - 1e-3)  # quantised scores err both ways
        rows, scores = _rescored(self.space, found[lims[0]:lims[1]], query)
        keep = scores >= threshold
        return rows[keep], scores[keep]


def _rescored(space: Space, rows: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    scores = np.empty(0, np.float32)
    if len(rows):
        ip = space.vectors(rows) @ np.asarray(query, dtype=np.float32).T
        scores = ip if ip.ndim == 1 else ip.max(axis=1)
    order = np.argsort(-scores, kind="stable")
    return rows[order], scores[order]
