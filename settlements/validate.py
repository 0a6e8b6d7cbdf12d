"""`settlements validate CONFIG`: check every input as the tile stage would, without any CNN work.

Opens each raster (CRS, geotransform, bands, data type, a few blocks read), loads the regions,
checks they overlap the imagery, builds each raster's tiles as the tile stage does (the same
clipping to regions and overlap rules) and counts them, with the tiles a run will skip where that
is known without reading pixels, and checks the model files it names against its embeddings.
Writes nothing; the first problem raises the same one-line error a run would give. The tiles are
planned by the tile stage's own code (:mod:`settlements.stages.tile`); torch is imported only to check
the backbone and its weights (skipped with ``--no-weights``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import rasterio

from .config import PipelineConfig
from .errors import WeightsError
from .rasters import RasterInfo, clipping_warning, compute_scaling, only_imagery
from .regions import area_m2, equal_area_crs, format_area
from .stages.tile import check_inputs, grid_of, plan_tiles
from .store import expand_inputs


@dataclass(frozen=True)
class RasterCheck:
    """What a run would make of one raster."""

    path: str
    crs: str
    size: tuple[int, int]
    bands: tuple[int, ...]
    dtype: str
    tile_px: tuple[int, int]
    tile_m: tuple[float, float]  # the tile in ground metres, at the raster's centre
    tiles: int
    regions_met: int
    overlap_km2: float
    skips: int | None  # tiles a run will skip; None: known only once the pixels are read (nodata, masks)
    outside: int  # tiles outside every region (embedded, in no histogram)
    clipped: int  # grid cells outside every region, not tiled (tiling.clip_to_regions)


@dataclass
class ValidationReport:
    """The facts ``validate`` found; ``lines()`` is what the command prints."""

    config: str
    regions: int
    regions_km2: float
    weights: str
    rasters: list[RasterCheck] = field(default_factory=list)
    k: int = 0
    max_invalid: float = 0.5
    warnings: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)

    @property
    def tiles(self) -> int:
        return sum(r.tiles for r in self.rasters)

    def lines(self) -> list[str]:
        out = [f"{self.config}: ok",
               f"  regions: {self.regions} ({format_area(self.regions_km2)})",
               f"  weights: {self.weights}"]
        for r in self.rasters:
            skips = (f"{r.skips} to skip (over {self.max_invalid:.0%} beyond the raster edge)" if r.skips is not None
                     else "skips known only once read (nodata, mask or alpha)")
            extra = "".join([f"; {r.outside} outside every region" if r.outside else "",
                             f"; {r.clipped} grid cells outside the regions not tiled" if r.clipped else ""])
            out.append(f"  {r.path}: {r.crs}, {r.size[0]} x {r.size[1]} px, bands {list(r.bands)} {r.dtype}, "
                       f"tile {r.tile_px[0]} x {r.tile_px[1]} px ({metres(r.tile_m[0])} x {metres(r.tile_m[1])} m "
                       f"on the ground) -> {r.tiles} tiles; meets {r.regions_met} region(s), "
                       f"{format_area(r.overlap_km2)}; {skips}{extra}")
        known = sum(r.skips or 0 for r in self.rasters)
        unknown = sum(r.skips is None for r in self.rasters)
        tail = (f"; {unknown} raster(s) with nodata, masks or alpha skip more, known only once read" if unknown
                else "")
        out.append(f"  total: {self.tiles} tiles for k={self.k}; {known} will be skipped at raster edges{tail}")
        out.extend(f"  model: {m}" for m in self.models)
        out.extend(f"  warning: {w}" for w in self.warnings)
        return out


def metres(value: float) -> str:
    """A ground length to four significant digits (5.036, 80.03, 228.0, 1,000): a 65 px tile of 7.75 cm is
    5.036 m, not 5.0."""
    decimals = max(0, 3 - math.floor(math.log10(abs(value)))) if value else 0
    return f"{value:,.{decimals}f}"


def _weights_note(cfg: PipelineConfig) -> str:
    """Where the weights come from, once loaded into the backbone and its layer found (no forward pass).

    torch is imported here, for this check only.
    """
    from .embedding.backbones import check_backbone, resolve_weights

    e = cfg.embedding
    try:
        w = resolve_weights(e.backbone, e.weights, allow_download=False)
    except WeightsError:
        if e.weights is not None:
            raise
        node = check_backbone(e.backbone, e.layer, None)
        return f"{e.backbone} cut at {node}: none found offline; a run will try to download them"
    node = check_backbone(e.backbone, e.layer, w)
    return f"{e.backbone} cut at {node}, from {w.source} ({w.path.name})"


def model_checks(cfg: PipelineConfig, weights: bool, infos: list[RasterInfo], tables: list[pd.DataFrame]
                 ) -> tuple[list[str], list[str]]:
    """The model files the config names (``clustering.model``, ``training.model``): each read as data and
    checked against what makes these embeddings (the layer and weights too, unless ``weights`` is False:
    they need torch), raising what a run would; a line per file, and the warnings a run would give."""
    files = list(dict.fromkeys(f for f in (cfg.clustering.model, cfg.training.model if cfg.training else None) if f))
    lines: list[str] = []
    warnings: list[str] = []
    if not files:
        return lines, warnings
    from .transfer import check_embedding, embedder, ground_sizes, ground_warning, load_model, scalings

    tiles = pd.concat([t[["tile_w"]].assign(raster=r) for r, t in enumerate(tables)], ignore_index=True)
    for path in files:
        m = load_model(path)
        e = cfg.embedding
        if weights:
            from .embedding.backbones import resolve_layer, resolve_weights

            try:
                sha: str | None = resolve_weights(e.backbone, e.weights, allow_download=False).sha256
            except WeightsError:  # none offline: a run downloads them, and checks them then
                sha = None
            here = embedder(cfg, resolve_layer(e.backbone, e.layer), sha)
        else:  # the layer's name needs the backbone registry (torch): checked by a run
            here = embedder(cfg, m.header.embedding.layer)
        check_embedding(m, here)
        warning = ground_warning(m, *ground_sizes(infos, tiles), scalings(cfg))
        warnings += [warning] if warning else []
        lines.append(f"{path}: SHA-256 {m.sha256[:12]}..., made from embeddings like these")
    return lines, warnings


def edge_skips(info: RasterInfo, table: pd.DataFrame, min_valid: float) -> int | None:
    """Tiles a run will skip for lying too far beyond the raster's edge; None where pixels can be nodata.

    Without nodata, masks or alpha a tile's valid share is the share of its window inside the raster.
    """
    with rasterio.open(info.path) as src:
        if not only_imagery(src, info):
            return None
    c0, r0 = table["tile_col"].to_numpy(), table["tile_row"].to_numpy()
    w, h = table["tile_w"].to_numpy(), table["tile_h"].to_numpy()
    inside_w = np.clip(c0 + w, 0, info.width) - np.clip(c0, 0, info.width)
    inside_h = np.clip(r0 + h, 0, info.height) - np.clip(r0, 0, info.height)
    return int((inside_w * inside_h / (w * h) < min_valid - 1e-9).sum())


def validate(cfg: PipelineConfig, weights: bool = True) -> ValidationReport:
    """Check the inputs of ``cfg`` as ``settlements tile`` would; raise the first problem found.

    ``weights`` False leaves out the backbone (its name, weights and layer), and so torch.
    """
    infos, regions = check_inputs(cfg, backbone=weights)
    ea = equal_area_crs(regions)
    for info in infos:  # tile-size errors before any pixel is read
        grid_of(info, cfg)
    specs = [spec for _, spec in expand_inputs(cfg.rasters)]
    # reads the scaling sample: all-nodata and damaged blocks, and scalings that cannot work, show here
    scaled = [compute_scaling(info, spec) for info, spec in zip(infos, specs, strict=True)]
    report = ValidationReport(config=str(cfg.source), regions=len(regions),
                              regions_km2=float(area_m2(regions, ea).sum() / 1e6),
                              weights=_weights_note(cfg) if weights else "not checked (--no-weights)",
                              k=cfg.clustering.k, max_invalid=cfg.tiling.max_invalid_fraction,
                              warnings=[w for w in map(clipping_warning, scaled) if w])
    planned = plan_tiles(cfg, infos, regions, ea)
    report.models, found = model_checks(cfg, weights, infos, [rt.table for rt in planned])
    report.warnings += found
    for info, rt in zip(infos, planned, strict=True):
        grid = rt.grid
        report.rasters.append(RasterCheck(
            path=str(info.path), crs=info.crs.to_string(), size=(info.width, info.height), bands=info.bands,
            dtype=info.dtype, tile_px=(grid.tile_w, grid.tile_h),
            tile_m=(grid.tile_w * info.pixel_w_m, grid.tile_h * info.pixel_h_m), tiles=len(rt.table),
            regions_met=int(rt.shares["region"].nunique()), overlap_km2=float(rt.shares["area_m2"].sum() / 1e6),
            skips=edge_skips(info, rt.table, 1.0 - cfg.tiling.max_invalid_fraction),
            outside=int(len(rt.table) - rt.shares["cell"].nunique()), clipped=rt.clipped))
    return report
