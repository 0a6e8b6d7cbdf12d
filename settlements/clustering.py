"""k-means on tile embeddings with FAISS, shaped like an estimator.

Training uses an explicit random sample (``sample_size``), never FAISS's silent cap of 256
points per centroid; assignment then runs over all tiles in batches. Cluster ids are ordered
by size (0 = largest) so they read the same way in every output.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import faiss
import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score
from sklearn.utils.extmath import randomized_svd

from .config import Clustering, check_k
from .progress import counted

if TYPE_CHECKING:
    from .embedding.cache import NpyRows

log = logging.getLogger(__name__)

#: Distance between two embeddings, as a share of their typical length, below which they count as the same:
#: far above rounding (float16 storage, another CPU's kernels or library version: under 0.001) and below
#: what tells real tiles apart (measured: see ``sameness``'s test and the README's *Odd inputs*).
SAME_EMBEDDING = 0.01
#: Share of the tiles with one and the same embedding above which a run warns: the tiles barely differ.
DOMINANT_SHARE = 0.9


def sameness(x: np.ndarray, k: int) -> dict[str, Any]:
    """How many distinct embeddings the rows of ``x`` hold, up to :data:`SAME_EMBEDDING` (rounding apart).

    Groups rows by leaders, in row order: each leader takes every row left within the tolerance of it.
    Rounding moves no row across a tolerance this much wider than itself, so the counts come out the same
    on every machine and with every library version, whatever k-means then makes of them. At most ``k``
    leaders are tried: ``distinct`` is None when the rows hold at least ``k`` groups; ``largest`` is the
    biggest group found (a group of most rows is found among the first leaders but by rare chance).
    """
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1)
    tol2 = float(SAME_EMBEDDING * max(float(np.median(norms)), 1e-12)) ** 2
    sq = norms.astype(np.float64) ** 2
    left = np.ones(len(x), dtype=bool)
    sizes: list[int] = []
    while left.any() and len(sizes) < k:
        lead = int(np.argmax(left))
        members = left & (sq + sq[lead] - 2.0 * (x @ x[lead]).astype(np.float64) <= tol2)  # no copy of the rows
        members[lead] = True
        left &= ~members
        sizes.append(int(members.sum()))
    return {"tiles": len(x), "distinct": None if left.any() else len(sizes), "largest": max(sizes, default=0)}


def sameness_warning(same: dict | None, k: int) -> str | None:
    """One line when the embeddings leave k-means nothing real to split: all alike, fewer distinct than k,
    or nearly all one. Worded from the embeddings alone, so it reads the same wherever the run ran."""
    if not same or not same["tiles"]:
        return None
    n, distinct = same["tiles"], same["distinct"]
    check = "the tiles barely differ to the CNN (check rasters.scaling and look at atlas.png)"
    if distinct == 1:
        return f"clusters: all {n} tiles have the same embedding (within {SAME_EMBEDDING:.0%}); {check}"
    if distinct is not None and distinct < k:
        return (f"clusters: the {n} tiles have only {distinct} distinct embeddings (within {SAME_EMBEDDING:.0%}) "
                f"for k={k}: clusters beyond those split identical tiles; {check}, or lower clustering.k")
    if same["largest"] > DOMINANT_SHARE * n:
        return (f"clusters: {same['largest'] / n:.0%} of the {n} tiles have the same embedding "
                f"(within {SAME_EMBEDDING:.0%}); {check}")
    return None


def cluster_warnings(same: dict | None, restarts: dict | None, k: int) -> list[str]:
    """Signs of clusters not to trust: embeddings with little to split, else restarts that disagree (on
    embeddings alike they always do, and say nothing more)."""
    found = sameness_warning(same, k)
    return [found] if found else [w for w in [restart_warning(restarts)] if w]


#: Mean agreement (ARI) of the k-means restarts with the kept one below which a run warns: k-means then
#: finds no partition it comes back to. Measured with 10 restarts on L2-normalised embeddings: Gaussian
#: noise 0.02-0.2; one cluster of Olinda split again in 8, 0.24-0.32; the shipped scenes at their k,
#: seeds 0-4, 0.40-0.50 (Kampala, Bangalore: maps of two seeds agree ARI 0.35-0.78) and 0.57-0.68
#: (Olinda, Swellendam: maps 0.66-0.96); with the neighbours (seed 0) 0.43-0.84.
RESTART_AGREEMENT = 0.3


def restart_warning(agreement: dict | None) -> str | None:
    """One line when the k-means restarts disagree: the map then depends on one initialisation."""
    if not agreement or agreement["mean"] >= RESTART_AGREEMENT:
        return None
    return (f"clusters: the {agreement['restarts']} k-means restarts agree little (mean ARI {agreement['mean']:.2f} "
            f"with the kept one, below {RESTART_AGREEMENT:.2f}); another seed would draw other clusters: a lower "
            "clustering.k gives steadier ones")


#: FAISS seeds restart ``r`` of a ``nredo`` fit with ``seed + r * 15486557`` (``Clustering::train``).
_REDO_SEED_STEP = 15486557

#: Rows a PCA basis is fitted on (``pca_dim``): plenty for a few dozen leading components.
PCA_SAMPLE = 4096


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


#: The config's defaults (``clustering:``), the only place they are written.
_DEFAULTS = Clustering()


class KMeansClusterer:
    """Seeded FAISS k-means with optional L2-normalisation and PCA before clustering."""

    # learned state, set by fit or load
    cluster_centers_: np.ndarray
    components_: np.ndarray | None
    mean_: np.ndarray
    n_train_: int
    on_gpu_: bool
    restart_agreement_: dict[str, Any] | None
    sameness_: dict[str, Any]

    def __init__(self, k: int = _DEFAULTS.k, seed: int = _DEFAULTS.seed, sample_size: int = _DEFAULTS.sample_size,
                 niter: int = _DEFAULTS.niter, nredo: int = 1, pca_dim: int | None = _DEFAULTS.pca_dim,
                 l2_normalize: bool = False, use_gpu: bool | None = None) -> None:
        """The estimator alone is one plain k-means run (``nredo`` 1, no L2-normalisation); a pipeline's
        ``clustering:`` section (:meth:`from_settings`) brings the restarts and normalisation measured for maps."""
        self.k = k
        self.seed = seed
        self.sample_size = sample_size
        self.niter = niter
        self.nredo = nredo
        self.pca_dim = pca_dim
        self.l2_normalize = l2_normalize
        self.use_gpu = use_gpu

    @classmethod
    def from_settings(cls, c: Clustering, pca: bool = True) -> KMeansClusterer:
        """The estimator a pipeline's ``clustering:`` section describes (``pca`` False: without its PCA)."""
        return cls(k=c.k, seed=c.seed, sample_size=c.sample_size, niter=c.niter, nredo=c.nredo,
                   pca_dim=c.pca_dim if pca else None, l2_normalize=c.l2_normalize)

    # learned state: mean_, components_ (PCA), cluster_centers_, n_train_, on_gpu_, restart_agreement_, sameness_
    def _transform(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.l2_normalize:
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        if (components := getattr(self, "components_", None)) is not None:
            x = x @ components.T - self.mean_ @ components.T  # no centred copy of x
        return np.ascontiguousarray(x, dtype=np.float32)

    def fit(self, x: np.ndarray | NpyRows, order: np.ndarray | None = None) -> KMeansClusterer:
        """Fit on a seeded sample of the rows of ``x``.

        ``order``: the rows in a canonical order (e.g. by ground position). The sample and FAISS's
        initial centroids follow row order, so the same tiles stored in another order (many files
        or one mosaic) give the same fit only when both runs pass their canonical order.
        """
        n = len(x)
        check_k(self.k, n, "valid tiles")
        rng = np.random.default_rng(self.seed)
        take = min(self.sample_size, n)
        picked = np.sort(rng.choice(n, size=take, replace=False)) if take < n else None
        if order is not None:
            if len(order) != n:
                raise ValueError(f"order has {len(order)} rows for {n} embeddings")
            picked = np.asarray(order)[picked] if picked is not None else np.asarray(order)
        # all rows in stored order: a view of an array (no copy of what may be gigabytes); else the picked rows
        sample = np.asarray(x[:] if picked is None else x[picked], dtype=np.float32)
        self.components_ = None
        if self.l2_normalize:
            sample = sample / np.maximum(np.linalg.norm(sample, axis=1, keepdims=True), 1e-12)
        self.sameness_ = sameness(sample, self.k)  # what k-means is given, before any PCA
        if self.pca_dim is not None and self.pca_dim < sample.shape[1]:
            # the leading components need few rows: randomized SVD on an explicit sample of the sample
            rows = sample if len(sample) <= PCA_SAMPLE else sample[np.sort(rng.choice(len(sample), PCA_SAMPLE,
                                                                                     replace=False))]
            self.mean_ = rows.mean(axis=0).astype(np.float32)
            _, _, vt = randomized_svd(rows - self.mean_, self.pca_dim, n_iter=4, random_state=self.seed)
            self.components_ = np.ascontiguousarray(vt, dtype=np.float32)
            sample = sample @ self.components_.T - self.mean_ @ self.components_.T
        sample = np.ascontiguousarray(sample, dtype=np.float32)
        gpu = gpu_available() if self.use_gpu is None else self.use_gpu
        centroids, lab, self.restart_agreement_ = self._restarts(sample, take, gpu)
        counts = np.bincount(lab, minlength=self.k)
        order = np.argsort(-counts, kind="stable")
        self.cluster_centers_ = np.ascontiguousarray(centroids[order], dtype=np.float32)
        self.n_train_ = take
        self.on_gpu_ = bool(gpu)
        log.info("k-means: k=%d on %d of %d tiles (%s)%s", self.k, take, n, "GPU" if gpu else "CPU",
                 "" if self.restart_agreement_ is None else
                 ", restarts agree ARI min {min:.3f}, mean {mean:.3f}".format(**self.restart_agreement_))
        return self

    def _restarts(self, sample: np.ndarray, take: int, gpu: bool) -> tuple[np.ndarray, np.ndarray, dict | None]:
        """``nredo`` k-means runs, the one of least inertia kept, as FAISS's own ``nredo`` does.

        Run one by one, with the seeds FAISS gives its restarts (so the same centroids), to keep
        each restart's partition of the sample: their agreement (ARI) with the kept one says how
        much the map depends on the initialisation. ``None`` for a single run.
        """
        runs = []
        for redo in counted(range(self.nredo), "k-means", "restart"):
            km = faiss.Kmeans(
                sample.shape[1], self.k, niter=self.niter, nredo=1, seed=(self.seed + redo * _REDO_SEED_STEP) % 2**31,
                gpu=gpu, max_points_per_centroid=math.ceil(take / self.k) + 1, min_points_per_centroid=1,
                verbose=False,
            )
            km.train(sample)
            _, lab = km.index.search(sample, 1)
            inertia = float(cast(np.ndarray, km.obj)[-1])
            runs.append((inertia, np.array(km.centroids), lab[:, 0].astype(np.min_scalar_type(self.k))))
        best = min(range(len(runs)), key=lambda i: runs[i][0])  # the first of equal inertia, like FAISS
        agreement = None
        if len(runs) > 1:
            aris = [adjusted_rand_score(runs[best][2], lab) for i, (_, _, lab) in enumerate(runs) if i != best]
            agreement = {"restarts": len(runs), "min": float(np.min(aris)), "mean": float(np.mean(aris))}
        return runs[best][1], runs[best][2], agreement

    def predict(self, x: np.ndarray | NpyRows, batch_size: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """Nearest centroid and Euclidean distance to it, for every row, in batches."""
        index = faiss.IndexFlatL2(self.cluster_centers_.shape[1])
        index.add(self.cluster_centers_)
        labels = np.empty(len(x), dtype=np.int32)
        dist = np.empty(len(x), dtype=np.float32)
        for s in range(0, len(x), batch_size):
            d, i = index.search(self._transform(x[s: s + batch_size]), 1)
            labels[s: s + batch_size] = i[:, 0]
            dist[s: s + batch_size] = np.sqrt(np.maximum(d[:, 0], 0))
        return labels, dist

    def input_space_centers(self) -> np.ndarray:
        """Centroids in the space of the embeddings (after L2-normalisation, before PCA).

        Two fits with PCA project onto different bases, so centroids are compared here.
        """
        c = np.asarray(self.cluster_centers_, dtype=np.float32)
        if (components := getattr(self, "components_", None)) is not None:
            c = self.mean_ + c @ components
        return c

    def reorder(self, ids: np.ndarray) -> KMeansClusterer:
        """Renumber clusters: centroid ``i`` becomes cluster ``ids[i]`` (a permutation of 0..k-1)."""
        order = np.empty(len(ids), dtype=np.int64)
        order[np.asarray(ids)] = np.arange(len(ids))
        self.cluster_centers_ = np.ascontiguousarray(self.cluster_centers_[order])
        return self

    def save(self, path: Path) -> None:
        from .store import write_atomic

        arrays: dict[str, Any] = {"cluster_centers": self.cluster_centers_, "k": np.int64(self.k),
                                  "seed": np.int64(self.seed), "l2_normalize": np.bool_(self.l2_normalize)}
        if self.components_ is not None:
            arrays.update(mean=self.mean_, components=self.components_)

        def _w(p: Path) -> None:
            with p.open("wb") as f:
                np.savez(f, **arrays)

        write_atomic(path, _w)

    @classmethod
    def load(cls, path: Path) -> KMeansClusterer:
        with np.load(path) as z:
            obj = cls(k=int(z["k"]), seed=int(z["seed"]), l2_normalize=bool(z["l2_normalize"]))
            obj.cluster_centers_ = z["cluster_centers"]
            obj.components_ = z["components"] if "components" in z else None
            if obj.components_ is not None:
                obj.mean_ = z["mean"]
                obj.pca_dim = obj.components_.shape[0]
        return obj


@dataclass(frozen=True)
class CentroidMatch:
    """How refitted clusters relate to the previous ones.

    ``ids[i]`` is the id given to new centroid ``i``. ``kept`` maps ids that still mean the same
    cluster (old id == new id); ``new`` lists ids of clusters with no previous counterpart;
    ``gone`` lists old ids whose cluster has no counterpart now.
    """

    ids: np.ndarray
    kept: list[int]
    new: list[int]
    gone: list[int]
    distance: dict[int, float]


def match_centroids(old: np.ndarray, new: np.ndarray) -> CentroidMatch:
    """Pair new centroids with old ones by the Hungarian assignment on Euclidean centroid distance.

    A pair keeps the old id (and so the analyst's name) only when the two centroids are each
    other's nearest neighbour: the assignment alone always pairs everything, even a cluster that
    appeared with one that vanished. Unpaired new clusters take the free ids in size order.
    """
    k_new, k_old = len(new), len(old)
    d = np.sqrt(np.maximum(((new[:, None, :].astype(np.float64) - old[None, :, :]) ** 2).sum(-1), 0))
    rows, cols = linear_sum_assignment(d)
    nearest_old, nearest_new = d.argmin(axis=1), d.argmin(axis=0)
    ids = np.full(k_new, -1, dtype=np.int64)
    distance: dict[int, float] = {}
    for r, c in zip(rows, cols, strict=True):
        if nearest_old[r] == c and nearest_new[c] == r and c < k_new:
            ids[r] = c
            distance[int(c)] = float(d[r, c])
    kept = sorted(int(i) for i in ids[ids >= 0])
    free = iter(sorted(set(range(k_new)) - set(kept)))
    new_ids = []
    for r in range(k_new):
        if ids[r] < 0:
            ids[r] = next(free)
            new_ids.append(int(ids[r]))
    gone = sorted(set(range(k_old)) - set(kept))
    return CentroidMatch(ids=ids, kept=kept, new=sorted(new_ids), gone=gone, distance=distance)
