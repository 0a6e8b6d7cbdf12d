"""Batched inference over tile windows: DataLoader workers read and resize while the CNN runs.

Tiles are read in contiguous blocks: one dataset item is one batch of consecutive tiles (row-major,
so a band of tile rows), read with a single window covering them, then sliced and resized together.
The batch composition is therefore fixed by the tile list alone, so any executor that embeds the
same list in the same batches (local DataLoader, Dask blocks) gives bit-identical embeddings.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import rasterio
import torch
import torch.nn.functional as F
from rasterio.windows import Window
from torch.utils.data import DataLoader, Dataset

from ..errors import SettlementsError
from ..rasters import RasterInfo, read_tile

log = logging.getLogger(__name__)

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

#: A block read is used when its window holds at most this many times the pixels of its tiles.
BLOCK_OVERREAD = 3.0


def to_model_input(tile: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """Scaled (3, h, w) tile, or (n, 3, h, w) tiles, in [0, 1] -> ImageNet-normalised at size x size."""
    t = torch.as_tensor(tile)
    single = t.ndim == 3
    if single:
        t = t[None]
    if t.shape[-2:] != (size, size):
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=t.shape[-1] > size)
    t = (t - IMAGENET_MEAN) / IMAGENET_STD
    return t[0] if single else t


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


class TileBlocks(Dataset):
    """Batches of consecutive tiles of one raster; each item is read as one block where that pays.

    Each DataLoader worker opens its own dataset handle (never shared across processes).
    """

    def __init__(self, info: RasterInfo, tiles: np.ndarray, cells: np.ndarray, input_size: int,
                 batch_size: int) -> None:
        self.info = info
        self.tiles = np.asarray(tiles, dtype=np.int64)  # (n, 4) col_off, row_off, width, height
        self.cells = np.asarray(cells, dtype=np.int64)  # (n, 4) likewise, the stride cell
        self.input_size = input_size
        self.slices = batch_slices(len(self.tiles), batch_size)
        self._src: rasterio.io.DatasetReader | None = None

    def __len__(self) -> int:
        return len(self.slices)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_src": None}

    def close(self) -> None:
        if self._src is not None:
            self._src.close()
            self._src = None

    def _read(self, tiles: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        assert self._src is not None
        c0, r0 = int(tiles[:, 0].min()), int(tiles[:, 1].min())
        c1, r1 = int((tiles[:, 0] + tiles[:, 2]).max()), int((tiles[:, 1] + tiles[:, 3]).max())
        area = float((tiles[:, 2] * tiles[:, 3]).sum())
        if (c1 - c0) * (r1 - r0) <= BLOCK_OVERREAD * area:
            block, bvalid = read_tile(self._src, self.info, Window(c0, r0, c1 - c0, r1 - r0))
            pix = [block[:, r - r0: r - r0 + h, c - c0: c - c0 + w] for c, r, w, h in tiles]
            val = [bvalid[r - r0: r - r0 + h, c - c0: c - c0 + w] for c, r, w, h in tiles]
            return pix, val
        pv = [read_tile(self._src, self.info, Window(int(c), int(r), int(w), int(h))) for c, r, w, h in tiles]
        return [p for p, _ in pv], [v for _, v in pv]

    def __getitem__(self, i: int) -> tuple[np.ndarray, torch.Tensor, np.ndarray, np.ndarray]:
        if self._src is None:
            self._src = rasterio.open(self.info.path)
        s, e = self.slices[i]
        tiles, cells = self.tiles[s:e], self.cells[s:e]
        pixels, valid = self._read(tiles)
        vt = np.array([v.mean() for v in valid], dtype=np.float32)
        vc = np.array([v[cr - r: cr - r + ch, cc - c: cc - c + cw].mean()
                       for v, (c, r, _, _), (cc, cr, cw, ch) in zip(valid, tiles, cells, strict=True)],
                      dtype=np.float32)
        same = len({p.shape for p in pixels}) == 1
        if same:
            x = to_model_input(torch.from_numpy(np.stack(pixels)), self.input_size)
        else:  # tiles of different sizes cannot be stacked before resizing
            x = torch.stack([to_model_input(p, self.input_size) for p in pixels])
        return np.arange(s, e), x.contiguous(memory_format=torch.channels_last), vt, vc


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


@dataclass
class InferenceSettings:
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 32
    num_workers: int = 1

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        """``auto``: fp16 autocast on GPUs and on CPUs that run it natively, else fp32.

        fp16 keeps 10 mantissa bits and stays faithful (cosine to fp32 >= 0.9998 on real tiles);
        bf16's 7 bits are not (MobileNetV2 features: cosine down to 0.97), so bf16 is opt-in only.
        """
        if self.precision == "fp32":
            return None
        if self.precision == "auto":
            if device.type == "cuda" or (device.type == "cpu" and cpu_supports(torch.float16)):
                return torch.float16
            return None
        return torch.float16 if self.precision == "fp16" else torch.bfloat16

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


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Eval mode on ``device`` in channels_last, the layout oneDNN and cuDNN run fastest."""
    return model.to(device).eval().to(memory_format=torch.channels_last)


def embed_batch(model: torch.nn.Module, x: torch.Tensor, device: torch.device,
                amp: torch.dtype | None) -> np.ndarray:
    """Forward one batch (already prepared model) and return float32 embeddings on the CPU."""
    xb = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        return model(xb).float().cpu().numpy()


def iter_embeddings(model: torch.nn.Module, dataset: TileBlocks, settings: InferenceSettings,
                    min_valid: float, progress: object | None = None) -> Iterator[EmbeddedChunk]:
    """Embed every tile whose valid share is at least ``min_valid``; yield per batch."""
    device = settings.torch_device()
    amp = settings.autocast_dtype(device)
    model = prepare_model(model, device)
    workers = min(settings.num_workers, len(dataset))
    loader = DataLoader(
        dataset,
        batch_size=None,  # each item is already a batch, read as one block
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
    try:
        for idx, x, vt, vc in _one_line_errors(loader):
            idx, vt, vc = np.asarray(idx), np.asarray(vt, dtype=np.float32), np.asarray(vc, dtype=np.float32)
            kept = vt >= min_valid - 1e-9
            emb = np.empty((0, 0), dtype=np.float32)
            if kept.any():
                emb = embed_batch(model, x if kept.all() else x[torch.from_numpy(kept)], device, amp)  # keeps pinning
            if progress is not None:
                progress.update(len(idx))  # type: ignore[attr-defined]
            yield EmbeddedChunk(idx, vt, vc, kept, emb)
    finally:
        dataset.close()
