"""`settlements validate CONFIG`: check every input as the tile stage would, without any CNN work.

Opens each raster (CRS, geotransform, bands, data type, a few blocks read), loads the regions,
checks they overlap the imagery, converts the tile size to each raster's pixels and counts the
tiles a run would embed. Writes nothing; the first problem raises the same one-line error a run
would give.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import shapely
from pyproj import Transformer

from .config import PipelineConfig
from .embedding.backbones import check_backbone, resolve_weights
from .errors import ClusteringError, RegionError, WeightsError
from .pipeline import check_inputs, grid_table, raster_grid
from .rasters import compute_scaling, expand_inputs
from .regions import area_m2, equal_area_crs, regions_in_crs, to_area_crs


@dataclass(frozen=True)
class RasterCheck:
    """What a run would make of one raster."""

    path: str
    crs: str
    size: tuple[int, int]
    bands: tuple[int, ...]
    dtype: str
    tile_px: tuple[int, int]
    tiles: int
    regions_met: int
    overlap_km2: float


@dataclass
class ValidationReport:
    """The facts ``validate`` found; ``lines()`` is what the command prints."""

    config: str
    regions: int
    regions_km2: float
    weights: str
    rasters: list[RasterCheck] = field(default_factory=list)
    k: int = 0

    @property
    def tiles(self) -> int:
        return sum(r.tiles for r in self.rasters)

    def lines(self) -> list[str]:
        out = [f"{self.config}: ok",
               f"  regions: {self.regions} ({self.regions_km2:,.1f} km2)",
               f"  weights: {self.weights}"]
        for r in self.rasters:
            out.append(f"  {r.path}: {r.crs}, {r.size[0]} x {r.size[1]} px, bands {list(r.bands)} {r.dtype}, "
                       f"tile {r.tile_px[0]} x {r.tile_px[1]} px -> {r.tiles} tiles; "
                       f"meets {r.regions_met} region(s), {r.overlap_km2:,.2f} km2")
        out.append(f"  total: {self.tiles} tiles for k={self.k}")
        return out


def _weights_note(cfg: PipelineConfig) -> str:
    """Where the weights come from, once loaded into the backbone and its layer found (no forward pass)."""
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


def validate(cfg: PipelineConfig) -> ValidationReport:
    """Check the inputs of ``cfg`` as ``settlements tile`` would; raise the first problem found."""
    infos, regions = check_inputs(cfg)
    ea = equal_area_crs(regions)
    grids = [raster_grid(info, cfg) for info in infos]
    specs = [spec for _, spec in expand_inputs(cfg.rasters)]
    for info, spec in zip(infos, specs, strict=True):
        compute_scaling(info, spec)  # reads the scaling sample: all-nodata and damaged blocks show here
    report = ValidationReport(config=str(cfg.source), regions=len(regions),
                              regions_km2=float(area_m2(regions, ea).sum() / 1e6),
                              weights=_weights_note(cfg), k=cfg.clustering.k)
    for info, grid in zip(infos, grids, strict=True):
        table = grid_table(grid, info)
        bounds = (float(table["minx"].min()), float(table["miny"].min()),
                  float(table["maxx"].max()), float(table["maxy"].max()))
        reg = regions_in_crs(regions, info.crs, bounds).geometry.values
        extent = shapely.box(*bounds)
        met = shapely.intersects(reg, extent)
        overlap = shapely.intersection(reg[met], extent)
        tr = Transformer.from_crs(info.crs, ea, always_xy=True)
        km2 = float(shapely.area(to_area_crs(overlap, tr)).sum() / 1e6) if met.any() else 0.0
        n = len(grid)
        if cfg.tiling.clip_to_regions:
            cells = shapely.box(table["minx"], table["miny"], table["maxx"], table["maxy"])
            _, cell_idx = shapely.STRtree(cells).query(reg, predicate="intersects")
            n = len(set(cell_idx.tolist()))
        report.rasters.append(RasterCheck(
            path=str(info.path), crs=info.crs.to_string(), size=(info.width, info.height), bands=info.bands,
            dtype=info.dtype, tile_px=(grid.tile_w, grid.tile_h), tiles=n, regions_met=int(met.sum()),
            overlap_km2=km2))
    if not any(r.regions_met for r in report.rasters):
        where = ", ".join(str(r.path or "regions.wkt") for r in cfg.regions)
        raise RegionError(f"{where}: no region overlaps any input raster (check the CRS and extent)")
    if cfg.clustering.k > report.tiles:
        raise ClusteringError(f"clustering.k: k={cfg.clustering.k} exceeds the number of tiles ({report.tiles}); "
                              "lower k or use smaller tiles")
    return report
