"""Where the per-block work runs: in this process, or on a Dask cluster.

Embedding is one stream of tiles over every raster (each raster's tiles row-major, rasters in
order), batched without regard to file boundaries. The local executor reads the whole stream with
one DataLoader; the Dask executor cuts it into blocks of consecutive tiles whose length is a
multiple of the batch size (blocks may span rasters), so every executor embeds the same batches and
gives the same embeddings. Embeddings are written to the cache under each raster's own key, so a
new file embeds only its own tiles next time. Workers write their blocks straight into the
embedding cache (a folder every worker must see), load the model once per worker process, and
k-means assignment runs over row blocks of the assembled embedding file.
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
from .config import DEFAULT_EXECUTOR, check_executor
from .embedding.backbones import Backbone, build_backbone
from .embedding.cache import EmbeddingCache, NpyRows
from .embedding.engines import Runner, make_runner
from .embedding.infer import EmbeddedChunk, InferenceSettings, TileStream, iter_embeddings
from .errors import EngineError, SettlementsError, WeightsError
from .rasters import RasterInfo
from .store import sha256_file

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


def split_jobs(jobs: list[EmbedJob], block_tiles: int, batch_size: int) -> list[list[EmbedJob]]:
    """The stream of all jobs' tiles cut into blocks of ``block_tiles`` rounded up to whole batches, each
    block the pieces of the jobs it covers: batches match the uncut stream's, across rasters too."""
    step = max(1, -(-block_tiles // batch_size)) * batch_size
    bounds = np.cumsum([0, *(len(j.windows) for j in jobs)])
    blocks = []
    for s in range(0, int(bounds[-1]), step):
        e = min(s + step, int(bounds[-1]))
        blocks.append([replace(j, windows=j.windows[max(s, a) - a: min(e, b) - a])
                       for j, a, b in zip(jobs, bounds[:-1], bounds[1:], strict=True) if min(e, b) > max(s, a)])
    return blocks


def tile_stream(jobs: list[EmbedJob], batch_size: int) -> TileStream:
    """One dataset over the tiles of every job, in order."""
    sizes = {(j.input_size, j.min_valid) for j in jobs}
    if len(sizes) > 1:
        raise ValueError(f"one stream needs one input size and threshold, got {sorted(sizes)}")
    windows = np.concatenate([j.windows for j in jobs]) if jobs else np.empty((0, 8), np.int64)
    raster = np.repeat(np.arange(len(jobs)), [len(j.windows) for j in jobs])
    return TileStream([j.info for j in jobs], raster, windows[:, :4], windows[:, 4:],
                      jobs[0].input_size if jobs else 1, batch_size)


class CacheWriter:
    """Embedded batches (positions in the stream of ``jobs``, in any order) -> chunk files under each
    raster's key: a raster's chunk is written once ``CHUNK_TILES`` of its tiles are in, and as soon as
    its last tile is, so a killed run keeps every finished file."""

    def __init__(self, jobs: list[EmbedJob], cache: EmbeddingCache, dim: int) -> None:
        self.jobs, self.cache, self.dim = jobs, cache, dim
        self.starts = np.cumsum([0, *(len(j.windows) for j in jobs)])
        self.left = [len(j.windows) for j in jobs]
        self.buffers: dict[int, list[tuple[np.ndarray, ...]]] = {}

    def add(self, chunk: EmbeddedChunk) -> None:
        emb = np.full((len(chunk.index), self.dim), np.nan, dtype=np.float32)
        if chunk.kept.any():  # a batch of skipped tiles (all nodata) has no embeddings at all
            emb[chunk.kept] = chunk.embeddings
        job_of = np.searchsorted(self.starts, chunk.index, side="right") - 1
        for j, rows in _groups(job_of):
            local = chunk.index[rows] - self.starts[j]
            buf = self.buffers.setdefault(j, [])
            buf.append((self.jobs[j].windows[local], chunk.valid_tile[rows], chunk.valid_cell[rows], emb[rows]))
            self.left[j] -= len(rows)
            if self.left[j] == 0 or sum(len(b[0]) for b in buf) >= CHUNK_TILES:
                self._flush(j)

    def _flush(self, j: int) -> None:
        buf = self.buffers.pop(j)
        self.cache.append(self.jobs[j].key, *(np.concatenate(x) for x in zip(*buf, strict=True)))

    def close(self) -> None:
        for j in list(self.buffers):
            self._flush(j)


def _groups(labels: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(label, positions) for each distinct label, in order of first appearance."""
    uniq, first = np.unique(labels, return_index=True)
    return [(int(u), np.flatnonzero(labels == u)) for u in uniq[np.argsort(first)]]


def engine_runner(settings: InferenceSettings) -> Runner:
    """The runner of the engine ``settings`` name (not torch), its exported network checked by SHA-256."""
    path = Path(settings.model_path or "")
    if not path.is_file():
        raise EngineError(f"{path}: the exported network is missing (the work folder must be shared with the "
                          "workers)")
    if settings.model_sha256 is not None and sha256_file(path) != settings.model_sha256:
        raise EngineError(f"{path}: the exported network differs from the one the run chose (sha256)")
    return make_runner(settings.engine, settings.precision, settings.torch_device(), path=path)


def embed_jobs(jobs: list[EmbedJob], model: Any, settings: InferenceSettings, cache: EmbeddingCache, dim: int,
               progress: object | None = None, runner: Runner | None = None) -> int:
    """Embed the tiles of all jobs as one stream and write them to the cache per raster; return the count.

    ``model`` (torch) runs them where ``settings.engine`` is torch; else ``runner``, or one made here."""
    jobs = [j for j in jobs if len(j.windows)]
    if not jobs:
        return 0
    if settings.engine != "torch":
        model = runner or engine_runner(settings)
    writer = CacheWriter(jobs, cache, dim)
    for chunk in iter_embeddings(model, tile_stream(jobs, settings.batch_size), settings, jobs[0].min_valid,
                                 progress):
        writer.add(chunk)
    writer.close()
    return sum(len(j.windows) for j in jobs)


def assign_rows(model: KMeansClusterer, path: str | Path, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid and distance for rows [start, stop) of an embedding file."""
    return model.predict(NpyRows(Path(path))[start:stop])


class Executor(Protocol):
    def embed(self, jobs: list[EmbedJob], backbone: Backbone, settings: InferenceSettings,
              cache: EmbeddingCache, progress: object | None) -> int: ...

    def assign(self, model: KMeansClusterer, path: Path) -> tuple[np.ndarray, np.ndarray]: ...

    def close(self) -> None: ...


class LocalExecutor:
    """This process: one DataLoader reads the whole stream while the CNN runs."""

    name = "local"

    def embed(self, jobs: list[EmbedJob], backbone: Backbone, settings: InferenceSettings,
              cache: EmbeddingCache, progress: object | None) -> int:
        return embed_jobs(jobs, backbone.model, settings, cache, backbone.dim, progress)

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


_WORKER_RUNNERS: dict[tuple[str, str, str | None, str | None], Runner] = {}


def worker_runner(settings: InferenceSettings) -> Runner | None:
    """Another engine's runner, made once per worker process (None for torch)."""
    if settings.engine == "torch":
        return None
    key = (settings.engine, settings.precision, settings.model_path, settings.model_sha256)
    with _WORKER_LOCK:
        if key not in _WORKER_RUNNERS:
            _WORKER_RUNNERS[key] = engine_runner(settings)
        return _WORKER_RUNNERS[key]


def _embed_on_worker(block: list[EmbedJob], spec: ModelSpec, settings: InferenceSettings, cache_root: str) -> int:
    # no DataLoader processes inside a (daemonic) Dask worker: its threads overlap reading and compute
    runner = worker_runner(settings)
    model = worker_model(spec) if runner is None else None
    return embed_jobs(block, model, replace(settings, num_workers=0), EmbeddingCache(Path(cache_root)),
                      spec.dim, runner=runner)


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
        blocks = split_jobs(jobs, self.block_tiles, settings.batch_size)
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


def make_executor(name: str = DEFAULT_EXECUTOR, scheduler: str | None = None, n_workers: int | None = None,
                  block_tiles: int = 1024) -> LocalExecutor | DaskExecutor:
    check_executor(name, scheduler)
    if name == "dask":
        return DaskExecutor(scheduler, n_workers=n_workers, block_tiles=block_tiles)
    return LocalExecutor()
