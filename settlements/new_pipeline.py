"""``settlements init RASTER... [--regions FILE] [-o pipelines/NAME.yaml]``: a pipeline written from the rasters.

Each raster is opened and checked as a run would (:func:`settlements.rasters.inspect_raster`): its CRS,
its pixel measured on the ground, its bands (red, green and blue where the file says which; an alpha
band or nodata noticed, never read as content) and a scaling chosen from its dtype and a sample of its
pixels (:func:`settlements.rasters.compute_scaling`). The tile size is a ground length that suits the
coarsest pixel, k suits the tile count (:func:`settlements.tiling.raster_grid`). The YAML is written
with a comment beside every choice, checked by :func:`settlements.validate.validate` before anything
is written, and put in place atomically; an existing file is replaced only when asked.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from rasterio.enums import ColorInterp, MaskFlags

from .config import Length, PipelineConfig, RasterInput, Scaling, Tiling, resolve_paths
from .errors import ConfigError, RegionError
from .rasters import RasterInfo, compute_scaling, inspect_raster, open_raster
from .store import atomic_path, expand_inputs
from .tiling import raster_grid
from .validate import ValidationReport, validate

#: The ground a tile covers, in metres, for the finest and the coarsest imagery: at least a few roofs on a
#: drone image (5 m), at most a block of houses on a satellite image (160 m) unless its pixels are coarser.
TILE_MIN_M, TILE_MAX_M = 5.0, 160.0
#: Pixels a tile should hold: the shipped pipelines use 32 on fine imagery, 8 on Landsat.
TILE_PX, TILE_MIN_PX, TILE_MAX_PX = 32, 8, 96
#: The number of clusters when the tiles allow it (the shipped pipelines use 4 to 8).
DEFAULT_K = 8

_NAME = re.compile(r"[^A-Za-z0-9_\-]+")


@dataclass(frozen=True)
class RasterChoice:
    """One ``rasters`` entry and why: the settings chosen for a file (or glob) and the facts behind them."""

    path: str  # as given: a file or a glob
    spec: RasterInput
    info: RasterInfo  # of its first file
    files: int
    count: int
    interp: tuple[str, ...]
    alpha: bool
    masked: bool
    notes: tuple[str, ...]


def pipeline_name(path: Path) -> str:
    name = _NAME.sub("_", path.name.split(".")[0]).strip("_")
    return name or "pipeline"


def default_target(rasters: list[str]) -> Path:
    """``pipelines/<first raster's name>.yaml``."""
    return Path("pipelines") / f"{pipeline_name(Path(rasters[0].replace('*', '')))}.yaml"


def suggested_tile_m(pixel_m: float) -> float:
    """A tile side in ground metres for pixels of ``pixel_m``: :data:`TILE_PX` pixels, kept between
    :data:`TILE_MIN_M` and :data:`TILE_MAX_M` when that still gives :data:`TILE_MIN_PX` to :data:`TILE_MAX_PX`
    pixels, rounded to two significant digits."""
    side = TILE_PX * pixel_m
    side = min(side, max(TILE_MAX_M, TILE_MIN_PX * pixel_m))
    side = max(side, min(TILE_MIN_M, TILE_MAX_PX * pixel_m))
    digits = 1 - math.floor(math.log10(side))
    return round(side, digits)


def suggested_k(tiles: int) -> int:
    """:data:`DEFAULT_K`, or fewer where the tiles are few (about 20 tiles a cluster, at least 2)."""
    return max(2, min(DEFAULT_K, tiles // 20))


def _bands(interp: tuple[str, ...]) -> tuple[list[int], str]:
    """The red, green and blue bands (1-based) and a note on how they were found."""
    where = {name: interp.index(name) + 1 for name in ("red", "green", "blue") if name in interp}
    content = [i + 1 for i, name in enumerate(interp) if name != "alpha"]
    if len(where) == 3:
        return [where["red"], where["green"], where["blue"]], "red, green, blue as the file names them"
    if len(content) >= 3:
        return content[:3], (f"{len(content)} bands, not named red, green and blue: check which are (Landsat 7: "
                             "[3, 2, 1]; Sentinel-2: B4, B3, B2)")
    return content[:1], "one band of imagery: read as greyscale"


def _scaling(info: RasterInfo, spec: RasterInput) -> tuple[Scaling, str]:
    """``dtype`` for 8-bit imagery that spans most of its range (aerial and drone photos: their colours kept);
    else the 2-98 percentile stretch (dark 8-bit scenes, 16-bit reflectance, floats)."""
    measured = compute_scaling(info, spec)
    lo, hi = max(measured.scale_low), min(measured.scale_high)
    span = ", ".join(f"{a:g}..{b:g}" for a, b in zip(measured.scale_low, measured.scale_high, strict=True))
    if info.dtype == "uint8" and hi - lo >= 128:
        return Scaling(method="dtype"), f"uint8 spanning {span} (2-98 %): divided by 255, colours kept"
    return Scaling(), f"{info.dtype}, 2-98 % of each band at {span}: stretched to 0..1"


def choose_raster(path: str) -> RasterChoice:
    """The ``rasters`` entry for ``path`` (a file or a glob whose files share its band layout)."""
    files = [p for p, _ in expand_inputs([RasterInput(path=Path(path))])]
    with open_raster(files[0]) as src:
        count, dtypes = src.count, src.dtypes
        interp = tuple(ci.name for ci in src.colorinterp)
        masked = any(MaskFlags.per_dataset in flags and MaskFlags.alpha not in flags for flags in src.mask_flag_enums)
    for other in files[1:]:
        with open_raster(other) as src:
            if (src.count, src.dtypes) != (count, dtypes):
                raise ConfigError(f"{other}: {src.count} band(s) of {src.dtypes[0]}, unlike {files[0].name} ({count} "
                                  f"of {dtypes[0]}); name files that differ separately")
    alpha = ColorInterp.alpha.name in interp
    bands, band_note = _bands(interp)
    spec = RasterInput(path=Path(path), bands=bands)
    info = inspect_raster(files[0], spec)
    scaling, scale_note = _scaling(info, spec)
    notes = [f"bands {bands}: {band_note}", f"scaling: {scale_note}"]
    if alpha:
        notes.append(f"band {interp.index('alpha') + 1} is alpha: read as the validity mask")
    if info.nodata is not None:
        notes.append(f"nodata {info.nodata:g} (the file's): such pixels are no imagery")
    if masked:
        notes.append("an internal mask: masked pixels are no imagery")
    return RasterChoice(path, spec.model_copy(update={"scaling": scaling}), info, len(files), count, interp, alpha,
                        masked, tuple(notes))


def _region_fields(path: Path) -> tuple[int, str | None, str | None, list[str]]:
    """The features of a region file, a unique id field and a name field where one is clear, and every field
    (the file itself is checked by ``validate``, as a run reads it)."""
    import pyogrio

    if not path.is_file():
        raise RegionError(f"{path}: region file not found")
    try:
        frame = pyogrio.read_dataframe(path, read_geometry=False)
    except Exception as exc:  # pyogrio's DataSource and field errors
        raise RegionError(f"{path}: cannot read region file: {str(exc).splitlines()[0]}") from None
    fields = [str(c) for c in frame.columns]
    unique = [c for c in fields if frame[c].notna().all() and frame[c].is_unique]
    id_field = next((c for c in unique if re.search(r"(^|_)(id|code|geocodi?)($|_)|^fid$", c, re.I)), None)
    text = [c for c in fields if pd.api.types.is_string_dtype(frame[c]) or frame[c].dtype == object]
    name_field = next((c for c in text if re.search(r"name|nome|^nm_|_nm$", c, re.I)), None)
    return len(frame), id_field, name_field, fields


def _relative(path: Path, folder: Path) -> str:
    return Path(os.path.relpath(Path(path).absolute(), folder.absolute())).as_posix()


def _flow(value: Any) -> str:
    """``value`` as YAML on one line (a scalar without PyYAML's document end marker)."""
    return yaml.safe_dump([value], default_flow_style=True, width=1000, sort_keys=False).strip()[1:-1]


@dataclass
class InitReport:
    """What ``settlements init`` wrote and what ``validate`` then found."""

    path: Path
    text: str
    validation: ValidationReport

    def lines(self) -> list[str]:
        return [f"wrote {self.path}", *self.validation.lines()[1:], f"next: settlements run {self.path}"]


def pipeline_text(target: Path, choices: list[RasterChoice], regions: Path | None, tile_m: float, tile_note: str,
                  k: int, k_note: str) -> str:
    """The commented YAML of the pipeline (paths relative to ``target``'s folder, as the loader reads them)."""
    folder = target.parent
    n = sum(c.files for c in choices)
    out = [f"# {pipeline_name(target)}: written by `settlements init` from {n} raster file(s). Every key not given",
           "# takes its default (docs/reference/configuration.md). Check the choices below, then",
           f"#   settlements validate {target}", f"#   settlements run {target}", "rasters:"]
    for c in choices:
        i = c.info
        glob = f" (and {c.files - 1} more file(s) like it)" if c.files > 1 else ""
        out.append(f"  # {i.path.name}{glob}: {i.crs.name} ({i.crs.to_string()}),")
        out.append(f"  #   {i.width} x {i.height} px of {i.pixel_w_m:.3g} x {i.pixel_h_m:.3g} m on the ground, "
                   f"{c.count} band(s) {i.dtype} ({', '.join(c.interp)})")
        out += [f"  #   {note}" for note in c.notes]
        out.append(f"  - path: {_flow(_relative(Path(c.path), folder))}")
        out.append(f"    bands: {_flow(list(c.spec.bands))}")
        s = c.spec.scaling
        scaling = {"method": s.method} if s.method == "dtype" else {"method": s.method, "low": s.low, "high": s.high}
        out.append(f"    scaling: {_flow(scaling)}")
    if regions is None:
        out += ["# regions: none given, so each raster's extent is a region (its histograms in the GeoPackage's",
                "# `regions` layer); to count per district or census tract, give a polygon file:",
                "#   regions: {path: districts.gpkg, id_field: code, name_field: name}"]
    else:
        n_regions, id_field, name_field, fields = _region_fields(regions)
        listed = ", ".join(fields[:12]) + (f" and {len(fields) - 12} more" if len(fields) > 12 else "")
        out += [f"# {n_regions} region(s) in {regions.name}; fields: {listed or 'none'}",
                "regions:", f"  path: {_flow(_relative(regions, folder))}",
                f"  id_field: {_flow(id_field)}" + ("" if id_field else "    # null: 1, 2, 3, ... in file order"),
                f"  name_field: {_flow(name_field)}" + ("" if name_field else "    # null: the id")]
    out += ["tiling:", f"  tile_size: {tile_m:g}m    # {tile_note}", "clustering:", f"  k: {k}    # {k_note}"]
    return "\n".join(out) + "\n"


def init_pipeline(rasters: list[str], regions: Path | None = None, target: Path | None = None,
                  force: bool = False) -> InitReport:
    """Write a pipeline for ``rasters`` (files or globs) to ``target`` (default :func:`default_target`), checked
    first as ``settlements validate --no-weights`` checks it; raise :class:`ConfigError` for an existing file
    unless ``force``."""
    if not rasters:
        raise ConfigError("init: name at least one raster")
    target = Path(target) if target is not None else default_target(rasters)
    if target.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"{target}: a pipeline is a .yaml file")
    if target.exists() and not force:
        raise ConfigError(f"{target}: exists; use --force to replace it")
    if target.is_dir():
        raise ConfigError(f"{target}: is a folder")
    choices = [choose_raster(p) for p in rasters]
    coarsest = max(choices, key=lambda c: max(c.info.pixel_w_m, c.info.pixel_h_m)).info
    pixel = max(coarsest.pixel_w_m, coarsest.pixel_h_m)
    tile_m = suggested_tile_m(pixel)
    tiling = Tiling(tile_size=Length(value=tile_m, unit="m"))
    grids = [raster_grid(tiling, c.info.width, c.info.height, c.info.pixel_w_m, c.info.pixel_h_m, c.info.path)
             for c in choices]
    grid = grids[choices.index(next(c for c in choices if c.info is coarsest))]
    tiles = sum(len(g) * c.files for g, c in zip(grids, choices, strict=True))
    tile_note = (f"{grid.tile_w} x {grid.tile_h} px of {pixel:.3g} m, {grid.tile_w * coarsest.pixel_w_m:.4g} x "
                 f"{grid.tile_h * coarsest.pixel_h_m:.4g} m on the ground"
                 f"{' (the coarsest raster)' if len(choices) > 1 else ''}: what the CNN sees, the map's cell")
    k = suggested_k(tiles)
    k_note = f"kinds of place to look for, among about {tiles:,} tiles"
    text = pipeline_text(target, choices, regions, tile_m, tile_note, k, k_note)
    # the text as the loader will read it: validated before it is written
    data = yaml.safe_load(text)
    cfg = resolve_paths(PipelineConfig.model_validate({**data, "name": pipeline_name(target)}), target)
    report = validate(cfg, weights=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not force:  # appeared while this command was checking
        raise ConfigError(f"{target}: exists; use --force to replace it")
    with atomic_path(target, suffix=".yaml") as tmp:
        tmp.write_text(text, encoding="utf-8")
    return InitReport(target, text, report)

