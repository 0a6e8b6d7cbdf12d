"""Region polygons: loading, repair, reprojection, and each stride cell's share of each region.

Areas are computed in an equal-area CRS (Lambert azimuthal equal-area centred on the regions),
never in the raster's or the output's CRS.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
import shapely.affinity
from pyproj import CRS, Transformer
from pyproj.exceptions import CRSError

from .config import Regions, earth_crs_problem
from .errors import RegionError

log = logging.getLogger(__name__)


def _parse_crs(text: str, where: str) -> CRS:
    try:
        return CRS.from_user_input(text)
    except CRSError:
        raise RegionError(f"{where}: cannot understand CRS {text!r}") from None


def load_regions(spec: Regions, where: str = "regions") -> gpd.GeoDataFrame:
    """Read region polygons as columns ``region_id``, ``region_name``, ``geometry``.

    Invalid polygons are repaired with ``make_valid`` (and reported); non-polygon parts dropped.
    """
    if spec.wkt is not None:
        try:
            geom = shapely.from_wkt(spec.wkt)
        except shapely.errors.GEOSException as exc:
            raise RegionError(f"{where}.wkt: not valid WKT: {exc}") from None
        if spec.crs is None:
            raise RegionError(f"{where}.crs: a region given as WKT needs a 'crs' (e.g. EPSG:4326)")
        gdf = gpd.GeoDataFrame({"region_id": ["1"], "region_name": ["region"]}, geometry=[geom],
                               crs=_parse_crs(spec.crs, f"{where}.crs"))
        name = f"{where}.wkt"
    else:
        path = Path(spec.path)  # type: ignore[arg-type]
        name = str(path)
        if not path.exists():
            raise RegionError(f"{path}: region file not found")
        try:
            import pyogrio  # only region files need OGR; WKT regions do not

            gdf = pyogrio.read_dataframe(path, layer=spec.layer, where=spec.where)
        except Exception as exc:  # pyogrio raises several DataSource/field errors
            raise RegionError(f"{path}: cannot read region file: {str(exc).splitlines()[0]}") from None
        if len(gdf) == 0:
            raise RegionError(f"{path}: region file holds no features")
        if gdf.crs is None:
            if spec.crs is None:
                raise RegionError(f"{path}: region file has no CRS (add a .prj, or set regions.crs)")
            gdf = gdf.set_crs(_parse_crs(spec.crs, f"{where}.crs"))
        elif spec.crs is not None:
            gdf = gdf.set_crs(_parse_crs(spec.crs, f"{where}.crs"), allow_override=True)
        for fld in (spec.id_field, spec.name_field):
            if fld is not None and fld not in gdf.columns:
                raise RegionError(f"{path}: field {fld!r} not found (fields: {', '.join(map(str, gdf.columns[:-1]))})")
        ids = gdf[spec.id_field].astype(str) if spec.id_field else pd.Series(
            [str(i + 1) for i in range(len(gdf))], index=gdf.index)
        names = gdf[spec.name_field].where(gdf[spec.name_field].notna(), ids).astype(str) if spec.name_field else ids
        gdf = gpd.GeoDataFrame({"region_id": ids.values, "region_name": names.values},
                               geometry=gdf.geometry.values, crs=gdf.crs)
    problem = earth_crs_problem(CRS.from_user_input(gdf.crs))
    if problem:
        raise RegionError(f"{name}: its CRS {problem}; reproject the regions, or set the right one as regions.crs")
    empty = (gdf.geometry.isna() | gdf.geometry.is_empty).to_numpy()
    if empty.all():
        raise RegionError(f"{name}: every region geometry is empty")
    if empty.any():
        ids = gdf.loc[empty, "region_id"].astype(str).tolist()
        log.warning("%s: %d region(s) without geometry (NULL or empty) left out of every number: %s%s", name,
                    len(ids), ", ".join(ids[:10]), f" and {len(ids) - 10} more" if len(ids) > 10 else "")
    gdf = gdf[~empty].reset_index(drop=True)
    invalid = ~gdf.geometry.is_valid
    if invalid.any():
        log.warning("%s: repaired %d invalid polygon(s) with make_valid: %s", name, int(invalid.sum()),
                    ", ".join(gdf.loc[invalid, "region_id"].astype(str).head(10)))
        fixed = shapely.make_valid(gdf.geometry.values[invalid.values])
        gdf.loc[invalid, "geometry"] = [_polygonal(g) for g in fixed]
    gdf["geometry"] = [_polygonal(g) for g in gdf.geometry.values]
    kinds = set(gdf.geometry.geom_type)
    if not kinds <= {"Polygon", "MultiPolygon"}:
        raise RegionError(f"{name}: regions must be polygons, found {sorted(kinds)}")
    if gdf["region_id"].duplicated().any():
        dup = gdf.loc[gdf["region_id"].duplicated(), "region_id"].iloc[0]
        raise RegionError(f"{name}: region id {dup!r} is not unique (choose another regions.id_field)")
    return gdf


def _polygonal(geom: shapely.Geometry) -> shapely.Geometry:
    """Keep only the polygon parts of a geometry (make_valid can return collections)."""
    if geom.geom_type in ("Polygon", "MultiPolygon"):
        return geom
    if geom.geom_type == "GeometryCollection":
        parts = [g for g in shapely.get_parts(geom) if g.geom_type in ("Polygon", "MultiPolygon")]
        return shapely.union_all(parts) if parts else shapely.Polygon()
    return geom


def load_all_regions(specs: list[Regions]) -> gpd.GeoDataFrame:
    """Regions from several sources in one frame (CRS of the first); ids prefixed by source when several.

    A region id met twice (the same file listed twice, two files of one name holding the same ids)
    would count its ground twice: an error naming both sources.
    """
    frames: list[gpd.GeoDataFrame] = []
    first_seen: dict[str, str] = {}
    for i, spec in enumerate(specs):
        where = f"regions[{i}]" if len(specs) > 1 else "regions"
        gdf = load_regions(spec, where=where)
        source = Path(spec.path).stem if spec.path is not None else f"wkt{i}"
        if len(specs) > 1:
            gdf["region_id"] = source + ":" + gdf["region_id"]
        here = f"{where} ({spec.path if spec.path is not None else 'wkt'})"
        clash = [rid for rid in gdf["region_id"] if rid in first_seen]
        if clash:
            raise RegionError(f"{here}: region id {clash[0]!r} is also in {first_seen[clash[0]]} ({len(clash)} ids "
                              "met twice; list each region source once, or rename one of two files of one name)")
        first_seen.update(dict.fromkeys(gdf["region_id"], here))
        gdf.insert(2, "source", source)
        frames.append(gdf if not frames else gdf.to_crs(frames[0].crs))
    return gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=frames[0].crs)


#: ``source`` of the regions a pipeline without ``regions`` makes: each raster's extent.
FOOTPRINT_SOURCE = "rasters"


def footprint_regions(rasters: Sequence[tuple[Path, CRS, tuple[float, float, float, float]]]) -> gpd.GeoDataFrame:
    """Regions for a pipeline without ``regions``: each raster's extent ((path, CRS, bounds) of every file), in
    the first raster's CRS, as :func:`load_all_regions` gives them.

    The extent, not the valid footprint: its edges are exact (the box in the raster's own CRS, densified
    where it is reprojected), so the regions' areas are true; where a raster holds no imagery (a nodata
    collar, alpha) its region's ``valid_fraction`` says so. Ids are the files' paths relative to the folder
    they share (unique), names their file names. Where rasters overlap, their regions do too: each
    region's numbers cover all the ground inside it, counted once (the raster listed first wins).
    """
    if not rasters:
        raise RegionError("rasters: no raster to make regions of")
    paths = [Path(p).resolve() for p, _, _ in rasters]
    twice = next((p for i, p in enumerate(paths) if p in paths[:i]), None)
    if twice is not None:
        raise RegionError(f"rasters: {twice} is listed twice; list each raster once")
    common = Path(os.path.commonpath([p.parent for p in paths]))
    crs = rasters[0][1]
    geoms = [geometry_in(shapely.box(*bounds), src, crs, pieces=256) for _, src, bounds in rasters]
    return gpd.GeoDataFrame({"region_id": [p.relative_to(common).as_posix() for p in paths],
                             "region_name": [p.name for p in paths], "source": FOOTPRINT_SOURCE},
                            geometry=[_polygonal(g) for g in geoms], crs=crs)


def equal_area_crs(regions: gpd.GeoDataFrame) -> CRS:
    """A Lambert azimuthal equal-area CRS centred on the regions.

    The centre is the mean of the vertices as unit vectors on the sphere, so regions that cross
    the antimeridian are centred near 180 degrees (not at 0), and polar regions near their pole.
    """
    pts = shapely.get_coordinates(regions.to_crs(4326).geometry.values)
    pts = pts[np.isfinite(pts).all(axis=1)]
    if len(pts) > 20000:
        pts = pts[:: len(pts) // 20000 + 1]
    lon, lat = np.radians(pts[:, 0]), np.radians(pts[:, 1])
    v = np.array([np.mean(np.cos(lat) * np.cos(lon)), np.mean(np.cos(lat) * np.sin(lon)), np.mean(np.sin(lat))])
    if not len(pts) or np.linalg.norm(v) < 1e-9:  # regions all round the globe: any centre is equal-area
        lon_c = lat_c = 0.0
    else:
        lon_c = float(np.degrees(np.arctan2(v[1], v[0])))
        lat_c = float(np.degrees(np.arctan2(v[2], np.hypot(v[0], v[1]))))
    return CRS.from_proj4(f"+proj=laea +lat_0={lat_c:.6f} +lon_0={lon_c:.6f} +datum=WGS84 +units=m +no_defs")


#: Area units as people read them, each as a multiple of km².
AREA_UNITS = {"m²": 1e6, "ha": 100.0, "km²": 1.0}


def area_unit(km2: float) -> str:
    """m² below a hectare, ha below a km², km² above."""
    m2 = km2 * 1e6
    return "m²" if m2 < 1e4 else "ha" if m2 < 1e6 else "km²"


def common_area_unit(km2: Sequence[float]) -> str:
    """The one unit for areas shown side by side (the panels of a figure): the unit of their median."""
    return area_unit(float(np.median(km2))) if len(km2) else "km²"


def format_area(km2: float, unit: str | None = None) -> str:
    """An area as people read it, in ``unit`` (default :func:`area_unit`'s: 0.003 km² is 3,000 m²): whole m²,
    else two decimals, or three significant digits below 1 (0.0512 km² beside 12.30 km²)."""
    unit = unit or area_unit(km2)
    value = km2 * AREA_UNITS[unit]
    if unit == "m²":
        return f"{value:,.0f} m²"
    if value == 0 or value >= 1:
        return f"{value:,.2f} {unit}"
    return f"{value:,.{min(8, 2 - math.floor(math.log10(value)))}f} {unit}"


def _max_segment(crs: CRS) -> float:
    """Longest edge kept straight before reprojecting: 0.01 degree or 1 km in ``crs`` units.

    A cell or region edge is straight in its own CRS but curved in the equal-area CRS (parallels
    near a pole, EPSG:3857 far from the equator); densifying keeps the area exact to < 0.01 %.
    """
    if crs.is_geographic:
        return 0.01
    factor = crs.axis_info[0].unit_conversion_factor if crs.axis_info else 1.0
    return 1000.0 / (factor or 1.0)


def to_area_crs(geoms: np.ndarray, transformer: Transformer) -> np.ndarray:
    """Reproject shapely geometries with a pyproj transformer, densified first (see ``_max_segment``)."""
    src = transformer.source_crs
    if src is not None:
        geoms = shapely.segmentize(geoms, _max_segment(src))
    return shapely.transform(geoms, lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1])))


def area_m2(gdf: gpd.GeoDataFrame, crs: CRS) -> np.ndarray:
    """Equal-area m2 of each geometry of ``gdf`` (densified, so long straight edges stay exact)."""
    return shapely.area(to_area_crs(gdf.geometry.values, Transformer.from_crs(gdf.crs, crs, always_xy=True)))


def _jumps_antimeridian(geom: shapely.Geometry) -> bool:
    """True when an edge jumps more than 180 degrees of longitude away from the poles.

    A polar cap (Antarctica) closes along the pole with such an edge; that one is legitimate.
    """
    if geom.is_empty or geom.bounds[2] - geom.bounds[0] <= 180:
        return False
    for ring in shapely.get_rings(shapely.get_parts(geom)):
        xy = shapely.get_coordinates(ring)
        jump = np.abs(np.diff(xy[:, 0])) > 180
        polar = (np.abs(xy[:-1, 1]) > 89.999) & (np.abs(xy[1:, 1]) > 89.999)
        if (jump & ~polar).any():
            return True
    return False


def _split_antimeridian(geom: shapely.Geometry) -> shapely.Geometry:
    """A lon/lat polygon whose vertices jump across 180 degrees, cut into parts on either side.

    Reprojecting a region that crosses the antimeridian into lon/lat gives vertices near -180 and
    +180 joined by edges that run round the globe; unwrapping to [0, 360) and cutting at 180 fixes it.
    """
    if not _jumps_antimeridian(geom):
        return geom
    unwrapped = shapely.transform(geom, lambda xy: np.column_stack([np.where(xy[:, 0] < 0, xy[:, 0] + 360, xy[:, 0]),
                                                                    xy[:, 1]]))
    east = shapely.clip_by_rect(unwrapped, 0, -90, 180, 90)
    west = shapely.affinity.translate(shapely.clip_by_rect(unwrapped, 180, -90, 360, 90), xoff=-360)
    return _polygonal(shapely.make_valid(shapely.union(east, west)))


def regions_in_crs(regions: gpd.GeoDataFrame, crs: CRS,
                   bounds: tuple[float, float, float, float] | None = None) -> gpd.GeoDataFrame:
    """Regions reprojected to a raster's CRS, right across the antimeridian.

    In a geographic CRS, polygons that wrap are split at 180 degrees; when the raster itself
    extends past +-180 (longitudes 179..181), the regions are repeated 360 degrees east or west.
    """
    out = regions.to_crs(crs)
    if not crs.is_geographic:
        return out
    same = CRS.from_user_input(regions.crs) == crs  # not reprojected: the user's coordinates stand
    geoms = [g if same else _split_antimeridian(g) for g in out.geometry.values]
    if bounds is not None and (bounds[0] < -180 or bounds[2] > 180):
        shifts = [s for s, edge in ((360.0, bounds[2] > 180), (-360.0, bounds[0] < -180)) if edge]
        geoms = [shapely.union_all([g] + [shapely.affinity.translate(g, xoff=s) for s in shifts]) for g in geoms]
    return out.set_geometry(geoms, crs=out.crs)


def raster_extent_in(bounds: tuple[float, float, float, float], src_crs: CRS, dst_crs: CRS) -> shapely.Geometry:
    """A raster's extent (box in its CRS) as a polygon in ``dst_crs``, densified so edges stay true."""
    return geometry_in(shapely.box(*bounds), src_crs, dst_crs)


def geometry_in(geom: shapely.Geometry, src_crs: CRS, dst_crs: CRS, pieces: int = 64) -> shapely.Geometry:
    """``geom`` reprojected to ``dst_crs``, its edges first cut into ``pieces`` per extent width."""
    if src_crs == dst_crs or geom.is_empty:
        return geom
    minx, _, maxx, _ = geom.bounds
    dense = shapely.segmentize(geom, (maxx - minx) / pieces or 1.0)
    tr = Transformer.from_crs(src_crs, dst_crs, always_xy=True)
    out = shapely.transform(dense, lambda xy: np.column_stack(tr.transform(xy[:, 0], xy[:, 1])))
    return shapely.make_valid(out)


def cell_region_shares(cells: np.ndarray, regions: np.ndarray, to_area: Transformer,
                       covered: shapely.Geometry | None = None) -> pd.DataFrame:
    """Area (m2, equal-area) of each cell clipped to each region it meets.

    ``cells`` and ``regions`` are shapely polygons in the same (raster) CRS. ``covered`` is the
    area an earlier raster already counts (same CRS): it is cut out of every cell, so where
    rasters overlap a piece of ground is counted once, for the first raster listed.
    Returns columns ``cell`` (index into cells), ``region`` (index into regions), ``area_m2``.
    """
    tree = shapely.STRtree(cells)
    region_idx, cell_idx = tree.query(regions, predicate="intersects")
    if len(cell_idx) == 0:
        return pd.DataFrame({"cell": np.empty(0, int), "region": np.empty(0, int), "area_m2": np.empty(0)})
    pieces = shapely.intersection(cells[cell_idx], regions[region_idx])
    if covered is not None and not covered.is_empty:
        shapely.prepare(covered)
        touched = shapely.intersects(covered, pieces)
        pieces[touched] = shapely.difference(pieces[touched], covered)
    area = shapely.area(to_area_crs(pieces, to_area))
    keep = area > 0
    return pd.DataFrame({"cell": cell_idx[keep], "region": region_idx[keep], "area_m2": area[keep]})
