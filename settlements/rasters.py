"""Opening input rasters: checks, band selection, scaling, validity masks.

Every function here reads by window; none loads a whole full-resolution raster.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
import rasterio.features
import rasterio.transform
import shapely
import shapely.geometry
from pyproj import CRS, Geod, Transformer
from pyproj.exceptions import CRSError, ProjError
from rasterio.enums import MaskFlags
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window

from .config import RasterInput, earth_crs_problem
from .errors import RasterError
from .store import Workspace, fingerprint, read_json
from .tiling import clip_window

log = logging.getLogger(__name__)

SUPPORTED_DTYPES = {"uint8", "uint16", "int16", "uint32", "int32", "float32", "float64"}


@dataclass(frozen=True)
class RasterInfo:
    """What the pipeline needs to know about one input raster, checked once."""

    path: Path
    crs_wkt: str
    transform: tuple[float, ...]
    width: int
    height: int
    dtype: str
    bands: tuple[int, ...]
    nodata: float | None
    pixel_w_m: float
    pixel_h_m: float
    fingerprint: str
    scale_low: tuple[float, ...] = field(default=())
    scale_high: tuple[float, ...] = field(default=())
    clipped: float = 0.0  # share of valid pixels beyond the scaling bounds (from the scaling sample)

    @property
    def crs(self) -> CRS:
        return CRS.from_wkt(self.crs_wkt)

    @property
    def affine(self) -> rasterio.Affine:
        return rasterio.Affine(*self.transform[:6])

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """(minx, miny, maxx, maxy) in the raster's CRS."""
        a = self.affine
        xs, ys = (a.c, a.c + a.a * self.width), (a.f, a.f + a.e * self.height)
        return min(xs), min(ys), max(xs), max(ys)

    def to_json(self) -> dict[str, object]:
        """As stored in the tile stage's ``rasters.json`` (read back by :func:`load_infos`)."""
        return {**dataclasses.asdict(self), "path": str(self.path)}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> RasterInfo:
        d = dict(data)
        d["path"] = Path(str(d["path"]))
        for k in ("transform", "bands", "scale_low", "scale_high"):
            d[k] = tuple(d[k])  # type: ignore[call-overload, arg-type]
        return cls(**d)  # type: ignore[arg-type]


def load_infos(ws: Workspace) -> list[RasterInfo]:
    """The rasters as the tile stage checked and scaled them (``rasters.json``)."""
    return [RasterInfo.from_json(d) for d in read_json(ws.rasters, "tile")["rasters"]]


class OpenRasters:
    """Datasets of ``infos`` opened on demand and kept open, at most ``limit`` at a time (the least
    recently used is closed first), so reading tiles from thousands of files never runs out of file
    handles. Pickles without its open handles (DataLoader workers open their own)."""

    def __init__(self, infos: list[RasterInfo], limit: int = 32) -> None:
        self.infos = infos
        self.limit = limit
        self._open: OrderedDict[int, rasterio.io.DatasetReader] = OrderedDict()

    def __getitem__(self, r: int) -> rasterio.io.DatasetReader:
        if r in self._open:
            self._open.move_to_end(r)
        else:
            self._open[r] = rasterio.open(self.infos[r].path)
            if len(self._open) > self.limit:
                self._open.popitem(last=False)[1].close()
        return self._open[r]

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()

    def __enter__(self) -> OpenRasters:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": OrderedDict()}


@contextmanager
def open_raster(path: Path) -> Iterator[rasterio.io.DatasetReader]:
    """Open a raster, turning GDAL's errors into one clear :class:`RasterError`."""
    if not path.exists():
        raise RasterError(f"{path}: raster file not found")
    if not path.is_file():
        raise RasterError(f"{path}: not a file")
    try:
        with warnings.catch_warnings():  # a missing geotransform is checked (and explained) by inspect_raster
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            src = rasterio.open(path)
    except (RasterioError, OSError, ValueError) as exc:
        msg = str(exc).split("\n")[0]
        if "not recognized as" in msg or "not recognised as" in msg:
            msg = "not a raster format GDAL can read"
        raise RasterError(f"{path}: cannot open raster: {msg}") from None
    try:
        yield src
    finally:
        src.close()


def _gdal_reason(exc: BaseException) -> str:
    """GDAL's own one-line reason behind a rasterio read error (rasterio's says 'see previous')."""
    cause = exc.__cause__ or exc.__context__
    text = str(cause if cause is not None else exc) or type(exc).__name__
    return text.splitlines()[0] if text.strip() else type(exc).__name__


def read_checked(src: rasterio.io.DatasetReader, bands: tuple[int, ...], window: Window | None,
                 masks: bool = False, out: np.ndarray | None = None,
                 out_shape: tuple[int, int, int] | None = None) -> np.ndarray:
    """``src.read`` (or ``read_masks``) that turns a failed read into one clear :class:`RasterError`.

    GDAL opens a truncated or corrupt GeoTIFF happily and fails only when a damaged block is read,
    so every pixel read goes through here. ``out``: a (bands, h, w) array to read into (any strides);
    ``out_shape``: read decimated (nearest) to that shape.
    """
    try:
        if masks:
            return src.read_masks(list(bands), window=window, out_shape=out_shape)
        return src.read(list(bands), window=window, out=out, out_shape=out_shape)
    except (RasterioError, OSError, ValueError) as exc:
        raise RasterError(f"{src.name}: cannot read pixels (truncated or corrupt file?): {_gdal_reason(exc)}") \
            from None


#: Cells on the long side of the grid a raster's valid footprint is traced on.
FOOTPRINT_CELLS = 1024


def only_imagery(src: rasterio.io.DatasetReader, info: RasterInfo) -> bool:
    """True where every pixel of the selected bands is imagery: no mask, alpha or nodata, not float (no NaN)."""
    plain = all(src.mask_flag_enums[b - 1] == [MaskFlags.all_valid] for b in info.bands)
    return plain and info.nodata is None and np.dtype(info.dtype).kind != "f"


def valid_footprint(info: RasterInfo, cells: int = FOOTPRINT_CELLS) -> shapely.Geometry:
    """Where ``info``'s selected bands hold imagery, as a polygon in its CRS.

    Its whole extent where no band has a mask, alpha or nodata (nothing is read); else traced on a
    decimated grid of at most ``cells`` a side (GDAL reads overviews where the file has them), so its
    edges are true to within one such cell.
    """
    a = info.affine
    with rasterio.open(info.path) as src:
        if only_imagery(src, info):
            return shapely.box(*rasterio.transform.array_bounds(info.height, info.width, a))
        step = max(1.0, max(info.width, info.height) / cells)
        h, w = max(1, round(info.height / step)), max(1, round(info.width / step))
        shape = (len(info.bands), h, w)
        data = read_checked(src, info.bands, None, out_shape=shape)
        valid = valid_pixels(read_checked(src, info.bands, None, masks=True, out_shape=shape), data, info.nodata)
    transform = a @ rasterio.Affine.scale(info.width / w, info.height / h)
    parts = [shapely.geometry.shape(g) for g, _ in rasterio.features.shapes(valid.view(np.uint8), mask=valid,
                                                                              transform=transform)]
    return shapely.union_all(parts) if parts else shapely.Polygon()


def check_readable(src: rasterio.io.DatasetReader, bands: tuple[int, ...]) -> None:
    """Read the first, middle and last blocks of the selected bands: catches most truncated files."""
    blocks = list(src.block_windows(bands[0]))
    picks = {0, len(blocks) // 2, len(blocks) - 1} if blocks else set()
    for i in sorted(picks):
        window = blocks[i][1]
        read_checked(src, bands, window)
        read_checked(src, bands, window, masks=True)


def earth_crs(path: Path, crs: rasterio.crs.CRS) -> CRS:
    """The raster's CRS, checked once (:func:`settlements.config.earth_crs_problem`)."""
    try:
        parsed = CRS.from_wkt(crs.to_wkt())
    except (CRSError, ProjError, ValueError) as exc:
        raise RasterError(f"{path}: cannot understand its CRS ({str(exc).splitlines()[0] if str(exc) else exc}); "
                          "assign one with gdal_edit.py -a_srs") from None
    problem = earth_crs_problem(parsed)
    if problem:
        raise RasterError(f"{path}: its CRS {problem}; assign a geographic or projected CRS with gdal_edit.py -a_srs")
    return parsed


def ground_pixel_size(crs: CRS, transform: rasterio.Affine, width: int, height: int) -> tuple[float, float]:
    """Ground metres of one pixel along x and y at the raster's centre, on its ellipsoid, in any CRS.

    Map units are not ground metres: EPSG:3857 stretches them by 1/cos(latitude), UTM far from its
    central meridian and polar stereographic away from their true-scale lines by a few per cent or
    more. Half a pixel is stepped each way from the centre along each axis, the ends are moved to
    lon/lat and measured geodesically, so ``tile_size: 240m`` is 240 m on the ground everywhere.
    """
    col, row = width / 2, height / 2
    cols = np.array([col - 0.5, col + 0.5, col, col])
    rows = np.array([row, row, row - 0.5, row + 0.5])
    xs, ys = rasterio.transform.xy(transform, rows, cols, offset="ul")
    geodetic = crs.geodetic_crs or CRS.from_epsg(4326)
    lon, lat = Transformer.from_crs(crs, geodetic, always_xy=True).transform(xs, ys, errcheck=False)
    geod = crs.get_geod() or Geod(ellps="WGS84")
    _, _, (w, h) = geod.inv(lon[0::2], lat[0::2], lon[1::2], lat[1::2])
    return float(w), float(h)


def inspect_raster(path: Path, spec: RasterInput) -> RasterInfo:
    """Check a raster is usable as configured; return its facts (without scaling yet)."""
    with open_raster(path) as src:
        if src.transform.is_identity and src.gcps[0]:
            raise RasterError(
                f"{path}: raster has ground control points but no geotransform "
                "(warp it first: gdalwarp -tps in.tif out.tif)"
            )
        if src.crs is None:
            raise RasterError(f"{path}: raster has no CRS (assign one with gdal_edit.py -a_srs)")
        crs = earth_crs(path, src.crs)
        if src.transform.is_identity:
            raise RasterError(f"{path}: raster has no geotransform (georeference it first)")
        if src.transform.b != 0 or src.transform.d != 0:
            raise RasterError(f"{path}: rotated geotransforms are not supported (warp it first)")
        bad = [b for b in spec.bands if b > src.count]
        if bad:
            raise RasterError(
                f"{path}: band {bad[0]} out of range (the raster has {src.count} band"
                f"{'s' if src.count != 1 else ''})"
            )
        for b in spec.bands:
            if src.dtypes[b - 1] not in SUPPORTED_DTYPES:
                raise RasterError(f"{path}: band {b}: data type {src.dtypes[b - 1]} is not supported "
                                  f"(use one of {', '.join(sorted(SUPPORTED_DTYPES))})")
        dtype = src.dtypes[spec.bands[0] - 1]
        if not all(math.isfinite(v) for v in tuple(src.transform)[:6]) or src.width < 1 or src.height < 1:
            raise RasterError(f"{path}: raster has an unusable geotransform or size")
        check_readable(src, tuple(spec.bands))
        pw, ph = ground_pixel_size(crs, src.transform, src.width, src.height)
        if not (math.isfinite(pw) and math.isfinite(ph) and pw > 0 and ph > 0):
            raise RasterError(f"{path}: cannot measure its pixels on the ground (is the CRS right for where it lies?)")
        nodata = spec.nodata if spec.nodata is not None else src.nodata
        return RasterInfo(
            path=path,
            crs_wkt=src.crs.to_wkt(),
            transform=tuple(src.transform)[:6],
            width=src.width,
            height=src.height,
            dtype=dtype,
            bands=tuple(spec.bands),
            nodata=None if nodata is None else float(nodata),
            pixel_w_m=pw,
            pixel_h_m=ph,
            fingerprint=fingerprint(path),
        )


def valid_mask(src: rasterio.io.DatasetReader, bands: tuple[int, ...], data: np.ndarray,
               window: Window, nodata: float | None) -> np.ndarray:
    """True where every selected band holds real imagery (not nodata, alpha 0, mask 0, NaN or inf)."""
    no_masks = all(src.mask_flag_enums[b - 1] == [MaskFlags.all_valid] for b in bands)
    # no mask, alpha or nodata: nothing to read
    return valid_pixels(None if no_masks else read_checked(src, bands, window, masks=True), data, nodata)


def valid_pixels(masks: np.ndarray | None, data: np.ndarray, nodata: float | None) -> np.ndarray:
    """True where every band is valid: GDAL mask > 0 (None: no masks), not ``nodata``, finite.

    NaN and +-inf are never imagery: they would poison percentiles and scale to nothing.
    """
    valid = np.ones(data.shape[1:], dtype=bool) if masks is None else np.all(masks > 0, axis=0)
    if nodata is not None:
        valid &= ~np.any(data == nodata, axis=0)
    if data.dtype.kind == "f":
        valid &= np.all(np.isfinite(data), axis=0)
    return valid


def _sample_windows(width: int, height: int, target_pixels: int, size: int = 256) -> list[Window]:
    """A regular lattice of windows spread over the raster, about ``target_pixels`` in total."""
    n = max(1, target_pixels // (size * size))
    side = max(1, int(math.sqrt(n)))
    out = []
    for i in range(side):
        for j in range(side):
            c = int((j + 0.5) * width / side - size / 2)
            r = int((i + 0.5) * height / side - size / 2)
            w = clip_window(Window(c, r, size, size), width, height)
            if w is not None:
                out.append(w)
    return out


def sample_valid_pixels(src: rasterio.io.DatasetReader, bands: tuple[int, ...], nodata: float | None,
                        target_pixels: int) -> np.ndarray:
    """Valid pixel values (n x bands) from a sample of the raster, for scaling statistics."""
    if src.width * src.height <= target_pixels:
        windows = [Window(0, 0, src.width, src.height)]
    else:
        windows = _sample_windows(src.width, src.height, target_pixels)
    chunks = []
    for w in windows:
        data = read_checked(src, bands, w)
        ok = valid_mask(src, bands, data, w, nodata)
        chunks.append(data[:, ok].T)
    return np.concatenate(chunks, axis=0) if chunks else np.empty((0, len(bands)))


def _strips(src: rasterio.io.DatasetReader, rows: int = 512) -> Iterator[Window]:
    """Full-width strips of ``rows`` rows: a whole-raster scan that never holds the raster in memory."""
    for r in range(0, src.height, rows):
        yield Window(0, r, src.width, min(rows, src.height - r))


def check_has_valid_pixels(info: RasterInfo) -> None:
    """Raise unless some pixel of the selected bands is valid: a small sample first, then a full scan."""
    with open_raster(info.path) as src:
        if len(sample_valid_pixels(src, info.bands, info.nodata, 1 << 16)):
            return
        for w in _strips(src):
            data = read_checked(src, info.bands, w)
            if valid_mask(src, info.bands, data, w, info.nodata).any():
                return
    raise RasterError(f"{info.path}: raster holds no valid pixels (all nodata, masked or non-finite)")


def _all_valid_pixels(src: rasterio.io.DatasetReader, bands: tuple[int, ...], nodata: float | None) -> np.ndarray:
    chunks = []
    for w in _strips(src):
        data = read_checked(src, bands, w)
        chunks.append(data[:, valid_mask(src, bands, data, w, nodata)].T)
    return np.concatenate(chunks, axis=0)


def _valid_sample(info: RasterInfo, target_pixels: int) -> np.ndarray:
    """Valid pixel values (n x bands) for scaling statistics: a sample, or a full scan where it finds none."""
    with open_raster(info.path) as src:
        px = sample_valid_pixels(src, info.bands, info.nodata, target_pixels)
    if len(px) == 0:
        check_has_valid_pixels(info)  # the sample missed them: scan, or fail with the clear error
        with open_raster(info.path) as src:
            px = _all_valid_pixels(src, info.bands, info.nodata)
    return px


#: Share of valid pixels beyond the scaling bounds above which a run warns: the CNN then sees flat tiles.
CLIPPED_WARN = 0.5
#: Pixels sampled to estimate that share for fixed bounds (range, dtype).
CLIP_SAMPLE = 1 << 16


def compute_scaling(info: RasterInfo, spec: RasterInput) -> RasterInfo:
    """Fill the per-band low/high values that map raw pixels onto [0, 1], and the share of pixels clipped.

    Statistics come from valid pixels only (finite, not nodata or masked). A scaling that cannot
    give the CNN an image is an error naming the band: ``dtype`` on a float raster (floats have no
    range of their own), a band whose percentiles coincide (constant), bounds with min >= max.
    """
    s = spec.scaling
    where = f"{info.path}: rasters.scaling"
    if s.method == "dtype" and np.dtype(info.dtype).kind == "f":
        raise RasterError(f"{where}: method 'dtype' needs an integer raster, this one is {info.dtype} "
                          "(use method 'percentile', or 'range' with the data's min and max)")
    # fixed bounds need pixels only for the share clipped: a small sample, as for the check that any is valid
    px = _valid_sample(info, s.sample_pixels if s.method == "percentile" else CLIP_SAMPLE)
    n = len(info.bands)
    if s.method == "range":
        lo = np.broadcast_to(np.asarray(s.min, dtype=float), (n,))
        hi = np.broadcast_to(np.asarray(s.max, dtype=float), (n,))
    elif s.method == "dtype":
        lo, hi = np.zeros(n), np.full(n, float(np.iinfo(info.dtype).max))
    else:
        lo = np.percentile(px, s.low, axis=0)
        hi = np.percentile(px, s.high, axis=0)
    for band, a, b in zip(info.bands, lo, hi, strict=True):
        if not b > a:
            what = (f"its percentiles {s.low:g} and {s.high:g} are both {a:g} (a constant band?); "
                    "use method 'range' with min and max" if s.method == "percentile"
                    else f"min {a:g} is not below max {b:g}")
            raise RasterError(f"{where}: band {band}: {what}")
    clipped = float(np.mean(np.any((px < lo) | (px > hi), axis=1))) if len(px) else 0.0
    return _replace(info, scale_low=tuple(float(v) for v in lo), scale_high=tuple(float(v) for v in hi),
                    clipped=clipped)


def clipping_warning(info: RasterInfo) -> str | None:
    """One line when most valid pixels lie beyond the scaling bounds (they all map to 0 or 1)."""
    if info.clipped <= CLIPPED_WARN:
        return None
    return (f"{info.path.name}: {info.clipped:.0%} of the valid pixels lie outside the scaling range "
            f"({_bounds_text(info)}) and are clipped; check rasters.scaling")


def _bounds_text(info: RasterInfo) -> str:
    return ", ".join(f"band {b}: {lo:g}..{hi:g}"
                     for b, lo, hi in zip(info.bands, info.scale_low, info.scale_high, strict=True))


def _replace(info: RasterInfo, **kw: object) -> RasterInfo:
    from dataclasses import replace

    return replace(info, **kw)  # type: ignore[arg-type]


def _bands_array(bands: int, h: int, w: int, dtype: str | np.dtype, pixel_interleaved: bool) -> np.ndarray:
    """Zeros shaped (bands, h, w), stored band by band or pixel by pixel (a transposed (h, w, bands))."""
    if pixel_interleaved:
        return np.zeros((h, w, bands), dtype=dtype).transpose(2, 0, 1)
    return np.zeros((bands, h, w), dtype=dtype)


def read_raw(src: rasterio.io.DatasetReader, info: RasterInfo, window: Window,
             pixel_interleaved: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Read a window's selected bands in the raster's own dtype (bands, h, w) plus its validity mask (h, w).

    Parts of the window beyond the raster edge are zeros and invalid. ``pixel_interleaved`` stores the
    bands of a pixel side by side (strides of an (h, w, bands) array): GDAL then copies a pixel-interleaved
    file's blocks as they are, and the tiles are already in the CNN's channels_last layout.
    """
    h, w = int(window.height), int(window.width)
    nb = len(info.bands)
    inner = clip_window(window, info.width, info.height)
    if inner is None:
        return _bands_array(nb, h, w, info.dtype, pixel_interleaved), np.zeros((h, w), dtype=bool)
    whole = (int(inner.height), int(inner.width)) == (h, w)
    buf = _bands_array(nb, int(inner.height), int(inner.width), info.dtype, pixel_interleaved) \
        if pixel_interleaved else None
    data = read_checked(src, info.bands, inner, out=buf)
    ok = valid_mask(src, info.bands, data, inner, info.nodata)
    if whole:
        return data, ok
    out = _bands_array(nb, h, w, data.dtype, pixel_interleaved)
    valid = np.zeros((h, w), dtype=bool)
    r0, c0 = int(inner.row_off - window.row_off), int(inner.col_off - window.col_off)
    sl = (slice(r0, r0 + int(inner.height)), slice(c0, c0 + int(inner.width)))
    out[(slice(None), *sl)] = data
    valid[sl] = ok
    return out, valid


def scale_pixels(raw: np.ndarray, valid: np.ndarray, info: RasterInfo) -> np.ndarray:
    """Raw (bands, h, w) pixels -> float32 (3, h, w) in [0, 1]; invalid pixels mid-grey, greyscale repeated."""
    lo = np.asarray(info.scale_low, dtype=np.float32)[:, None, None]
    hi = np.asarray(info.scale_high, dtype=np.float32)[:, None, None]
    out = np.clip((raw.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)
    out[:, ~valid] = 0.5
    if out.shape[0] == 1:
        out = np.repeat(out, 3, axis=0)
    return out


def read_tile(src: rasterio.io.DatasetReader, info: RasterInfo, window: Window) -> tuple[np.ndarray, np.ndarray]:
    """Read a tile window as scaled float32 (3, h, w) in [0, 1] plus its validity mask (h, w).

    Parts of the window beyond the raster edge are invalid. Greyscale is repeated to 3 channels.
    """
    raw, valid = read_raw(src, info, window)
    return scale_pixels(raw, valid, info), valid
