"""Where the per-block work runs: in this process, or on a Dask cluster.

The work is cut into blocks of consecutive tiles of one raster (row-major, so bands of tile rows)
whose length is a multiple of the batch size, so every executor embeds the same batches and gives
the same embeddings. Workers write their blocks straight into the embedding cache (a folder every
worker must see), load the model once per worker process, and k-means assignment runs over row
blocks of the assembled embedding file.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .clustering import KMeansClusterer
from .embedding.backbones import Backbone, build_backbone
from .embedding.infer import InferenceSettings, TileBlocks, iter_embeddings
from .errors import SettlementsError, WeightsError
from .rasters import RasterInfo
from .store import EmbeddingCache, NpyRows

log = logging.getLogger(__name__)

#: Tiles written to the cache per chunk file (a killed run resumes from the last chunk).
CHUNK_TILES = 2048


@dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to build the same model: names, and the weights' hash to check."""

    name: str
    layer: str
    weights_path: str
    weights_sha256: str
    dim: int


@dataclass(frozen=True)
class EmbedJob:
    """Tiles of one raster to embed: ``windows`` rows are the 8 window columns (tile, then cell)."""

    key: str
    info: RasterInfo
    windows: np.ndarray
    input_size: int
    min_valid: float


def spec_of(backbone: Backbone) -> ModelSpec:
    return ModelSpec(backbone.name, backbone.layer, str(backbone.weights.path), backbone.weights.sha256,
                     backbone.dim)


def split_job(job: EmbedJob, block_tiles: int, batch_size: int) -> list[EmbedJob]:
    """Blocks of ``block_tiles`` rounded up to whole batches, so batches match the unsplit job."""
    step = max(1, -(-block_tiles // batch_size)) * batch_size
    return [replace(job, windows=job.windows[s: s + step]) for s in range(0, len(job.windows), step)]


def embed_job(job: EmbedJob, model: Any, settings: InferenceSettings, cache: EmbeddingCache, dim: int,
              progress: object | None = None) -> int:
    """Embed one job's tiles and append them to the cache in chunks; return the number of tiles."""
    ds = TileBlocks(job.info, job.windows[:, :4], job.windows[:, 4:], job.input_size, settings.batch_size)
    buf: list[tuple[np.ndarray, ...]] = []
    buffered = 0

    def flush() -> None:
        cache.append(job.key, *(np.concatenate(x) for x in zip(*buf, strict=True)))

    for chunk in iter_embeddings(model, ds, settings, job.min_valid, progress):
        emb = np.full((len(chunk.index), dim), np.nan, dtype=np.float32)
        if chunk.kept.any():  # a batch of skipped tiles (all nodata) has no embeddings at all
            emb[chunk.kept] = chunk.embeddings
        buf.append((job.windows[chunk.index], chunk.valid_tile, chunk.valid_cell, emb))
        buffered += len(chunk.index)
        if buffered >= CHUNK_TILES:
            flush()
            buf, buffered = [], 0
    if buf:
        flush()
    return len(job.windows)


def assign_rows(model: KMeansClusterer, path: str | Path, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid and distance for rows [start, stop) of an embedding file."""
    return model.predict(NpyRows(Path(path))[start:stop])


class Executor(Protocol):
    def embed(self, jobs: list[EmbedJob], backbone: Backbone, settings: InferenceSettings,
              cache: EmbeddingCache, progress: object | None) -> int: ...

    def assign(self, model: KMeansClusterer, path: Path) -> tuple[np.ndarray, np.ndarray]: ...

    def close(self) -> None: ...


class LocalExecutor:
    """This process: a DataLoader per raster reads blocks while the CNN runs."""

    name = "local"

    def embed(self, jobs: list[EmbedJob], backbone: Backbone, settings: InferenceSettings,
              cache: EmbeddingCache, progress: object | None) -> int:
        return sum(embed_job(j, backbone.model, settings, cache, backbone.dim, progress) for j in jobs)

    def assign(self, model: KMeansClusterer, path: Path) -> tuple[np.ndarray, np.ndarray]:
        return model.predict(NpyRows(path))

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------- dask side

_WORKER_MODELS: dict[ModelSpec, Any] = {}
_WORKER_LOCK = threading.Lock()


def worker_model(spec: ModelSpec) -> Any:
    """The model for ``spec``, built once per worker process and shared by its threads."""
    with _WORKER_LOCK:
        if spec not in _WORKER_MODELS:
            path = Path(spec.weights_path)
            backbone = build_backbone(spec.name, spec.layer, path if path.is_file() else None,
                                      allow_download=False)
            if backbone.weights.sha256 != spec.weights_sha256:
                raise WeightsError(f"{backbone.weights.path}: weights on this worker differ from the "
                                   f"client's (sha256 {backbone.weights.sha256[:12]} != {spec.weights_sha256[:12]})")
            _WORKER_MODELS[spec] = backbone.model
            log.info("worker built %s (%s)", spec.name, spec.layer)
        return _WORKER_MODELS[spec]


def _embed_on_worker(job: EmbedJob, spec: ModelSpec, settings: InferenceSettings, cache_root: str) -> int:
    # no DataLoader processes inside a (daemonic) Dask worker: its threads overlap reading and compute
    return embed_job(job, worker_model(spec), replace(settings, num_workers=0), EmbeddingCache(Path(cache_root)),
                     spec.dim)


class DaskExecutor:
    """A Dask cluster: ``scheduler`` is a ``tcp://host:port`` address, or None for a LocalCluster."""

    name = "dask"

    def __init__(self, scheduler: str | None = None, n_workers: int | None = None, threads_per_worker: int = 1,
                 block_tiles: int = 1024, assign_rows_per_task: int = 65536) -> None:
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise SettlementsError("--executor dask needs dask and distributed: pip install 'settlements[dask]'") \
                from None
        self.block_tiles = block_tiles
        self.assign_rows_per_task = assign_rows_per_task
        self._cluster = None
        if scheduler:
            try:
                self.client = Client(scheduler, timeout="30s")
            except OSError as exc:
                raise SettlementsError(f"--scheduler: cannot reach Dask scheduler {scheduler}: {exc}") from None
        else:
            self._cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker,
                                         processes=True, dashboard_address=None)
            self.client = Client(self._cluster)
        log.info("dask: %s", self.client)

    def _run(self, fn: Callable[..., Any], items: list[Any], *args: Any) -> Iterator[Any]:
        """Results of ``fn(item, *args)`` as they complete."""
        from distributed import as_completed

        futures = self.client.map(fn, items, *[[a] * len(items) for a in args], pure=False)
        for fut in as_completed(futures):
            yield fut.result()

    def embed(self, jobs: list[EmbedJob], backbone: Backbone, settings: InferenceSettings,
              cache: EmbeddingCache, progress: object | None) -> int:
        blocks = [b for j in jobs for b in split_job(j, self.block_tiles, settings.batch_size)]
        if not blocks:
            return 0
        spec = spec_of(backbone)
        total = 0
        for n in self._run(_embed_on_worker, blocks, spec, settings, str(cache.root.resolve())):
            total += n
            if progress is not None:
                progress.update(n)  # type: ignore[attr-defined]
        return total

    def assign(self, model: KMeansClusterer, path: Path) -> tuple[np.ndarray, np.ndarray]:
        n = len(NpyRows(path))
        bounds = [(s, min(s + self.assign_rows_per_task, n)) for s in range(0, n, self.assign_rows_per_task)]
        labels = np.empty(n, dtype=np.int32)
        dist = np.empty(n, dtype=np.float32)
        [shared] = self.client.scatter([model], broadcast=True)
        starts = [s for s, _ in bounds]
        stops = [e for _, e in bounds]
        futures = self.client.map(assign_rows, [shared] * len(bounds), [str(path.resolve())] * len(bounds), starts,
                                  stops, pure=False)
        for (s, e), fut in zip(bounds, futures, strict=True):
            lab, d = fut.result()
            labels[s:e], dist[s:e] = lab, d
        return labels, dist

    def close(self) -> None:
        self.client.close()
        if self._cluster is not None:
            self._cluster.close()


EXECUTORS = ("local", "dask")


def check_executor(name: str, scheduler: str | None = None) -> None:
    """Reject a bad executor choice before any work starts."""
    if name not in EXECUTORS:
        raise SettlementsError(f"--executor: unknown executor {name!r} (choose from: {', '.join(EXECUTORS)})")
    if scheduler and name != "dask":
        raise SettlementsError("--scheduler: only used with --executor dask")


def make_executor(name: str = "local", scheduler: str | None = None, n_workers: int | None = None,
                  block_tiles: int = 1024) -> LocalExecutor | DaskExecutor:
    check_executor(name, scheduler)
    if name == "dask":
        return DaskExecutor(scheduler, n_workers=n_workers, block_tiles=block_tiles)
    return LocalExecutor()
