"""What a pipeline hands to people, named once: every file of its output folder.

A *product* is what a person opens: the cluster map (``settlements run``), the supervised map
(``predict``), the evaluation (``train``), an embeddings export, a portable model (``model export``).
Each labelled-tile map has the same kinds of file (:class:`MapFiles`, written by
:mod:`settlements.export.tile_map`). Every module that writes, reads, records or protects one of these
files takes its name from here: the export stage, ``predict``, ``train``, ``similar``,
``export-embeddings``, ``model export``, the labels file's header and the "nothing to do" check
(:mod:`settlements.reprocess`). The work folder's own files are named by :class:`settlements.store.Workspace`.

Light to import (paths only): the nothing-to-do check of ``settlements run`` uses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import ExportFormat, PipelineConfig

#: The sidecars GDAL and QGIS read beside a map's COG: its QGIS style and GDAL's attribute table.
RASTER_SIDECARS = (".qml", ".aux.xml")


@dataclass(frozen=True)
class MapFiles:
    """The files of one labelled-tile map: a GeoPackage, and (where the map has them) a paletted COG of label
    codes with its sidecars, a picture of the map and one of the regions' histograms."""

    gpkg: Path
    raster: Path | None = None
    picture: Path | None = None
    histograms: Path | None = None

    @property
    def raster_style(self) -> Path | None:
        return None if self.raster is None else self.raster.with_suffix(".qml")

    @property
    def raster_table(self) -> Path | None:
        return None if self.raster is None else self.raster.with_name(self.raster.name + ".aux.xml")

    def files(self) -> list[Path]:
        """Every file of the map (the COG's sidecars included)."""
        return [p for p in (self.gpkg, self.raster, self.raster_style, self.raster_table, self.picture,
                            self.histograms) if p is not None]

    def in_folder(self, folder: Path) -> MapFiles:
        """The same names in ``folder`` (a commit's staging folder)."""
        def moved(p: Path | None) -> Path | None:
            return None if p is None else folder / p.name

        return MapFiles(folder / self.gpkg.name, moved(self.raster), moved(self.picture), moved(self.histograms))


@dataclass(frozen=True)
class Outputs:
    """Every file of one pipeline's output folder, by what it is."""

    folder: Path
    name: str

    @property
    def cluster_map(self) -> MapFiles:
        """``settlements run``: the GeoPackage, the cluster map COG and the pictures of the clusters' labels."""
        return MapFiles(self.folder / f"{self.name}.gpkg", self.folder / f"{self.name}_labels.tif",
                        self.folder / "map.png", self.folder / "histograms.png")

    @property
    def gpkg(self) -> Path:
        """The run's GeoPackage, which ``similar`` and ``labels pull`` also write."""
        return self.cluster_map.gpkg

    @property
    def atlas(self) -> Path:
        return self.folder / "atlas.png"

    @property
    def project(self) -> Path:
        return self.folder / f"{self.name}.qgz"

    def imagery(self, k: int = 1) -> Path:
        """The VRT mosaic of the k-th group of input files the QGIS project shows under the tiles (a group of
        several files sharing CRS and bands; :mod:`settlements.export.imagery`)."""
        return self.folder / f"{self.name}_imagery{'' if k == 1 else f'_{k}'}.vrt"

    @property
    def supervised_map(self) -> MapFiles:
        """``settlements predict``: the cluster map's twin for the predicted classes."""
        return MapFiles(self.folder / f"{self.name}_supervised.gpkg", self.folder / f"{self.name}_predicted.tif",
                        self.folder / "supervised_map.png", self.folder / "supervised_histograms.png")

    # ``settlements train``: the blocked evaluation
    evaluation = property(lambda self: self.folder / "evaluation.csv")
    confusion = property(lambda self: self.folder / "confusion.csv")
    confusion_png = property(lambda self: self.folder / "confusion.png")
    cluster_quality = property(lambda self: self.folder / "cluster_quality.csv")

    @property
    def model(self) -> Path:
        """``settlements model export``'s file, unless ``-o`` names another."""
        return self.folder / f"{self.name}_model.npz"

    def evaluation_files(self) -> list[Path]:
        return [self.evaluation, self.confusion, self.confusion_png, self.cluster_quality]

    def embeddings(self, fmt: ExportFormat) -> dict[str, Path]:
        """``settlements export-embeddings``' default files: each format its own names, never shared."""
        if fmt == "geoparquet":
            return {"parquet": self.folder / f"{self.name}_embeddings.parquet"}
        return embeddings_npy(self.folder / f"{self.name}_embeddings.npy")

    def declared(self) -> list[Path]:
        """Every file of the folder named here but the embeddings exports: no other command may write them."""
        return [*self.cluster_map.files(), self.atlas, self.project, self.imagery(), *self.supervised_map.files(),
                *self.evaluation_files(), self.model]


def embeddings_npy(vectors: Path) -> dict[str, Path]:
    """The ``npy`` export: the vectors, and beside them the table of their rows (``<stem>_table.parquet``)."""
    return {"npy": vectors, "parquet": vectors.with_name(f"{vectors.stem}_table.parquet")}


def outputs(cfg: PipelineConfig) -> Outputs:
    return Outputs(cfg.output_dir, cfg.name)
