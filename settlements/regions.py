"""Region polygons: loading, repair, reprojection, and each stride cell's share of each region.

Areas are computed in an equal-area CRS (Lambert azimuthal equal-area centred on the regions),
never in the raster's or the output's CRS.
"""

from __future__ import annotations

import logging
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from pyproj import CRS, Transformer
from pyproj.exceptions import CRSError

from .config import Regions
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
    gdf = gdf[~(gdf.geometry.isna() | gdf.geometry.is_empty)].reset_index(drop=True)
    if len(gdf) == 0:
        raise RegionError(f"{name}: every region geometry is empty")
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
    """Regions from several sources in one frame (CRS of the first); ids prefixed by source when several."""
    frames = []
    for i, spec in enumerate(specs):
        gdf = load_regions(spec, where=f"regions[{i}]" if len(specs) > 1 else "regions")
        source = Path(spec.path).stem if spec.path is not None else f"wkt{i}"
        if len(specs) > 1:
            gdf["region_id"] = source + ":" + gdf["region_id"]
        gdf.insert(2, "source", source)
        frames.append(gdf if not frames else gdf.to_crs(frames[0].crs))
    return gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=frames[0].crs)


def equal_area_crs(regions: gpd.GeoDataFrame) -> CRS:
    """A Lambert azimuthal equal-area CRS centred on the regions' bounding box."""
    lon0, lat0, lon1, lat1 = regions.to_crs(4326).total_bounds
    lon_c = (lon0 + lon1) / 2 if lon1 - lon0 <= 180 else ((lon0 + lon1) / 2 + 180) % 360 - 180
    return CRS.from_proj4(f"+proj=laea +lat_0={(lat0 + lat1) / 2:.6f} +lon_0={lon_c:.6f} +datum=WGS84 +units=m")


def to_area_crs(geoms: np.ndarray, transformer: Transformer) -> np.ndarray:
    """Reproject shapely geometries with a pyproj transformer (vectorised over coordinates)."""
    return shapely.transform(geoms, lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1])))


def cell_region_shares(cells: np.ndarray, regions: np.ndarray, to_area: Transformer) -> pd.DataFrame:
    """Area (m2, equal-area) of each cell clipped to each region it meets.

    ``cells`` and ``regions`` are shapely polygons in the same (raster) CRS. Returns columns
    ``cell`` (index into cells), ``region`` (index into regions), ``area_m2``.
    """
    tree = shapely.STRtree(cells)
    region_idx, cell_idx = tree.query(regions, predicate="intersects")
    if len(cell_idx) == 0:
        return pd.DataFrame({"cell": np.empty(0, int), "region": np.empty(0, int), "area_m2": np.empty(0)})
    pieces = shapely.intersection(cells[cell_idx], regions[region_idx])
    area = shapely.area(to_area_crs(pieces, to_area))
    keep = area > 0
    return pd.DataFrame({"cell": cell_idx[keep], "region": region_idx[keep], "area_m2": area[keep]})
