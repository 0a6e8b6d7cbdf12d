"""Render an output folder's QGIS project to a PNG with a real, headless QGIS.

    python -m settlements.export.qgis_render outputs/olinda docs/qgis_olinda.png

QGIS's Python bindings live in the system Python (Debian ``python3-qgis``), not in the project's
virtual environment, so this module is two things: run by the project's Python it starts
``/usr/bin/python3`` on this very file (offscreen Qt); run by the system Python it opens the
project and renders it. Only the standard library is imported at the top so both can load it.
The tests use the same functions to check pixels of the rendered project.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

SYSTEM_PYTHON = "/usr/bin/python3"


# --------------------------------------------------------------------- inside the system Python

def start_qgis() -> Any:
    """Start a headless QgsApplication (with providers); the caller must call :func:`stop_qgis`."""
    from qgis.core import QgsApplication

    QgsApplication.setPrefixPath("/usr", True)
    app = QgsApplication([], False)
    app.initQgis()
    return app


def stop_qgis(app: Any) -> None:
    """Drop every layer before exitQgis(), else QGIS may crash on the way out."""
    from qgis.core import QgsProject

    QgsProject.instance().clear()
    app.exitQgis()


def map_settings(project: Any, width: int, layers: list | None = None) -> Any:
    """Map settings for ``project``'s default view: its CRS, extent and checked layers, ``width`` px wide."""
    from qgis.core import QgsMapSettings
    from qgis.PyQt.QtCore import QSize
    from qgis.PyQt.QtGui import QColor

    extent = project.viewSettings().defaultViewExtent()
    ms = QgsMapSettings()
    ms.setDestinationCrs(project.crs())
    ms.setLayers(layers if layers is not None else project.layerTreeRoot().checkedLayers())
    height = max(1, round(width * extent.height() / extent.width()))
    ms.setOutputSize(QSize(width, height))
    ms.setExtent(extent)
    ms.setBackgroundColor(QColor(255, 255, 255))
    ms.setOutputDpi(96)
    return ms


def render(ms: Any) -> Any:
    """Render map settings to a QImage (sequentially: deterministic and single-threaded)."""
    from qgis.core import QgsMapRendererSequentialJob

    job = QgsMapRendererSequentialJob(ms)
    job.start()
    job.waitForFinished()
    return job.renderedImage()


def with_legend(image: Any, layers: list) -> Any:
    """The map image with QGIS's own legend of ``layers`` drawn on its right."""
    from qgis.core import QgsLayerTree, QgsLayerTreeModel, QgsLegendRenderer, QgsLegendSettings, QgsRenderContext
    from qgis.PyQt.QtCore import Qt
    from qgis.PyQt.QtGui import QImage, QPainter

    tree = QgsLayerTree()
    for layer in layers:
        tree.addLayer(layer)
    model = QgsLayerTreeModel(tree)
    legend = QgsLegendRenderer(model, QgsLegendSettings())
    px_per_mm = image.dotsPerMeterX() / 1000
    size = legend.minimumSize()  # mm
    out = QImage(image.width() + int(size.width() * px_per_mm) + 20,
                 max(image.height(), int(size.height() * px_per_mm) + 20), QImage.Format_ARGB32)
    out.setDotsPerMeterX(image.dotsPerMeterX())
    out.setDotsPerMeterY(image.dotsPerMeterY())
    out.fill(Qt.white)
    painter = QPainter(out)
    painter.drawImage(0, 0, image)
    painter.translate(image.width() + 10, 10)
    painter.scale(px_per_mm, px_per_mm)  # the legend draws in millimetres
    context = QgsRenderContext.fromQPainter(painter)
    context.setFlag(QgsRenderContext.Antialiasing, True)
    context.setScaleFactor(1)
    legend.drawLegend(context)
    painter.end()
    return out


def render_project(qgz: Path, png: Path, width: int = 1000, legend: bool = True) -> dict[str, Any]:
    """Open ``qgz`` in QGIS and save its default view as ``png`` (with the regions' legend); report layers."""
    from qgis.core import QgsProject

    project = QgsProject.instance()
    if not project.read(str(qgz)):
        raise RuntimeError(f"{qgz}: QGIS cannot read the project: {project.error()}")
    layers = {lyr.name(): lyr.isValid() for lyr in project.mapLayers().values()}
    image = render(map_settings(project, width))
    regions = project.mapLayersByName("regions")
    if legend and regions:
        image = with_legend(image, regions)
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.name}.tmp.png")
    if not image.save(str(tmp), "PNG"):
        raise RuntimeError(f"{png}: QGIS could not save the image")
    os.replace(tmp, png)
    return {"png": str(png), "width": image.width(), "height": image.height(), "layers": layers}


def _script_main(argv: list[str]) -> int:
    qgz, png, width = Path(argv[0]), Path(argv[1]), int(argv[2])
    app = start_qgis()
    try:
        print(json.dumps(render_project(qgz, png, width)))
    finally:
        stop_qgis(app)
    return 0


# --------------------------------------------------------------------- inside the project's Python

def qgis_environment() -> dict[str, str]:
    """Environment for a headless QGIS subprocess: offscreen Qt, no venv leaking into the system Python."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["QT_QPA_PLATFORM"] = "offscreen"
    env.setdefault("XDG_RUNTIME_DIR", "/tmp")
    return env


def qgis_available() -> str | None:
    """None when ``/usr/bin/python3`` can import qgis.core, else why not."""
    try:
        proc = subprocess.run([SYSTEM_PYTHON, "-c", "import qgis.core"], capture_output=True, text=True,
                              env=qgis_environment(), timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{SYSTEM_PYTHON} not usable: {exc}"
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return f"{SYSTEM_PYTHON} -c 'import qgis.core' failed: {lines[-1] if lines else proc.returncode}"
    return None


def render_folder(out_dir: Path, png: Path, width: int = 1000) -> dict[str, Any]:
    """Render the ``.qgz`` in ``out_dir`` to ``png`` with the system QGIS."""
    from ..errors import OutputError

    projects = sorted(out_dir.glob("*.qgz"))
    if len(projects) != 1:
        raise OutputError(f"{out_dir}: expected one .qgz project, found {len(projects)}; run the pipeline first")
    why = qgis_available()
    if why:
        raise OutputError(f"{out_dir}: cannot render without QGIS: {why}")
    proc = subprocess.run([SYSTEM_PYTHON, __file__, str(projects[0].resolve()), str(png.resolve()), str(width)],
                          capture_output=True, text=True, env=qgis_environment(), timeout=300)
    if proc.returncode != 0:
        raise OutputError(f"{projects[0]}: QGIS rendering failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    import argparse

    from ..errors import SettlementsError

    parser = argparse.ArgumentParser(description="Render an output folder's QGIS project to a PNG (headless QGIS).")
    parser.add_argument("out_dir", type=Path, help="output folder holding <name>.qgz, e.g. outputs/olinda")
    parser.add_argument("png", type=Path, help="PNG to write, e.g. docs/qgis_olinda.png")
    parser.add_argument("--width", type=int, default=1000, help="image width in pixels")
    args = parser.parse_args()
    try:
        report = render_folder(args.out_dir, args.png, args.width)
    except SettlementsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"{report['png']}: {report['width']} x {report['height']} px; layers: "
          + ", ".join(f"{k} ({'valid' if v else 'INVALID'})" for k, v in report["layers"].items()))


if __name__ == "__main__":
    if __package__:  # python -m settlements.export.qgis_render (the project's Python)
        main()
    else:  # /usr/bin/python3 qgis_render.py QGZ PNG WIDTH (the system Python with QGIS)
        sys.exit(_script_main(sys.argv[1:]))
