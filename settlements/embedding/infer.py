"""Batched inference over tile windows: a DataLoader reads and resizes while the CNN runs."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

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


def to_model_input(tile: np.ndarray, size: int) -> torch.Tensor:
    """Scaled (3, h, w) tile in [0, 1] -> ImageNet-normalised (3, size, size) tensor."""
    t = torch.from_numpy(tile)
    if t.shape[-2:] != (size, size):
        t = F.interpolate(t[None], size=(size, size), mode="bilinear", align_corners=False,
                          antialias=t.shape[-1] > size)[0]
    return (t - IMAGENET_MEAN) / IMAGENET_STD


class TileWindows(Dataset):
    """Tiles of one raster by window; each worker opens its own dataset handle."""

    def __init__(self, info: RasterInfo, tiles: np.ndarray, cells: np.ndarray, input_size: int) -> None:
        self.info = info
        self.tiles = tiles  # (n, 4) col_off, row_off, width, height
        self.cells = cells  # (n, 4) likewise, the stride cell
        self.input_size = input_size
        self._src: rasterio.io.DatasetReader | None = None

    def __len__(self) -> int:
        return len(self.tiles)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_src": None}

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, float, float]:
        if self._src is None:
            self._src = rasterio.open(self.info.path)
        c, r, w, h = (int(v) for v in self.tiles[i])
        pixels, valid = read_tile(self._src, self.info, Window(c, r, w, h))
        cc, cr, cw, ch = (int(v) for v in self.cells[i])
        cell_valid = valid[cr - r: cr - r + ch, cc - c: cc - c + cw]
        return i, to_model_input(pixels, self.input_size), float(valid.mean()), float(cell_valid.mean())


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
        if self.precision == "fp32" or (self.precision == "auto" and device.type == "cpu"):
            return None
        if self.precision == "fp16":
            return torch.float16
        return torch.bfloat16


@dataclass
class EmbeddedChunk:
    """One batch's results: indices into the tile list, validity, and embeddings of kept tiles."""

    index: np.ndarray
    valid_tile: np.ndarray
    valid_cell: np.ndarray
    kept: np.ndarray
    embeddings: np.ndarray  # (kept.sum(), dim) float32


def iter_embeddings(model: torch.nn.Module, dataset: TileWindows, settings: InferenceSettings,
                    min_valid: float, progress: object | None = None) -> Iterator[EmbeddedChunk]:
    """Embed every tile whose valid share is at least ``min_valid``; yield per batch."""
    device = settings.torch_device()
    amp = settings.autocast_dtype(device)
    model = model.to(device).eval()
    loader = DataLoader(
        dataset,
        batch_size=settings.batch_size,
        num_workers=settings.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if settings.num_workers > 0 else None,
    )
    with torch.inference_mode(), _one_line_worker_errors():
        for idx, x, vt, vc in loader:
            vt_np = vt.numpy().astype(np.float32)
            kept = vt_np >= min_valid - 1e-9
            emb = np.empty((0, 0), dtype=np.float32)
            if kept.any():
                xb = x[torch.from_numpy(kept)].to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    emb = model(xb).float().cpu().numpy()
            if progress is not None:
                progress.update(len(idx))  # type: ignore[attr-defined]
            yield EmbeddedChunk(idx.numpy(), vt_np, vc.numpy().astype(np.float32), kept, emb)
