"""The source imagery as the QGIS project shows it under the tiles, so labels can be checked against pixels.

The input rasters are grouped by what one mosaic can hold (CRS, dtype, bands, nodata, north-up). A
group of one file is shown as that file; a group of several as a GDAL VRT mosaic written beside the
outputs (:meth:`settlements.products.Outputs.imagery`). Paths are relative: the project's to the file
or VRT, the VRT's to its files (``relativeToVRT``), so a tree moved as a whole (inputs and outputs)
still opens. Each layer shows the pipeline's bands as red, green and blue (or grey), the alpha band as
transparency, stretched between the bounds of the pipeline's scaling: what the CNN was given.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import rasterio
from rasterio.enums import ColorInterp

from ..rasters import RasterInfo
from ..store import atomic_path
from .styles import raster_pipe

Bounds = tuple[float, float, float, float]

_GDAL_TYPES = {"uint8": "Byte", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32", "int32": "Int32",
               "float32": "Float32", "float64": "Float64"}


@dataclass(frozen=True)
class Imagery:
    """One imagery layer: its ``source`` (a file or a VRT, relative to the output folder), the bands shown as red,
    green and blue (or grey) and the alpha band (None: none) of that source, and the stretch of each band."""

    name: str
    source: str
    crs_wkt: str
    bounds: Bounds
    bands: tuple[int, ...]
    alpha: int | None
    low: tuple[float, ...]
    high: tuple[float, ...]
    files: tuple[RasterInfo, ...]  # of a VRT mosaic; empty for a file shown as it is

    def vrt(self, folder: Path) -> str:
        """The VRT mosaic of :attr:`files` (a VRT in ``folder``): the shown bands, then alpha, from each file."""
        infos = self.files
        xres = min(abs(i.affine.a) for i in infos)
        yres = min(abs(i.affine.e) for i in infos)
        minx, miny, maxx, maxy = self.bounds
        width, height = math.ceil((maxx - minx) / xres - 1e-6), math.ceil((maxy - miny) / yres - 1e-6)
        alpha_of = _alpha_bands(infos)
        out = [f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">',
               f"  <SRS>{escape(self.crs_wkt)}</SRS>",
               f"  <GeoTransform>{minx!r}, {xres!r}, 0, {maxy!r}, 0, {-yres!r}</GeoTransform>"]
        names = ["Red", "Green", "Blue"] if len(self.bands) == 3 else ["Gray"]
        shown = [*[(b, names[k]) for k, b in enumerate(infos[0].bands)], *([(None, "Alpha")] if self.alpha else [])]
        for k, (band, interp) in enumerate(shown, start=1):
            dtype = "Byte" if band is None and infos[0].dtype != "uint8" else _GDAL_TYPES[infos[0].dtype]
            out.append(f'  <VRTRasterBand dataType="{dtype}" band="{k}">')
            out.append(f"    <ColorInterp>{interp}</ColorInterp>")
            if band is not None and infos[0].nodata is not None:
                out.append(f"    <NoDataValue>{infos[0].nodata!r}</NoDataValue>")
            for info in infos:
                src_band = band if band is not None else alpha_of[info.path]
                b = info.extent
                dst = ((b[0] - minx) / xres, (maxy - b[3]) / yres, (b[2] - b[0]) / xres, (b[3] - b[1]) / yres)
                rel = Path(os.path.relpath(info.path, folder)).as_posix()
                out += ["    <SimpleSource>",
                        f'      <SourceFilename relativeToVRT="1">{escape(rel)}</SourceFilename>',
                        f"      <SourceBand>{src_band}</SourceBand>",
                        f'      <SrcRect xOff="0" yOff="0" xSize="{info.width}" ySize="{info.height}"/>',
                        '      <DstRect xOff="{:r}" yOff="{:r}" xSize="{:r}" ySize="{:r}"/>'.replace(":r", "!r")
                        .format(*dst),
                        "    </SimpleSource>"]
            out.append("  </VRTRasterBand>")
        out.append("</VRTDataset>")
        return "\n".join(out) + "\n"


def _alpha_bands(infos: tuple[RasterInfo, ...] | list[RasterInfo]) -> dict[Path, int]:
    """Each file's alpha band (1-based), for files that have one."""
    found = {}
    for info in infos:
        with rasterio.open(info.path) as src:
            interp = list(src.colorinterp)
        if ColorInterp.alpha in interp:
            found[info.path] = interp.index(ColorInterp.alpha) + 1
    return found


def imagery(infos: list[RasterInfo], folder: Path, vrt_path: Callable[[int], Path]) -> list[Imagery]:
    """The imagery layers of ``infos`` (the pipeline's rasters, scaled) for a project in ``folder``;
    ``vrt_path(k)``: where the k-th mosaic of several files goes."""
    groups: dict[tuple, list[RasterInfo]] = {}
    for info in infos:
        north_up = info.affine.e < 0
        key = (info.crs_wkt, info.dtype, info.bands, info.nodata) if north_up else (info.path,)
        groups.setdefault(key, []).append(info)
    layers: list[Imagery] = []
    mosaics = 0
    for members in groups.values():
        first = members[0]
        low = tuple(min(i.scale_low[k] for i in members) for k in range(len(first.bands)))
        high = tuple(max(i.scale_high[k] for i in members) for k in range(len(first.bands)))
        alpha = _alpha_bands(members[:1]).get(first.path)
        bounds = (min(i.extent[0] for i in members), min(i.extent[1] for i in members),
                  max(i.extent[2] for i in members), max(i.extent[3] for i in members))
        if len(members) == 1:
            rel = Path(os.path.relpath(first.path, folder)).as_posix()
            layers.append(Imagery(f"imagery: {first.path.name}", rel, first.crs_wkt, bounds, first.bands, alpha, low,
                                  high, ()))
            continue
        mosaics += 1
        vrt = vrt_path(mosaics)
        shown = tuple(range(1, len(first.bands) + 1))
        layers.append(Imagery(f"imagery: {len(members)} files", f"./{vrt.name}", first.crs_wkt, bounds, shown,
                              len(shown) + 1 if alpha else None, low, high, tuple(members)))
    return layers


def write_mosaics(layers: list[Imagery], stage: Path, folder: Path) -> list[Path]:
    """Write the VRT of every mosaic of ``layers`` into ``stage`` (a commit's staging folder), its paths relative
    to ``folder`` (the output folder it is renamed into); return the files written."""
    written = []
    for layer in layers:
        if layer.files:
            path = stage / Path(layer.source).name
            with atomic_path(path, suffix=".vrt") as tmp:
                tmp.write_text(layer.vrt(folder), encoding="utf-8")
            written.append(path)
    return written


def imagery_qml_body(layer: Imagery) -> str:
    """The raster style of an imagery layer: its bands as red, green and blue (or grey), stretched from the
    scaling's low to high value, the alpha band as transparency."""
    alpha = layer.alpha if layer.alpha is not None else -1

    def enhancement(tag: str, k: int) -> str:
        return (f"<{tag}><minValue>{layer.low[k]!r}</minValue><maxValue>{layer.high[k]!r}</maxValue>"
                f"<algorithm>StretchToMinimumMaximum</algorithm></{tag}>")

    if len(layer.bands) == 3:
        renderer = (f'<rasterrenderer type="multibandcolor" opacity="1" alphaBand="{alpha}" '
                    f'redBand="{layer.bands[0]}" greenBand="{layer.bands[1]}" blueBand="{layer.bands[2]}" '
                    f'nodataColor="">\n      <rasterTransparency/>\n      '
                    f'{enhancement("redContrastEnhancement", 0)}\n      {enhancement("greenContrastEnhancement", 1)}'
                    f'\n      {enhancement("blueContrastEnhancement", 2)}\n    </rasterrenderer>')
    else:
        renderer = (f'<rasterrenderer type="singlebandgray" opacity="1" alphaBand="{alpha}" '
                    f'grayBand="{layer.bands[0]}" gradient="BlackToWhite" nodataColor="">\n      '
                    f'<rasterTransparency/>\n      {enhancement("contrastEnhancement", 0)}\n    </rasterrenderer>')
    return raster_pipe(renderer)
