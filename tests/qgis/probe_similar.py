"""Run by /usr/bin/python3 (Debian QGIS), never by pytest: the "more like this" workflow in real QGIS.

    QT_QPA_PLATFORM=offscreen /usr/bin/python3 tests/qgis/probe_similar.py draw GPKG WKT [WKT ...]
    QT_QPA_PLATFORM=offscreen /usr/bin/python3 tests/qgis/probe_similar.py open GPKG LAYER [LAYER ...]

``draw`` adds the polygons (WKT in the layer's CRS) to the GeoPackage's ``examples`` layer through QGIS's
editing buffer and saves, as an analyst does; ``open`` opens each layer with its default style and
prints what QGIS applied (renderer, attribute, ranges with colours, outline colour, feature count) as JSON.
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


def draw(gpkg: str, wkts: list[str]) -> dict:
    from qgis.core import QgsFeature, QgsGeometry, QgsVectorLayer

    layer = QgsVectorLayer(f"{gpkg}|layername=examples", "examples", "ogr")
    out = {"valid": layer.isValid(), "before": layer.featureCount(), "crs": layer.crs().authid()}
    layer.startEditing()
    for wkt in wkts:
        f = QgsFeature(layer.fields())
        f.setGeometry(QgsGeometry.fromWkt(wkt))
        f.setAttribute("note", "drawn in QGIS")
        layer.addFeature(f)
    out["committed"] = layer.commitChanges()
    out["errors"] = list(layer.commitErrors())
    out["after"] = layer.featureCount()
    del layer
    return out


def open_layer(gpkg: str, name: str) -> dict:
    from qgis.core import QgsVectorLayer

    layer = QgsVectorLayer(f"{gpkg}|layername={name}", name, "ogr")
    r = layer.renderer()
    facts = {"valid": layer.isValid(), "features": layer.featureCount(), "renderer": r.type() if r else None,
             "crs": layer.crs().authid(), "aliases": {f.name(): layer.attributeAlias(i)
                                                      for i, f in enumerate(layer.fields())}}
    if r is not None and r.type() == "graduatedSymbol":
        facts["attribute"] = r.classAttribute()
        facts["ranges"] = [[g.lowerValue(), g.upperValue(), g.symbol().color().name()] for g in r.ranges()]
    if r is not None and r.type() == "singleSymbol":
        sl = r.symbol().symbolLayer(0)
        facts["outline"] = sl.strokeColor().name()
        facts["fill_alpha"] = sl.fillColor().alpha()
    del layer
    return facts


if __name__ == "__main__":
    app = qr.start_qgis()
    try:
        mode, gpkg, *rest = sys.argv[1:]
        report = draw(gpkg, rest) if mode == "draw" else {name: open_layer(gpkg, name) for name in rest}
        print(json.dumps(report))
    finally:
        qr.stop_qgis(app)
