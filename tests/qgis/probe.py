"""Run by /usr/bin/python3 (Debian QGIS), never by pytest: open the outputs in real QGIS, print JSON.

    QT_QPA_PLATFORM=offscreen /usr/bin/python3 tests/qgis/probe.py SPEC.json

SPEC names the GeoPackage, the cluster map, the project (.qgz), a PNG to render to, points (in
``points_crs``) whose rendered colours to report, and regions whose map tips to evaluate. One QGIS
start checks everything for one run; the pytest side asserts on the JSON.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("qgis_render", HERE.parents[1] / "settlements/export/qgis_render.py")
qr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(qr)


def vector_facts(layer) -> dict:
    r = layer.renderer()
    facts = {"valid": layer.isValid(), "features": layer.featureCount(), "renderer": r.type() if r else None,
             "aliases": {f.name(): layer.attributeAlias(i) for i, f in enumerate(layer.fields())},
             "map_tip": layer.mapTipTemplate(), "display": layer.displayExpression()}
    if r is not None and r.type() == "categorizedSymbol":
        facts["attribute"] = r.classAttribute()
        facts["categories"] = [[c.value() if c.value() not in (None, "") else None, c.label(),
                                c.symbol().color().name(), c.symbol().color().alpha()] for c in r.categories()]
    d = layer.diagramRenderer()
    if d is not None:
        s = d.diagramSettings()[0]
        facts["diagram"] = {"type": d.diagram().diagramName() if d.diagram() else None,
                            "attributes": list(s.categoryAttributes), "labels": list(s.categoryLabels),
                            "colours": [c.name() for c in s.categoryColors]}
    return facts


def database_styles(layer) -> dict:
    from qgis.core import QgsVectorLayer
    from qgis.PyQt.QtXml import QDomDocument

    n, ids, names, descriptions, err = layer.listStylesInDatabase()
    out = {"names": list(names)[:n], "default": layer.styleManager().currentStyle(), "styles": {}}
    for sid, name in list(zip(ids, names, strict=False))[:n]:
        copy = QgsVectorLayer(layer.source(), name, "ogr", QgsVectorLayer.LayerOptions(loadDefaultStyle=False))
        qml = copy.getStyleFromDatabase(sid)[0]
        doc = QDomDocument()
        doc.setContent(qml)
        ok, msg = copy.importNamedStyle(doc)
        out["styles"][name] = {"loaded": ok, "error": msg, **vector_facts(copy)}
        del copy
    return out


def raster_facts(layer) -> dict:
    r = layer.renderer()
    facts = {"valid": layer.isValid(), "renderer": r.type() if r else None,
             "width": layer.width(), "height": layer.height(), "crs": layer.crs().authid()}
    if r is not None and r.type() == "paletted":
        facts["classes"] = [[c.value, c.label, c.color.name()] for c in r.classes()]
    table = layer.dataProvider().colorTable(1)
    facts["colour_table"] = {str(int(e.value)): e.color.name() for e in table}
    facts["nodata"] = layer.dataProvider().sourceNoDataValue(1) if layer.dataProvider().sourceHasNoDataValue(1) \
        else None
    return facts


def sample(image, ms, points: dict, to_map) -> dict:
    from qgis.core import QgsPointXY

    out = {}
    m2p = ms.mapToPixel()
    for name, (x, y) in points.items():
        p = m2p.transform(to_map.transform(QgsPointXY(x, y)))
        px, py = int(p.x()), int(p.y())
        if 0 <= px < image.width() and 0 <= py < image.height():
            c = image.pixelColor(px, py)
            out[name] = [c.red(), c.green(), c.blue()]
        else:
            out[name] = None
    return out


def map_tips(layer, region_ids: list) -> dict:
    """The regions layer's map tip as QGIS fills it in for each of ``region_ids``."""
    from qgis.core import QgsExpression, QgsExpressionContext, QgsExpressionContextUtils

    out = {}
    for feature in layer.getFeatures():
        rid = feature["region_id"]
        if rid in region_ids:
            context = QgsExpressionContext(QgsExpressionContextUtils.globalProjectLayerScopes(layer))
            context.setFeature(feature)
            out[rid] = QgsExpression.replaceExpressionText(layer.mapTipTemplate(), context)
    return out


def main(spec_path: str) -> None:
    from qgis.core import (
        Qgis,
        QgsCoordinateReferenceSystem,
        QgsCoordinateTransform,
        QgsProject,
        QgsRasterLayer,
        QgsRectangle,
        QgsVectorLayer,
    )
    from qgis.PyQt.QtCore import QSize

    spec = json.loads(Path(spec_path).read_text())
    report: dict = {"qgis": Qgis.QGIS_VERSION}
    gpkg = spec["gpkg"]
    for name in ("tiles", "regions"):
        layer = QgsVectorLayer(f"{gpkg}|layername={name}", name, "ogr")
        report[name] = vector_facts(layer)
        report[name]["database_styles"] = database_styles(layer)
        if name == "regions":
            report[name]["map_tips"] = map_tips(layer, spec.get("map_tips", []))
        del layer
    raster = QgsRasterLayer(spec["raster"], "cluster map", "gdal")
    report["raster"] = raster_facts(raster)
    del raster

    project = QgsProject.instance()
    ok = project.read(spec["project"])
    root = project.layerTreeRoot()
    report["project"] = {
        "read": ok, "crs": project.crs().authid(), "title": project.title(),
        "crs_geographic": project.crs().isGeographic(), "crs_wkt": project.crs().toWkt(),
        "order": [n.name() for n in root.findLayers()],
        "checked": [lyr.name() for lyr in root.checkedLayers()],
        "layers": {lyr.name(): {"valid": lyr.isValid(), "source": lyr.source(),
                                "renderer": lyr.renderer().type() if lyr.renderer() else None,
                                "features": lyr.featureCount() if hasattr(lyr, "featureCount") else None}
                   for lyr in project.mapLayers().values()},
    }
    by_name = {lyr.name(): lyr for lyr in project.mapLayers().values()}
    width = spec.get("width", 800)
    ms = qr.map_settings(project, width)
    image = qr.render(ms)
    image.save(spec["png"], "PNG")
    report["render"] = {"width": image.width(), "height": image.height(),
                        "extent": [ms.extent().xMinimum(), ms.extent().yMinimum(),
                                   ms.extent().xMaximum(), ms.extent().yMaximum()]}
    to_map = QgsCoordinateTransform(QgsCoordinateReferenceSystem(spec["points_crs"]), project.crs(), project)
    # colours are sampled zoomed to the tiles (the default view may show large regions around them)
    zoom = to_map.transformBoundingBox(QgsRectangle(*spec["zoom"]))
    report["pixels"] = {}
    for name, layers in (("project", None), ("tiles", [by_name["tiles"]]), ("cluster map", [by_name["cluster map"]])):
        ms1 = qr.map_settings(project, width, layers)
        ms1.setOutputSize(QSize(width, max(1, round(width * zoom.height() / zoom.width()))))
        ms1.setExtent(zoom)
        report["pixels"][name] = sample(qr.render(ms1), ms1, spec["points"], to_map)
    del by_name, ms, image
    if spec.get("in_place"):  # the project where the run wrote it: its imagery, found by relative paths
        ok = project.read(spec["in_place"])
        report["in_place"] = {
            "read": ok, "order": [n.name() for n in project.layerTreeRoot().findLayers()],
            "layers": {lyr.name(): {"valid": lyr.isValid(), "source": lyr.source(),
                                    "renderer": lyr.renderer().type() if lyr.renderer() else None,
                                    "bands": lyr.bandCount() if hasattr(lyr, "bandCount") else None}
                       for lyr in project.mapLayers().values()}}
    print(json.dumps(report))


if __name__ == "__main__":
    app = qr.start_qgis()
    try:
        main(sys.argv[1])
    finally:
        qr.stop_qgis(app)
