"""The QGIS project (``.qgz``) beside the outputs: the cluster map, its layers and the analyst's, styled, in order.

The project XML is written here rather than by QGIS, so a run needs no QGIS installed. Each layer
embeds the style the GeoPackage holds for it (its ``layer_styles`` default) and the cluster map its
``.qml`` sidecar, so the project and a layer opened on its own look alike, and the project is a
function of the files beside it: ``similar`` rewrites it with the layers it adds. Datasources are
relative (``./name.gpkg|layername=tiles``), so the output folder can be moved or shared. The tests
open it in a real QGIS.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import numpy as np
import pyogrio
import rasterio
from pyproj import CRS, Transformer
from pyproj.aoi import AreaOfInterest
from pyproj.database import query_utm_crs_info

from ..products import Outputs
from ..rasters import RasterInfo
from ..store import atomic_path
from .geopackage import read_styles
from .imagery import Imagery, imagery, imagery_qml_body, write_mosaics
from .styles import LABEL_MIX_STYLE, QGIS_VERSION, qml_body

Bounds = tuple[float, float, float, float]


@dataclass(frozen=True)
class ProjectLayer:
    """One map layer of the project: id, name, relative source, provider, CRS, extent and style body."""

    layer_id: str
    name: str
    source: str
    provider: str
    crs: CRS
    extent: Bounds
    style: str
    checked: bool = True
    geometry: str = ""  # vector layers: 'Polygon'; the WKB type name goes in wkb_type
    wkb_type: str = ""

    @property
    def kind(self) -> str:
        return "vector" if self.provider == "ogr" else "raster"


def srs_xml(crs: CRS) -> str:
    """QGIS ``spatialrefsys``: the WKT (what QGIS trusts first) plus the authority id and name."""
    auth = crs.to_authority()
    authid = f"{auth[0]}:{auth[1]}" if auth else ""
    return (f"<spatialrefsys><wkt>{escape(crs.to_wkt())}</wkt><authid>{escape(authid)}</authid>"
            f"<description>{escape(crs.name)}</description>"
            f"<geographicflag>{'true' if crs.is_geographic else 'false'}</geographicflag></spatialrefsys>")


def _extent_xml(b: Bounds, tag: str = "extent") -> str:
    return f"<{tag}><xmin>{b[0]!r}</xmin><ymin>{b[1]!r}</ymin><xmax>{b[2]!r}</xmax><ymax>{b[3]!r}</ymax></{tag}>"


def _maplayer(layer: ProjectLayer) -> str:
    geom = (f' geometry="{layer.geometry}" wkbType="{layer.wkb_type}" readOnly="0"'
            if layer.kind == "vector" else "")
    provider = ('<provider encoding="UTF-8">ogr</provider>' if layer.kind == "vector"
                else f"<provider>{layer.provider}</provider>")
    nodata = ('<noData><noDataList bandNo="1" useSrcNoData="1"/></noData>' if layer.kind == "raster" else "")
    legend = '<legend type="default-vector" showLabelLegend="0"/>' if layer.kind == "vector" else ""
    return f"""<maplayer type="{layer.kind}"{geom} styleCategories="AllStyleCategories" hasScaleBasedVisibilityFlag="0"
        minScale="0" maxScale="0" autoRefreshEnabled="0" autoRefreshTime="0">
      {_extent_xml(layer.extent)}
      <id>{escape(layer.layer_id)}</id>
      <datasource>{escape(layer.source)}</datasource>
      <layername>{escape(layer.name)}</layername>
      <srs>{srs_xml(layer.crs)}</srs>
      {provider}
      {nodata}
      <map-layer-style-manager current="default"><map-layer-style name="default"/></map-layer-style-manager>
      <flags><Identifiable>1</Identifiable><Removable>1</Removable><Searchable>1</Searchable></flags>
      {layer.style}
      {legend}
    </maplayer>"""


def project_xml(title: str, layers: list[ProjectLayer], crs: CRS, view: Bounds) -> str:
    """A QGIS 3 project document; ``layers`` top of the legend first (drawn last, on top)."""
    tree = "\n    ".join(
        f'<layer-tree-layer id={quoteattr(lyr.layer_id)} name={quoteattr(lyr.name)} source={quoteattr(lyr.source)} '
        f'providerKey="{lyr.provider}" checked="{"Qt::Checked" if lyr.checked else "Qt::Unchecked"}" expanded="1">'
        "<customproperties/></layer-tree-layer>" for lyr in layers)
    order = "".join(f"<layer id={quoteattr(lyr.layer_id)}/>" for lyr in layers)
    maplayers = "\n    ".join(_maplayer(lyr) for lyr in layers)
    units = "degrees" if crs.is_geographic else "meters"
    return f"""<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<qgis projectname={quoteattr(title)} version="{QGIS_VERSION}">
  <homePath path=""/>
  <title>{escape(title)}</title>
  <projectCrs>{srs_xml(crs)}</projectCrs>
  <layer-tree-group>
    <customproperties/>
    {tree}
    <custom-order enabled="0">{"".join(f"<item>{escape(lyr.layer_id)}</item>" for lyr in layers)}</custom-order>
  </layer-tree-group>
  <mapcanvas name="theMapCanvas" annotationsVisible="1">
    <units>{units}</units>
    {_extent_xml(view)}
    <rotation>0</rotation>
    <destinationsrs>{srs_xml(crs)}</destinationsrs>
    <rendermaptile>0</rendermaptile>
  </mapcanvas>
  <projectlayers>
    {maplayers}
  </projectlayers>
  <layerorder>{order}</layerorder>
  <properties>
    <Paths><Absolute type="bool">false</Absolute></Paths>
    <SpatialRefSys><ProjectionsEnabled type="int">1</ProjectionsEnabled></SpatialRefSys>
  </properties>
  <ProjectViewSettings UseProjectScales="0" rotation="0">
    <Scales/>
    <DefaultViewExtent xmin="{view[0]!r}" ymin="{view[1]!r}" xmax="{view[2]!r}" ymax="{view[3]!r}">
      {srs_xml(crs)}
    </DefaultViewExtent>
  </ProjectViewSettings>
</qgis>
"""


def _bounds(values: Any) -> tuple[float, float, float, float]:
    """(minx, miny, maxx, maxy) as floats."""
    minx, miny, maxx, maxy = (float(v) for v in values)
    return minx, miny, maxx, maxy


def _vector_layer(gpkg: Path, layer: str, name: str, style: str, checked: bool = True) -> ProjectLayer:
    info = pyogrio.read_info(gpkg, layer=layer, force_total_bounds=True)
    wkb = str(info["geometry_type"]).replace(" ", "")
    return ProjectLayer(f"settlements_{name.replace(' ', '_').replace(':', '')}", name,
                        f"./{gpkg.name}|layername={layer}", "ogr", CRS.from_user_input(info["crs"]),
                        _bounds(info["total_bounds"]), style, checked,
                        "Polygon", wkb)


def _analyst_layer(gpkg: Path, layer: str, style: str, fallback: Bounds) -> ProjectLayer:
    """A layer the analyst made or draws in: its extent, or the tiles' while it is empty. A result's
    per-region summary (``similar_<name>_regions``) starts switched off, under its tiles."""
    info = pyogrio.read_info(gpkg, layer=layer, force_total_bounds=True)
    b = info["total_bounds"]
    extent: Bounds = fallback if b is None or not np.all(np.isfinite(b)) else (float(b[0]), float(b[1]),
                                                                              float(b[2]), float(b[3]))
    return ProjectLayer(f"settlements_{layer}", layer, f"./{gpkg.name}|layername={layer}", "ogr",
                        CRS.from_user_input(info["crs"]), extent, style, not layer.endswith("_regions"), "Polygon",
                        "Polygon")


def _padded(b: Bounds, share: float = 0.02) -> Bounds:
    dx, dy = (b[2] - b[0]) * share, (b[3] - b[1]) * share
    return b[0] - dx, b[1] - dy, b[2] + dx, b[3] + dy


def view_crs(output_crs: CRS, lon: float, lat: float) -> CRS:
    """The project's map CRS: the output CRS when it is projected; else one that keeps shapes at ``lon``,
    ``lat`` (a lon/lat map stretches east-west by 1/cos(latitude)): the WGS 84 UTM zone there, or a
    Lambert azimuthal equal-area CRS centred there beyond UTM's latitudes."""
    if not output_crs.is_geographic:
        return output_crs
    if -80 <= lat <= 84:
        found = query_utm_crs_info(datum_name="WGS 84", area_of_interest=AreaOfInterest(lon, lat, lon, lat))
        if found:
            return CRS.from_authority(found[0].auth_name, found[0].code)
    return CRS.from_proj4(f"+proj=laea +lat_0={lat:.6f} +lon_0={lon:.6f} +datum=WGS84 +units=m +no_defs")


def view_bounds(gpkg: Path) -> tuple[Bounds, CRS]:
    """The tiles and every region their cells meet, as one box in the layers' CRS: what the project opens on."""
    tiles = pyogrio.read_info(gpkg, layer="tiles", force_total_bounds=True)
    met = pyogrio.read_dataframe(gpkg, layer="regions", columns=["n_tiles", "n_skipped"])
    met = met[(met["n_tiles"] + met["n_skipped"]) > 0]
    boxes = [tuple(float(v) for v in tiles["total_bounds"])]
    if len(met):
        boxes.append(tuple(float(v) for v in met.total_bounds))
    b = np.asarray(boxes)
    return (b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()), CRS.from_user_input(tiles["crs"])


def _raster_layer(path: Path, layer_id: str, name: str, checked: bool = True) -> ProjectLayer:
    """A paletted COG of the folder, styled as its ``.qml`` sidecar says."""
    with rasterio.open(path) as src:
        rcrs = CRS.from_wkt(src.crs.to_wkt())
        rb = _bounds(src.bounds)
    sidecar = path.with_suffix(".qml")
    style = qml_body(sidecar.read_text(encoding="utf-8")) if sidecar.is_file() else ""
    return ProjectLayer(layer_id, name, f"./{path.name}", "gdal", rcrs, rb, style, checked)


def _supervised_layers(gpkg: Path, cog: Path | None) -> list[ProjectLayer]:
    """The supervised map (``predict``), switched off under the cluster map: its tiles, regions and COG."""
    default = {st.layer: qml_body(st.qml) for st in read_styles(gpkg) if st.default}
    found = [str(row[0]) for row in pyogrio.list_layers(gpkg)]
    layers = [_vector_layer(gpkg, layer, name, default.get(layer, ""), checked=False)
              for layer, name in (("predicted_regions", "predicted regions"), ("predicted_tiles", "predicted tiles"))
              if layer in found]
    if cog is not None:
        layers.append(_raster_layer(cog, "settlements_predicted_map", "predicted map", checked=False))
    return layers


def write_project(path: Path, gpkg: Path, cluster_map: Path | None, title: str, analyst: list[str] | None = None,
                  imagery: Sequence[Imagery] = (), supervised: tuple[Path, Path | None] | None = None) -> Path:
    """Write ``path`` (.qgz): the ``analyst``'s layers of ``gpkg`` (drawn examples to draw in, which may be
    empty, and ``similar`` results), label mix (off), regions, tiles, cluster map, the ``supervised`` map
    (its GeoPackage and COG, off) and the source ``imagery`` at the bottom; opening on the tiles and the
    regions they meet, in a projected CRS (:func:`view_crs`). Each layer is styled as the GeoPackage's
    default style for it says; a COG as its ``.qml`` sidecar says (the cluster map left out when None).

    The GeoPackages and COGs must lie in the project's folder (they are referenced relatively, as the
    imagery is, from the project's final folder).
    """
    styles = read_styles(gpkg)
    default = {st.layer: qml_body(st.qml) for st in styles if st.default}
    mix = next((qml_body(st.qml) for st in styles if st.layer == "regions" and st.name == LABEL_MIX_STYLE), "")
    layers = [
        _vector_layer(gpkg, "regions", "regions: label mix", mix, checked=False),
        _vector_layer(gpkg, "regions", "regions", default.get("regions", "")),
        _vector_layer(gpkg, "tiles", "tiles", default.get("tiles", "")),
    ]
    if cluster_map is not None:
        layers.append(_raster_layer(cluster_map, "settlements_cluster_map", "cluster map"))
    if supervised is not None:
        layers += _supervised_layers(*supervised)
    layers += [ProjectLayer(f"settlements_imagery_{k}", im.name, im.source, "gdal", CRS.from_wkt(im.crs_wkt),
                            im.bounds, imagery_qml_body(im)) for k, im in enumerate(imagery, start=1)]
    bounds, layer_crs = view_bounds(gpkg)
    layers = [_analyst_layer(gpkg, name, default.get(name, ""), bounds) for name in analyst or []] + layers
    centre = Transformer.from_crs(layer_crs, 4326, always_xy=True).transform((bounds[0] + bounds[2]) / 2,
                                                                             (bounds[1] + bounds[3]) / 2)
    crs = view_crs(layer_crs, *centre)
    view = Transformer.from_crs(layer_crs, crs, always_xy=True).transform_bounds(*bounds, densify_pts=21)
    xml = project_xml(title, layers, crs, _padded(view))
    with atomic_path(path, suffix=".qgz") as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(f"{path.stem}.qgs", xml)
    return path


def write_pipeline_project(files: Outputs, stage: Path, infos: list[RasterInfo], title: str, analyst: list[str],
                           mosaics: bool = False) -> Path:
    """The pipeline's project, staged in ``stage`` (a command's staging folder): every product as this command
    stages it there, else as the output folder holds it (the cluster map, the supervised map where ``predict``
    made one, the source imagery); ``mosaics``: write the imagery's VRT mosaics too (the export stage)."""

    def present(p: Path | None) -> Path | None:
        if p is None:
            return None
        staged = stage / p.name
        return staged if staged.is_file() else p if p.is_file() else None

    gpkg = present(files.gpkg)
    assert gpkg is not None, files.gpkg
    layers = imagery(infos, files.folder, files.imagery)
    if mosaics:
        write_mosaics(layers, stage, files.folder)
    layers = [im for im in layers if not im.files or present(files.folder / Path(im.source).name) is not None]
    sup = present(files.supervised_map.gpkg)
    return write_project(stage / files.project.name, gpkg, present(files.cluster_map.raster), title, analyst,
                         layers, None if sup is None else (sup, present(files.supervised_map.raster)))
