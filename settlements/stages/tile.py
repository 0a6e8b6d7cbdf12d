"""The tile stage: check the inputs, compute each raster's scaling, plan its tiles and their region shares.

Writes ``rasters.json`` (the checked, scaled rasters and the equal-area CRS), ``tiles.parquet`` (one
row per tile: windows, cell bounds, ground centre), ``regions.parquet`` and ``shares.parquet`` (each
tile's cell area per region). No torch here: ``settlements validate`` plans tiles with the same code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from pyproj import CRS, Transformer

from ..config import PipelineConfig, check_backbone_name, check_k
from ..errors import ConfigError, RegionError
from ..labels import parse_labels
from ..progress import counted
from ..rasters import RasterInfo, compute_scaling, inspect_raster, valid_footprint
from ..regions import (
    area_m2,
    cell_region_shares,
    equal_area_crs,
    footprint_regions,
    geometry_in,
    load_all_regions,
    raster_extent_in,
    regions_in_crs,
)
from ..store import Workspace, check_writable_dir, expand_inputs, write_atomic, write_json, write_table
from ..tiling import TileGrid, raster_grid, tile_plan

log = logging.getLogger(__name__)


def check_output_settings(cfg: PipelineConfig) -> None:
    """Output and work folders creatable, labels file readable: fail before any CNN work.

    (The output CRS is checked by the config itself.)
    """
    check_writable_dir(cfg.output_dir, "output.dir")
    check_writable_dir(cfg.work_dir, "output.work_dir")
    if cfg.labels_path.is_dir():
        raise ConfigError(f"labels: {cfg.labels_path} is a folder; expected the labels YAML file")
    if cfg.labels_path.exists():
        parse_labels(cfg.labels_path)  # a malformed labels file stops the run before any CNN work


def check_backbone_known(cfg: PipelineConfig) -> None:
    """``embedding.backbone`` names a torchvision classifier (the registry needs torchvision: imported here)."""
    from ..embedding.backbones import list_backbones

    check_backbone_name(cfg.embedding.backbone, list_backbones())


def check_inputs(cfg: PipelineConfig, backbone: bool = True) -> tuple[list[RasterInfo], gpd.GeoDataFrame]:
    """Open and check every raster and the regions (and the backbone's name, unless ``backbone`` is
    False); nothing is written."""
    if backbone:
        check_backbone_known(cfg)
    check_output_settings(cfg)
    infos = [inspect_raster(path, spec) for path, spec in expand_inputs(cfg.rasters)]
    if cfg.regions:
        regions = load_all_regions(cfg.regions)
    else:  # no regions given: each raster's extent is one
        regions = footprint_regions([(info.path, info.crs, info.extent) for info in infos])
    return infos, regions


def grid_of(info: RasterInfo, cfg: PipelineConfig) -> TileGrid:
    """Raster ``info``'s tile grid, in its pixels."""
    return raster_grid(cfg.tiling, info.width, info.height, info.pixel_w_m, info.pixel_h_m, info.path)


class EarlierRasters:
    """The ground that rasters listed before each raster hold imagery on (the first listed wins).

    Valid footprints, not extents: where an earlier scene is nodata (a collar, a cut-off corner) a
    later one still maps the ground. Footprints are traced once, and only of rasters that reach a
    later one; rasters in one CRS find their neighbours through a spatial index, so many files cost
    no more than a pass over them.
    """

    def __init__(self, infos: list[RasterInfo]) -> None:
        self.infos = infos
        self.crs = [info.crs for info in infos]  # parsed once
        groups: dict[str, list[int]] = {}
        for i, info in enumerate(infos):
            groups.setdefault(info.crs_wkt, []).append(i)
        self.groups = {wkt: (np.asarray(idx), shapely.STRtree([shapely.box(*infos[i].extent) for i in idx]))
                       for wkt, idx in groups.items()}
        self.footprints: dict[int, shapely.Geometry] = {}

    def near(self, r: int, here: shapely.Geometry) -> list[int]:
        """Rasters listed before ``r`` whose extent meets ``here`` (in ``r``'s CRS)."""
        wkt = self.infos[r].crs_wkt
        out = []
        for other, (idx, tree) in self.groups.items():
            if other == wkt:
                out += [int(e) for e in idx[tree.query(here, predicate="intersects")] if e < r]
            else:
                out += [int(e) for e in idx[idx < r]
                        if raster_extent_in(self.infos[e].extent, self.crs[e], self.crs[r]).intersects(here)]
        return sorted(out)

    def covered(self, r: int, bounds: tuple[float, float, float, float]) -> shapely.Geometry | None:
        """The ground earlier rasters hold imagery on, in raster ``r``'s CRS, near ``bounds``."""
        parts = []
        for e in self.near(r, shapely.box(*bounds)):
            if e not in self.footprints:
                self.footprints[e] = valid_footprint(self.infos[e])
                log.info("%s: valid footprint traced for overlap with later rasters", self.infos[e].path.name)
            parts.append(geometry_in(self.footprints[e], self.crs[e], self.crs[r]))
        return shapely.union_all(parts) if parts else None


class NearRegions:
    """Which regions may meet a raster: a spatial index of the regions, so that each of many rasters
    reprojects and intersects only the regions near it, not all of them (a thousand files with their
    thousand footprint regions, or census tracts of a country)."""

    def __init__(self, regions: gpd.GeoDataFrame) -> None:
        self.regions = regions
        self.crs = CRS.from_user_input(regions.crs)
        self.tree = shapely.STRtree(regions.geometry.values)

    def of(self, crs: CRS, bounds: tuple[float, float, float, float]) -> np.ndarray:
        """Indexes of the regions whose box meets the raster's extent (``bounds`` in ``crs``), with a margin;
        every region where the extent cannot be placed in the regions' CRS as a plain box (across 180 degrees,
        out of the projection's domain)."""
        every = np.arange(len(self.regions))
        try:
            box = raster_extent_in(bounds, crs, self.crs).bounds
        except Exception:  # noqa: BLE001 (PROJ's errors: out of the projection's domain)
            return every
        if not np.all(np.isfinite(box)) or (self.crs.is_geographic and (box[2] - box[0] > 180 or box[0] < -180
                                                                        or box[2] > 180)):
            return every
        mx, my = (box[2] - box[0]) * 0.01, (box[3] - box[1]) * 0.01
        found = self.tree.query(shapely.box(box[0] - mx, box[1] - my, box[2] + mx, box[3] + my))
        return np.sort(found)


@dataclass
class RasterTiles:
    """One raster's tiles: its grid, its tile table, the cells' region shares (``cell``: row of the table)
    and the number of grid cells that ``tiling.clip_to_regions`` left untiled (outside every region)."""

    grid: TileGrid
    table: pd.DataFrame
    shares: pd.DataFrame
    clipped: int


def raster_tiles(cfg: PipelineConfig, earlier: EarlierRasters, r: int, grid: TileGrid, regions: NearRegions,
                 ea: CRS) -> RasterTiles:
    """Raster ``r``'s cells, clipped to the regions when asked, with their ground centres and region shares."""
    info = earlier.infos[r]
    table = tile_plan(grid, info.affine)
    cells = shapely.box(*(table[c].to_numpy() for c in ("minx", "miny", "maxx", "maxy")))
    bounds = (float(table["minx"].min()), float(table["miny"].min()),
              float(table["maxx"].max()), float(table["maxy"].max()))
    near = regions.of(earlier.crs[r], info.extent)
    reg_r = regions_in_crs(regions.regions.iloc[near], earlier.crs[r], bounds)
    # overlapping rasters: the first listed wins where it holds imagery; later ones lose that ground
    covered = earlier.covered(r, bounds)
    to_ground = Transformer.from_crs(earlier.crs[r], ea, always_xy=True)
    shares = cell_region_shares(cells, reg_r.geometry.values, to_ground, covered)
    shares["region"] = near[shares["region"].to_numpy()]  # the index among every region
    n_cells = len(table)
    if cfg.tiling.clip_to_regions:
        table = table.iloc[np.unique(shares["cell"].to_numpy())]
        remap = pd.Series(np.arange(len(table)), index=table.index)
        shares["cell"] = remap.loc[shares["cell"]].to_numpy()
        table = table.reset_index(drop=True)
    # the cell centre on the ground (equal-area metres): where a tile is, whichever file holds it
    table["ground_x"], table["ground_y"] = to_ground.transform((table["minx"] + table["maxx"]).to_numpy() / 2,
                                                               (table["miny"] + table["maxy"]).to_numpy() / 2)
    return RasterTiles(grid, table, shares, n_cells - len(table))


def plan_tiles(cfg: PipelineConfig, infos: list[RasterInfo], regions: gpd.GeoDataFrame,
               ea: CRS) -> list[RasterTiles]:
    """Every raster's tiles and region shares, as a run makes them; raise when no region meets any
    raster or ``k`` exceeds the tiles. Tile-size errors come before any pixel is read."""
    grids = [grid_of(info, cfg) for info in infos]
    earlier = EarlierRasters(infos)
    near = NearRegions(regions)
    planned = [raster_tiles(cfg, earlier, r, grid, near, ea)
               for r, grid in enumerate(counted(grids, "tiling", "raster"))]
    if all(rt.shares.empty for rt in planned):
        where = ", ".join(str(r.path or "regions.wkt") for r in cfg.regions)
        raise RegionError(f"{where}: no region overlaps any input raster (check the CRS and extent)")
    if cfg.clustering.model is None:  # a model's clusters take any number of tiles: nothing is fitted
        check_k(cfg.clustering.k, sum(len(rt.table) for rt in planned))
    return planned


def tile(cfg: PipelineConfig, ws: Workspace) -> dict[str, int]:
    """Check inputs, compute scaling, build every raster's tile grid and cell-region shares; return counts."""
    specs = [spec for _, spec in expand_inputs(cfg.rasters)]
    infos, regions = check_inputs(cfg)
    ea = equal_area_crs(regions)
    regions["area_m2"] = area_m2(regions, ea)
    tables, shares_all = [], []
    next_id = clipped = 0
    for r, rt in enumerate(plan_tiles(cfg, infos, regions, ea)):
        table = rt.table
        table.insert(0, "raster", r)
        table.insert(0, "tile_id", np.arange(next_id, next_id + len(table), dtype=np.int64))
        shares = pd.DataFrame({"tile_id": table["tile_id"].to_numpy()[rt.shares["cell"].to_numpy()],
                               "region": rt.shares["region"].to_numpy(), "area_m2": rt.shares["area_m2"].to_numpy()})
        next_id += len(table)
        clipped += rt.clipped
        tables.append(table)
        shares_all.append(shares)
    shares = pd.concat(shares_all, ignore_index=True)
    tiles = pd.concat(tables, ignore_index=True)
    infos = [compute_scaling(info, spec) for info, spec in zip(infos, specs, strict=True)]
    counts = {"tiles": len(tiles), "rasters": len(infos), "regions": len(regions), "cells_clipped": clipped,
              "tiles_outside_regions": int((~tiles["tile_id"].isin(shares["tile_id"])).sum())}
    write_json(ws.out(ws.rasters), {"equal_area_crs": ea.to_wkt(), "rasters": [i.to_json() for i in infos],
                                    "counts": counts})
    write_table(ws.out(ws.tiles), tiles)
    write_atomic(ws.out(ws.regions), lambda p: regions.assign(region=np.arange(len(regions))).to_parquet(p))
    write_table(ws.out(ws.shares), shares)
    log.info("tiling: %d tiles over %d raster(s), %d region(s)", len(tiles), len(infos), len(regions))
    return counts
