"""Batched inference over tile windows: DataLoader workers read blocks while the CNN runs.

Tiles are read in contiguous blocks: one dataset item is one batch of consecutive tiles (row-major,
so a band of tile rows), read as one window per run of neighbouring tiles, then sliced. The batch
composition is therefore fixed by the tile list alone, so any executor that embeds the same list in
the same batches (local DataLoader, Dask blocks) gives bit-identical embeddings.

Workers hand over raw pixels in the raster's dtype (a quarter of float32's bytes for 8-bit imagery);
scaling, resizing and normalising run where the model runs, on its threads or its GPU. On a 2-core
CPU that halved the workers' CPU time, which they take from the model.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import logging
import os
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from rasterio.enums import Interleaving
from rasterio.windows import Window
from torch.fx.experimental import optimization as fx_optimization
from torch.utils.data import DataLoader, Dataset

from ..config import Embedding
from ..errors import SettlementsError
from ..rasters import OpenRasters, RasterInfo, read_raw

log = logging.getLogger(__name__)

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

#: Neighbouring tiles are read as one window while it holds at most this many times their pixels.
BLOCK_OVERREAD = 3.0

#: Datasets each reading process keeps open at once (the least recently used is closed first).
OPEN_RASTERS = 32

#: Batches queued on a GPU before the oldest one's features are collected.
GPU_IN_FLIGHT = 3

#: Shared memory a run's batch ring may take; above it (huge tiles) each batch gets its own.
RING_BYTES = 2 << 30


def to_model_input(tile: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """Scaled (3, h, w) tile, or (n, 3, h, w) tiles, in [0, 1] -> ImageNet-normalised at size x size."""
    t = torch.as_tensor(tile)
    single = t.ndim == 3
    if single:
        t = t[None]
    if t.shape[-2:] != (size, size):
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=t.shape[-1] > size)
    t = (t - IMAGENET_MEAN.to(t.device)) / IMAGENET_STD.to(t.device)
    return t[0] if single else t


def new_tensor(shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool = False) -> torch.Tensor:
    """An uninitialised tensor; in a DataLoader worker, allocated in shared memory.

    A worker's result is otherwise copied into shared memory when it is sent (torch's own collate
    avoids that copy the same way).
    """
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype, memory_format=torch.channels_last if channels_last
                           else torch.contiguous_format)
    numel = int(np.prod(shape))
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel, device="cpu")
    out = torch.empty(0, dtype=dtype).set_(storage._untyped_storage, 0, shape)  # type: ignore[call-overload]
    if channels_last:
        n, c, h, w = shape
        out = out.as_strided(shape, (h * w * c, 1, w * c, c))
    return out


@functools.lru_cache(maxsize=64)
def _constants(low: tuple[float, ...], high: tuple[float, ...],
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scaling and normalisation constants, made once per device: a tensor made on a GPU from host
    values is a synchronous copy, which would wait for every batch queued before it."""
    lo = torch.tensor(low, dtype=torch.float32).view(1, len(low), 1, 1)
    hi = torch.tensor(high, dtype=torch.float32).view(1, len(high), 1, 1)
    return tuple(t.to(device) for t in (lo, hi - lo, IMAGENET_MEAN, IMAGENET_STD))  # type: ignore[return-value]


@functools.lru_cache(maxsize=64)
def _affine(low: tuple[float, ...], high: tuple[float, ...], width: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel scale and offset of ((x - low) / (high - low) - mean) / std, computed in float64, repeated
    along a channels_last row of ``width`` pixels (r, g, b, r, g, b, ...): an affine pass over such rows
    runs in long vectors, where per-channel constants over channels_last pixels would give loops of 3."""
    lo, hi = torch.tensor(low, dtype=torch.float64), torch.tensor(high, dtype=torch.float64)
    mean, std = IMAGENET_MEAN.view(3).double(), IMAGENET_STD.view(3).double()
    scale = 1.0 / ((hi - lo) * std)
    offset = -(lo / (hi - lo) + mean) / std
    return scale.float().repeat(width).to(device), offset.float().repeat(width).to(device)


@dataclass(frozen=True)
class ModelInput:
    """Raw tiles of one raster -> the CNN's input: scale and clip per band, grey out invalid pixels,
    repeat greyscale, resize to ``size``, ImageNet-normalise, channels_last.

    Runs on whatever device the pixels are on, in place; the values are those of
    :func:`~settlements.rasters.read_tile` and :func:`to_model_input` (exactly, or within float
    rounding where one fused pass does it all).
    """

    low: tuple[float, ...]
    high: tuple[float, ...]
    size: int

    @classmethod
    def of(cls, info: RasterInfo, size: int) -> ModelInput:
        return cls(tuple(map(float, info.scale_low)), tuple(map(float, info.scale_high)), size)

    def fused(self, raw: torch.Tensor) -> bool:
        """True where one affine pass does it all: three bands whose every value scales into [0, 1], at
        the input size."""
        return raw.shape[1] == 3 and self._in_range(raw.dtype) and tuple(raw.shape[-2:]) == (self.size, self.size)

    def _in_range(self, dtype: torch.dtype) -> bool:
        """True where every value of ``dtype`` scales into [0, 1] (e.g. uint8 over 0..255): no clamp needed."""
        if dtype.is_floating_point or dtype == torch.bool:
            return False
        info = torch.iinfo(dtype)
        return min(self.high) >= info.max and max(self.low) <= info.min

    def __call__(self, raw: np.ndarray | torch.Tensor, invalid: torch.Tensor | None) -> torch.Tensor:
        """(n, bands, h, w) raw pixels and an (n, h, w) invalid mask (None: all valid) -> (n, 3, size, size)."""
        if isinstance(raw, np.ndarray):
            raw = torch.from_numpy(wire_dtype(raw))
        dev, (n, bands) = raw.device, raw.shape[:2]
        if self.fused(raw):
            # the common case (e.g. 8-bit imagery, tiles at the input size): scaling and normalising
            # are one affine map per channel, done in one pass over the output; equal to the
            # step-by-step path within 2e-6 (float rounding)
            scale, offset = _affine(self.low, self.high, self.size, dev)
            out = (new_tensor((n, 3, self.size, self.size), torch.float32, channels_last=True) if dev.type == "cpu"
                   else torch.empty((n, 3, self.size, self.size), device=dev, memory_format=torch.channels_last))
            out.copy_(raw)  # to float, in the output layout (one mixed-dtype affine pass was 2x slower)
            rows = out.permute(0, 2, 3, 1).view(n * self.size, self.size * 3)
            torch.addcmul(offset, rows, scale, out=rows)
            if invalid is not None:  # mid-grey, normalised
                for ch, value in enumerate(((0.5 - IMAGENET_MEAN) / IMAGENET_STD).view(3).tolist()):
                    out[:, ch].masked_fill_(invalid, value)
            return out
        lo, span, mean, std = _constants(self.low, self.high, dev)
        x = raw.contiguous().to(torch.float32, copy=True)  # per-channel steps run fastest band by band
        if any(self.low):  # x - 0 is x: a pass saved
            x.sub_(lo)
        x.div_(span)
        if not self._in_range(raw.dtype):
            x.clamp_(0.0, 1.0)
        if invalid is not None:
            x.masked_fill_(invalid[:, None], 0.5)
        if bands == 1:
            x = x.repeat(1, 3, 1, 1)
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > self.size)
        x.sub_(mean).div_(std)
        if dev.type != "cpu":
            return x.contiguous(memory_format=torch.channels_last)
        return new_tensor((n, 3, self.size, self.size), torch.float32, channels_last=True).copy_(x)


def available_cores() -> int:
    """CPU cores this process may run on (a container's or ``taskset``'s limit, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_supports(dtype: torch.dtype) -> bool:
    """True where oneDNN runs ``dtype`` natively (AVX512-FP16/BF16, AMX); elsewhere it is emulated and slow."""
    probe = {torch.float16: "_is_mkldnn_fp16_supported", torch.bfloat16: "_is_mkldnn_bf16_supported"}[dtype]
    try:
        return bool(torch.backends.mkldnn.is_available() and getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):
        return False


def batch_slices(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Consecutive [start, stop) ranges of at most ``batch_size`` over ``n`` tiles."""
    return [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def read_order(n: int, parts: int) -> np.ndarray:
    """Batch numbers 0..n-1 in the order ``parts`` DataLoader workers read them: each worker (the
    DataLoader deals positions round-robin) gets one contiguous range of batches.

    Neighbouring batches share compressed blocks of the file; dealt one by one, every worker would
    decode nearly every block (two workers read no faster than one). Returned in this order,
    position ``p`` goes to worker ``p % parts``.
    """
    ranges = np.array_split(np.arange(n), max(1, min(parts, n)))  # longer ranges first
    return np.array([r[k] for k in range(len(ranges[0])) for r in ranges if k < len(r)], dtype=np.int64)


def block_runs(tiles: np.ndarray, overread: float = BLOCK_OVERREAD) -> list[tuple[int, int]]:
    """Split consecutive tiles (rows of col, row, width, height) into [start, stop) runs, each read as one
    window: a run grows while its bounding window holds at most ``overread`` times its tiles' pixels."""
    runs, s, n = [], 0, len(tiles)
    while s < n:
        c0, r0, w, h = (int(v) for v in tiles[s])
        c1, r1, area, e = c0 + w, r0 + h, w * h, s + 1
        while e < n:
            c, r, w, h = (int(v) for v in tiles[e])
            nc0, nr0, nc1, nr1 = min(c0, c), min(r0, r), max(c1, c + w), max(r1, r + h)
            if (nc1 - nc0) * (nr1 - nr0) > overread * (area + w * h):
                break
            c0, r0, c1, r1, area, e = nc0, nr0, nc1, nr1, area + w * h, e + 1
        runs.append((s, e))
        s = e
    return runs


_WIRE: dict[np.dtype, np.dtype] = {np.dtype("uint16"): np.dtype("int32"), np.dtype("uint32"): np.dtype("int64"),
                                   np.dtype("float64"): np.dtype("float32")}


def wire_dtype(raw: np.ndarray) -> np.ndarray:
    """Raw pixels in a dtype torch can move and convert everywhere (uint16/uint32 widened, float64 narrowed)."""
    return raw.astype(_WIRE.get(raw.dtype, raw.dtype), copy=False)


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, _WIRE.get(dtype, dtype))).dtype


class RingView(NamedTuple):
    """Where a worker left a tensor in the batch ring: slot, byte offset in it, dtype, shape and strides."""

    slot: int
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class BatchRing:
    """Shared-memory buffers, allocated once per run, that DataLoader workers fill with batches in turn.

    The batch at read position ``p`` goes to slot ``p % slots``; the model's process reads it where it
    lies, so no shared-memory segment is made, faulted in, passed and unmapped per batch, and for a GPU
    the ring is page-locked once (the copy to the GPU needs no staging copy and does not block).
    A DataLoader dispatches at most ``prefetch`` batches beyond the last one it returned, so with
    ``slots`` >= prefetch + (batches still in use) + 1 a slot is written again only once its batch is
    done with. Each slot starts with the position written last, checked when the batch is taken.
    """

    HEADER = 64  # bytes before a slot's data (the position, int64); data stays 64-byte aligned

    def __init__(self, slots: int, slot_bytes: int) -> None:
        self.slots = slots
        self.slot_bytes = self.HEADER + -(-slot_bytes // 64) * 64
        storage = torch.UntypedStorage._new_shared(self.slots * self.slot_bytes)  # made in shared memory
        self.buffer = torch.empty(0, dtype=torch.uint8).set_(storage)
        for slot in range(slots):  # no batch yet
            self.buffer.narrow(0, slot * self.slot_bytes, 8).view(torch.int64).fill_(-1)
        self._pinned = False

    def pin(self) -> None:
        """Page-lock the ring for CUDA copies (after the workers have forked: pinned pages may not be
        inherited); on failure copies stay correct, only synchronous."""
        try:
            err = torch.cuda.cudart().cudaHostRegister(self.buffer.data_ptr(), self.buffer.numel(), 0)
        except (AttributeError, RuntimeError) as exc:  # a torch without the binding
            err = exc
        self._pinned = not isinstance(err, Exception) and int(err) == 0
        if not self._pinned:
            log.info("batch ring not page-locked (cudaHostRegister: %s): copies to the GPU will block", err)

    def unpin(self) -> None:
        if self._pinned:
            torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr())
            self._pinned = False

    def writer(self, position: int) -> RingWriter:
        return RingWriter(self, position)

    def tensor(self, view: RingView) -> torch.Tensor:
        start = view.slot * self.slot_bytes + view.offset
        numel = 1 + sum((n - 1) * s for n, s in zip(view.shape, view.stride, strict=True)) if all(view.shape) else 0
        size = torch.empty(0, dtype=view.dtype).element_size()
        flat = self.buffer.narrow(0, start, numel * size).view(view.dtype)
        return flat.as_strided(view.shape, view.stride)

    def take(self, batch: TileBatch, position: int) -> TileBatch:
        """The batch a worker left at ``position``, as tensors over the ring."""
        slot = position % self.slots
        written = int(self.buffer.narrow(0, slot * self.slot_bytes, 8).view(torch.int64)[0])
        if written != position:  # a slot overwritten before use: never hand on wrong pixels
            raise RuntimeError(f"batch ring slot {slot} holds batch {written}, expected {position}")
        return batch._replace(parts=tuple(TilePart(self._resolve(p.pixels), self._resolve(p.invalid), p.model_input)
                                          for p in batch.parts))

    def _resolve(self, t: Any) -> Any:
        return self.tensor(t) if isinstance(t, RingView) else t  # a part too big for the slot came apart


class RingWriter:
    """A worker's allocations for one batch: consecutive 64-byte aligned tensors in its slot."""

    def __init__(self, ring: BatchRing, position: int) -> None:
        self.ring, self.position = ring, position
        self.slot = position % ring.slots
        self.base = self.slot * ring.slot_bytes
        self.used = BatchRing.HEADER

    def fits(self, nbytes: int) -> bool:
        return self.used + nbytes <= self.ring.slot_bytes

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        size = torch.empty(0, dtype=dtype).element_size()
        numel = int(np.prod(shape))
        out = self.ring.buffer.narrow(0, self.base + self.used, numel * size).view(dtype).view(shape)
        self.used += -(-numel * size // 64) * 64
        return out

    def view(self, t: torch.Tensor) -> RingView:
        offset = t.data_ptr() - self.ring.buffer.data_ptr() - self.base
        return RingView(self.slot, offset, t.dtype, tuple(t.shape), tuple(t.stride()))

    def seal(self) -> None:
        """Mark the slot as holding this position (written last, after the pixels)."""
        self.ring.buffer.narrow(0, self.base, 8).view(torch.int64)[0] = self.position


class TilePart(NamedTuple):
    """Consecutive tiles of a batch that share a raster's scaling, a dtype and a shape.

    ``pixels``: raw (n, bands, h, w) in a wire dtype (channels_last strides where the file stores
    bands pixel by pixel); ``invalid``: (n, h, w), None where every pixel is imagery. In a worker's
    answer both may be :class:`RingView` s, made tensors again by :meth:`BatchRing.take`.
    """

    pixels: torch.Tensor
    invalid: torch.Tensor | None
    model_input: ModelInput


class TileBatch(NamedTuple):
    """One dataset item: positions in the tile list, the tiles' raw pixels in parts, and how much of each
    tile and cell is imagery. :meth:`TileStream.inputs` makes the model input of all parts on the model's
    device."""

    index: np.ndarray  # type: ignore[assignment]  # (a field named like tuple.index)
    parts: tuple[TilePart, ...]
    valid_tile: np.ndarray
    valid_cell: np.ndarray


class TileStream(Dataset):
    """Batches of consecutive tiles across rasters, read as blocks: one dataset and one DataLoader per run.

    Tiles come grouped by raster (``raster``: each tile's index into ``infos``); a batch takes the next
    ``batch_size`` tiles whichever files they lie in, so many small files fill whole batches as one
    mosaic does, and the batches are a function of the tile list alone (any executor that embeds the
    same list gives the same embeddings). Each reading process opens datasets as it needs them and keeps
    at most ``open_limit`` open (the least recently used is closed first; handles never cross processes).
    """

    def __init__(self, infos: list[RasterInfo], raster: np.ndarray, tiles: np.ndarray, cells: np.ndarray,
                 input_size: int, batch_size: int, open_limit: int = OPEN_RASTERS) -> None:
        self.infos = list(infos)
        self.raster = np.asarray(raster, dtype=np.int64)
        self.tiles = np.asarray(tiles, dtype=np.int64).reshape(-1, 4)  # (n, 4) col_off, row_off, width, height
        self.cells = np.asarray(cells, dtype=np.int64).reshape(-1, 4)  # (n, 4) likewise, the stride cell
        self.input_size = input_size
        self.batch_size = batch_size
        self.model_inputs = [ModelInput.of(info, input_size) for info in self.infos]
        self.slices = batch_slices(len(self.tiles), batch_size)
        self.order = np.arange(len(self.slices))
        self.position = self.order
        self.ring: BatchRing | None = None
        self.channels_last = True  # pixel-interleaved files read as stored, (n, h, w, bands)
        self._open = OpenRasters(self.infos, open_limit)

    def __len__(self) -> int:
        return len(self.slices)

    def close(self) -> None:
        self._open.close()

    def read_by(self, workers: int) -> None:
        """Read in the order that gives each of ``workers`` DataLoader workers its own range of batches."""
        self.order = read_order(len(self.slices), workers)
        self.position = np.argsort(self.order)

    def batch_bytes(self) -> int:
        """An upper bound on a batch's raw pixels and masks, as a worker lays them out."""
        if not len(self.tiles):
            return 0
        per_pixel = np.array([len(i.bands) * _WIRE.get(np.dtype(i.dtype), np.dtype(i.dtype)).itemsize + 1
                              for i in self.infos])
        tile = int((self.tiles[:, 2] * self.tiles[:, 3] * per_pixel[self.raster]).max())
        return self.batch_size * (tile + 128)

    def _segments(self, s: int, e: int) -> list[tuple[int, int, int]]:
        """(raster, start, stop) of the runs of one raster's tiles in [s, e)."""
        r = self.raster[s:e]
        cuts = [0, *(np.flatnonzero(r[1:] != r[:-1]) + 1).tolist(), e - s]
        return [(int(r[a]), s + a, s + b) for a, b in zip(cuts[:-1], cuts[1:], strict=False)]

    def _read(self, r: int, tiles: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray | None], bool]:
        """One raster's tiles: pixels and validity per tile (views of block reads; None where the whole
        block is imagery), and whether they were read band-interleaved by pixel (as a pixel-interleaved
        file stores them, where ``channels_last``)."""
        src, info = self._open[r], self.infos[r]
        interleaved = self.channels_last and src.interleaving == Interleaving.pixel
        pixels, valid = [], []
        for s, e in block_runs(tiles):
            run = tiles[s:e]
            c0, r0 = int(run[:, 0].min()), int(run[:, 1].min())
            c1, r1 = int((run[:, 0] + run[:, 2]).max()), int((run[:, 1] + run[:, 3]).max())
            block, ok = read_raw(src, info, Window(c0, r0, c1 - c0, r1 - r0), interleaved)
            whole = bool(ok.all())  # one test per block, not two per tile
            for c, row, w, h in run:
                pixels.append(block[:, row - r0: row - r0 + h, c - c0: c - c0 + w])
                valid.append(None if whole else ok[row - r0: row - r0 + h, c - c0: c - c0 + w])
        return pixels, valid, interleaved

    def __getitem__(self, i: int) -> TileBatch:
        s, e = self.slices[i]
        pixels: list[np.ndarray] = []
        valid: list[np.ndarray | None] = []
        kinds: list[tuple[int, bool]] = []
        for r, a, b in self._segments(s, e):
            px, ok, interleaved = self._read(r, self.tiles[a:b])
            pixels += px
            valid += ok
            kinds += [(r, interleaved)] * len(px)
        tiles, cells = self.tiles[s:e], self.cells[s:e]
        if all(v is None for v in valid):  # the common case: only imagery
            vt = vc = np.ones(e - s, dtype=np.float32)
        else:
            vt = np.array([1.0 if v is None else v.mean() for v in valid], dtype=np.float32)
            vc = np.array([1.0 if v is None else v[cr - r: cr - r + ch, cc - c: cc - c + cw].mean()
                           for v, (c, r, _, _), (cc, cr, cw, ch) in zip(valid, tiles, cells, strict=True)],
                          dtype=np.float32)
        ring = self.ring if self.ring is not None and torch.utils.data.get_worker_info() is not None else None
        writer = None if ring is None else ring.writer(int(self.position[i]))
        parts = tuple(self._part(pixels[a:b], valid[a:b], self.model_inputs[kinds[a][0]], kinds[a][1], writer)
                      for a, b in _runs([(self.model_inputs[r], p.dtype, p.shape, il)
                                         for p, (r, il) in zip(pixels, kinds, strict=True)]))
        if writer is not None:
            writer.seal()
        return TileBatch(np.arange(s, e), parts, vt, vc)

    @staticmethod
    def _part(pixels: list[np.ndarray], valid: list[np.ndarray | None], model_input: ModelInput,
              interleaved: bool, writer: RingWriter | None) -> TilePart:
        """Stack tiles of one kind into one raw tensor (in the ring slot, else in shared memory in a
        worker), as the file stores them: pixel-interleaved files give (n, h, w, bands), i.e. channels_last."""
        n, (bands, h, w) = len(pixels), pixels[0].shape
        dtype = _torch_dtype(pixels[0].dtype)  # e.g. uint8 stays uint8: a quarter of float32's bytes
        all_valid = all(v is None or v.all() for v in valid)
        size = torch.empty(0, dtype=dtype).element_size()
        if writer is not None and not writer.fits(n * h * w * (bands * size + 1) + 128):
            writer = None  # never expected (the ring is sized for the largest batch)

        def alloc(shape: tuple[int, ...], kind: torch.dtype) -> torch.Tensor:
            return writer.tensor(shape, kind) if writer is not None else new_tensor(shape, kind)

        if interleaved:
            raw = alloc((n, h, w, bands), dtype)
            np.stack([p.transpose(1, 2, 0) for p in pixels], out=raw.numpy(), casting="unsafe")
            raw = raw.permute(0, 3, 1, 2)
        else:
            raw = alloc((n, bands, h, w), dtype)
            np.stack(pixels, out=raw.numpy(), casting="unsafe")
        invalid = None
        if not all_valid:
            invalid = alloc((n, h, w), torch.bool)
            for v, out in zip(valid, invalid.numpy(), strict=True):
                out[...] = False if v is None else ~v
        if writer is None:
            return TilePart(raw, invalid, model_input)
        return TilePart(writer.view(raw), None if invalid is None else writer.view(invalid),  # type: ignore[arg-type]
                        model_input)

    def inputs(self, batch: TileBatch, device: torch.device | str = "cpu",
               keep: np.ndarray | None = None) -> torch.Tensor:
        """The model input of a batch's tiles (those where ``keep`` is True), each part finished by its own
        raster's :class:`ModelInput` on ``device``, concatenated into one batch."""
        device = torch.device(device)
        out, at = [], 0
        for part in batch.parts:
            n = len(part.pixels)
            sel = None if keep is None else keep[at: at + n]
            at += n
            if sel is not None and not sel.any():
                continue
            out.append(_finish_part(part, device, None if sel is None or sel.all() else sel))
        return out[0] if len(out) == 1 else torch.cat(out)


def _runs(keys: list[Any]) -> list[tuple[int, int]]:
    """[start, stop) runs of equal consecutive keys."""
    cuts = [0, *(i for i in range(1, len(keys)) if keys[i] != keys[i - 1]), len(keys)]
    return list(zip(cuts[:-1], cuts[1:], strict=False))


def _finish_part(part: TilePart, device: torch.device, sel: np.ndarray | None) -> torch.Tensor:
    x, invalid = part.pixels, part.invalid
    if sel is not None:
        m = torch.from_numpy(sel)
        x, invalid = x[m], None if invalid is None else invalid[m]
        if device.type == "cuda":  # a selection lies in pageable memory: pin it so the copy does not block
            x, invalid = x.pin_memory(), None if invalid is None else invalid.pin_memory()
    return part.model_input(x.to(device, non_blocking=True),
                            None if invalid is None else invalid.to(device, non_blocking=True))


class TileBlocks(TileStream):
    """Batches of consecutive tiles of one raster: a stream of one raster."""

    def __init__(self, info: RasterInfo, tiles: np.ndarray, cells: np.ndarray, input_size: int,
                 batch_size: int) -> None:
        super().__init__([info], np.zeros(len(tiles), dtype=np.int64), tiles, cells, input_size, batch_size)


def iter_batches(dataset: TileStream, workers: int, device: torch.device | str = "cpu", held: int = 0,
                 channels_last: bool | None = None) -> Iterator[TileBatch]:
    """The dataset's batches, read by ``workers`` DataLoader processes (0: in this one), in read order.

    Each worker reads its own range of batches (so no two decode the same blocks) into a ring of
    shared-memory slots made once for the run, page-locked for a GPU; a batch's tensors lie there
    until the caller has asked for ``held`` + 1 more (``held``: batches it may still be using, e.g.
    queued on a GPU). ``channels_last``: read pixel-interleaved files as stored (on a CPU, where the
    model's cores would otherwise interleave them; the default there) or band by band (GDAL reads
    that way about a quarter faster; a GPU interleaves for free; the default there).
    """
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    ds = copy.copy(dataset)  # this run's read order, layout and ring; the caller's dataset stays as it was
    ds.channels_last = not on_gpu if channels_last is None else channels_last
    workers = min(workers, len(ds))
    if workers == 0:
        try:
            yield from (ds[i] for i in range(len(ds)))
        finally:
            dataset.close()
        return
    prefetch = 2 if on_gpu else 4
    keep_freed_memory()  # inherited by the workers: GDAL's cached blocks and the read buffers are reused
    ds.read_by(workers)
    ds.ring = _ring(ds, prefetch * workers + held + 2)
    loader = DataLoader(ds, batch_size=None, sampler=ds.order.tolist(), num_workers=workers, collate_fn=_as_is,
                        pin_memory=on_gpu and ds.ring is None, persistent_workers=False, prefetch_factor=prefetch)
    batches = iter(loader)  # forks the workers
    try:
        if ds.ring is not None and on_gpu:
            ds.ring.pin()
        for p, b in enumerate(_one_line_errors(batches)):
            yield b if ds.ring is None else ds.ring.take(b, p)
    finally:
        del batches  # stops the workers
        if ds.ring is not None:
            ds.ring.unpin()
        dataset.close()


def _as_is(batch: Any) -> Any:
    """No collation: torch's default would make each batch's small numpy arrays tensors in shared memory
    (a segment, a file descriptor and a mapping each, per batch)."""
    return batch


def _ring(dataset: TileStream, slots: int) -> BatchRing | None:
    """A batch ring for ``dataset``, or None where it would take more than :data:`RING_BYTES` (huge
    tiles: each batch then gets its own shared memory) or the shared memory cannot be had."""
    need = dataset.batch_bytes()
    if need == 0 or slots * need > RING_BYTES:
        return None
    try:
        return BatchRing(slots, need)
    except RuntimeError as exc:  # e.g. a small /dev/shm
        log.debug("no batch ring: %s", exc)
        return None


@contextmanager
def _one_line_worker_errors() -> Iterator[None]:
    """Re-raise a project error from a DataLoader worker with its own one-line message.

    torch re-raises a worker's exception with the worker's whole traceback as its message; the
    user needs only the last line (e.g. which raster block could not be read).
    """
    try:
        yield
    except SettlementsError as exc:
        text = str(exc)
        if "Original Traceback" not in text:
            raise
        last = [line for line in text.splitlines() if line.strip()][-1]
        prefix = f"{type(exc).__module__}.{type(exc).__qualname__}: "
        raise type(exc)(last.removeprefix(prefix)) from None


def _one_line_errors(loader: Iterable[Any]) -> Iterator[Any]:
    """Iterate a DataLoader, shortening errors raised in its workers to their own message."""
    with _one_line_worker_errors():
        yield from loader


#: The config's defaults (``embedding:``), the only place they are written.
_DEFAULTS = Embedding()


@dataclass
class InferenceSettings:
    device: str = _DEFAULTS.device
    precision: str = _DEFAULTS.precision
    batch_size: int = _DEFAULTS.batch_size
    num_workers: int | str = _DEFAULTS.num_workers
    #: what runs the network (:mod:`settlements.embedding.engines`): torch, or another engine running the
    #: exported network at ``model_path`` (its SHA-256 checked where it is loaded)
    engine: str = "torch"
    model_path: str | None = None
    model_sha256: str | None = None

    @classmethod
    def from_settings(cls, e: Embedding) -> InferenceSettings:
        """The settings of a pipeline's ``embedding:`` section (precision still ``auto`` where it says so; the
        engine torch until a run's choice, :mod:`settlements.embedding.choice`, says otherwise)."""
        precision = e.precision if e.engine in ("auto", "torch") and e.precision != "int8" else "auto"
        return cls(e.device, precision, e.batch_size, e.num_workers)

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        """``auto``: fp16 autocast on GPUs and on CPUs that run it natively, else fp32.

        fp16 keeps 10 mantissa bits and stays faithful (cosine to fp32 >= 0.9998 on real tiles);
        bf16's 7 bits are not (MobileNetV2 features: cosine down to 0.97), so bf16 is opt-in only.
        """
        if self.precision in ("fp32", "int8"):  # int8: another engine's; torch runs fp32
            return None
        if self.precision == "auto":
            if device.type == "cuda" or (device.type == "cpu" and cpu_supports(torch.float16)):
                return torch.float16
            return None
        return torch.float16 if self.precision == "fp16" else torch.bfloat16

    def workers_for(self, device: torch.device) -> int:
        """DataLoader workers: as set, or for ``auto`` one on a CPU (the model needs the other cores)
        and, to keep a GPU fed, one per available core but one, at most 16."""
        if self.num_workers != "auto":
            return int(self.num_workers)
        return 1 if device.type == "cpu" else max(1, min(16, available_cores() - 1))

    def precision_name(self, device: torch.device) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast_dtype(device)]


@dataclass
class EmbeddedChunk:
    """One batch's results: indices into the tile list, validity, and embeddings of kept tiles."""

    index: np.ndarray
    valid_tile: np.ndarray
    valid_cell: np.ndarray
    kept: np.ndarray
    embeddings: np.ndarray  # (kept.sum(), dim) float32


_MALLOC_TUNED: bool | None = None


def keep_freed_memory() -> bool:
    """Let glibc's malloc reuse freed blocks of up to 256 MB instead of unmapping them.

    By default every large activation buffer of a CPU forward pass is mmapped, page-faulted in and
    unmapped again; that cost MobileNetV2 about 40 % of its throughput here (86 vs 145 tiles/s at
    batch 16). The same effect as ``MALLOC_MMAP_THRESHOLD_``, set from within; inherited by forked
    DataLoader workers. Returns False where the C library is not glibc.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED is None:
        try:
            libc = ctypes.CDLL("libc.so.6")
            _MALLOC_TUNED = bool(libc.mallopt(-3, 256 << 20) and libc.mallopt(-1, 512 << 20))  # MMAP, TRIM
        except (OSError, AttributeError):
            _MALLOC_TUNED = False
        log.debug("malloc keeps freed memory: %s", _MALLOC_TUNED)
    return _MALLOC_TUNED


#: model -> its folded copy, or None where it cannot be folded (a value never refers to its key).
_FOLDED: weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module | None] = weakref.WeakKeyDictionary()


def fold_batch_norms(model: torch.nn.Module) -> torch.nn.Module:
    """An inference copy of ``model`` with every BatchNorm that follows a convolution folded into it.

    Same function in fp32 (cosine to the original 0.9999999 on real tiles), one pass fewer per block:
    MobileNetV2 runs about 20 % faster on the CPU. Not for fp16: folded weights lose precision there
    (Olinda tiles: min cosine to fp32 0.9972 folded, 0.9992 not). The model's ``body`` must be an FX graph (as
    :func:`~settlements.embedding.backbones.build_backbone` makes it); other models come back as they are.
    Made once per model and kept while the model lives (a Dask worker embeds many blocks with it).
    """
    if model not in _FOLDED:
        folded = None
        if isinstance(getattr(model, "body", None), torch.fx.GraphModule):
            try:
                folded = copy.deepcopy(model).eval()  # a deep copy of a feature extractor starts in train mode
                folded.body = fx_optimization.fuse(cast(torch.fx.GraphModule, folded.body), inplace=True)
            except Exception as exc:  # a graph FX cannot trace again: run it unfolded
                log.debug("batch norms not folded: %s", exc)
                folded = None
        _FOLDED[model] = folded
    folded = _FOLDED[model]
    return model if folded is None else folded


def prepare_model(model: torch.nn.Module, device: torch.device, amp: torch.dtype | None) -> torch.nn.Module:
    """The model to run on ``device`` under autocast ``amp`` (None: fp32): eval mode, channels_last (the
    layout oneDNN and cuDNN run fastest), batch norms folded in fp32."""
    if device.type == "cpu":
        keep_freed_memory()
    model.eval()
    if amp is None:
        model = fold_batch_norms(model)
    return model.to(device).eval().to(memory_format=torch.channels_last)


def forward(model: torch.nn.Module, x: torch.Tensor, device: torch.device, amp: torch.dtype | None) -> torch.Tensor:
    """Forward one batch of model inputs (already prepared model); float32 features, left on ``device``."""
    xb = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        return model(xb).float()


def embed_batch(model: torch.nn.Module, x: torch.Tensor, device: torch.device,
                amp: torch.dtype | None) -> np.ndarray:
    """Forward one batch (already prepared model) and return float32 embeddings on the CPU."""
    return forward(model, x, device, amp).cpu().numpy()


@dataclass
class _InFlight:
    """A batch whose features may still be computing (CUDA runs asynchronously)."""

    index: np.ndarray
    valid_tile: np.ndarray
    valid_cell: np.ndarray
    kept: np.ndarray
    features: torch.Tensor | None
    done: torch.cuda.Event | None

    def result(self) -> EmbeddedChunk:
        if self.done is not None:
            self.done.synchronize()
        emb = np.empty((0, 0), dtype=np.float32) if self.features is None else self.features.numpy()
        return EmbeddedChunk(self.index, self.valid_tile, self.valid_cell, self.kept, emb)


def iter_embeddings(model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor], dataset: TileStream,
                    settings: InferenceSettings, min_valid: float,
                    progress: object | None = None) -> Iterator[EmbeddedChunk]:
    """Embed every tile whose valid share is at least ``min_valid``; yield per batch, in read order.

    ``model``: the torch network, prepared once for the whole stream; or another engine's runner
    (model inputs on the device -> float32 features). On a GPU, batches are copied from page-locked
    memory without blocking, and up to :data:`GPU_IN_FLIGHT` batches are queued before the oldest
    one's features are collected, so the GPU never waits for the Python loop.
    """
    device = settings.torch_device()
    amp = settings.autocast_dtype(device)
    if isinstance(model, torch.nn.Module):
        prepared = prepare_model(model, device, amp)
        run: Callable[[torch.Tensor], torch.Tensor] = lambda x: forward(prepared, x, device, amp)  # noqa: E731
    else:
        run = model
    on_gpu = device.type == "cuda"
    depth = GPU_IN_FLIGHT if on_gpu else 0
    pending: deque[_InFlight] = deque()
    for b in iter_batches(dataset, settings.workers_for(device), device, held=depth):
        vt = np.asarray(b.valid_tile, dtype=np.float32)
        kept = vt >= min_valid - 1e-9
        features, done = None, None
        if kept.any():
            x = dataset.inputs(b, device, None if kept.all() else kept)
            features = run(x)
            if features.is_cuda:
                features = features.to("cpu", non_blocking=True)  # into pinned memory, once computed
                done = torch.cuda.Event()
                done.record()
            else:
                features = features.cpu()
        pending.append(_InFlight(np.asarray(b.index), vt, np.asarray(b.valid_cell, dtype=np.float32), kept,
                                 features, done))
        while len(pending) > depth:
            yield _finish(pending.popleft(), progress)
    while pending:
        yield _finish(pending.popleft(), progress)


def _finish(batch: _InFlight, progress: object | None) -> EmbeddedChunk:
    chunk = batch.result()
    if progress is not None:
        progress.update(len(chunk.index))  # type: ignore[attr-defined]
    return chunk
