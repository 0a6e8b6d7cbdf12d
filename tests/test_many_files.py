"""Many rasters give what one mosaic of the same pixels gives: same tiles, embeddings, clusters,
histograms, labels and evaluation blocks.

Two real inputs, each run twice (module fixtures, one run each): the Kampala drone mosaic cut into
64 GeoTIFF chips of 96 x 64 px (neighbours touch) beside a VRT of those chips; and the 64 separate
Mumbai patches (600 x 600 px, 400 m apart) beside a VRT of them whose gaps are alpha 0. Tiles are
small and the CNN input 32 px so that each run takes seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import rasterio.transform
import shapely

from settlements.config import LabelSource
from settlements.pipeline import load_infos, workspace
from settlements.supervised.predict import predict
from settlements.supervised.train import train
from settlements.supervised.training_labels import kept_tiles, tile_labels

from .conftest import Ran, scene, write_pipeline
from .many_files import cut_chips, mumbai_group_mask, mumbai_label_polygons, write_vrt

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

SMALL = {"embedding": {"input_size": 32, "num_workers": 0, "batch_size": 32}}


@dataclass
class Pair:
    """The same pixels run as many files and as one mosaic."""

    files: Ran
    mosaic: Ran
    cell: float  # a cell's side in the rasters' CRS units
    extra: dict


def _kampala_regions(path: Path, bounds: tuple[float, float, float, float]) -> Path:
    """Six rectangles over the mosaic whose edges cut through chips (not along chip edges)."""
    x0, y0, x1, y1 = bounds
    xs = [x0 - 1e-4, x0 + 0.37 * (x1 - x0), x0 + 0.71 * (x1 - x0), x1 + 1e-4]
    ys = [y0 - 1e-4, y0 + 0.43 * (y1 - y0), y1 + 1e-4]
    boxes = [shapely.box(xs[i], ys[j], xs[i + 1], ys[j + 1]) for j in range(2) for i in range(3)]
    gpd.GeoDataFrame({"rid": [f"r{i}" for i in range(6)], "rname": [f"part {i}" for i in range(6)]},
                     geometry=boxes, crs="EPSG:4326").to_file(path, layer="parts", driver="GPKG")
    return path


@pytest.fixture(scope="module")
def kampala(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Pair:
    source = scene("kampala_oam", "kampala_z19_mosaic_DERIVED.tif")
    tmp = tmp_path_factory.mktemp("kampala_many")
    chips = cut_chips(source, tmp / "chips", 96, 64)
    vrt = write_vrt(tmp / "mosaic.vrt", chips)
    with rasterio.open(source) as src:
        regions = _kampala_regions(tmp / "parts.gpkg", tuple(src.bounds))
        cell = 32 * src.transform.a
    common = {"regions": {"path": str(regions), "id_field": "rid", "name_field": "rname"},
              "tiling": {"tile_size": "32px"}, "clustering": {"k": 5, "seed": 0}, "output": {"crs": "EPSG:4326"},
              **SMALL}

    def raster(path: Path | str) -> list[dict]:
        return [{"path": str(path), "bands": [1, 2, 3], "scaling": {"method": "dtype"}}]

    files = Ran(write_pipeline(tmp, "kfiles", rasters=raster(tmp / "chips" / "chip_*.tif"), **common))
    mosaic = Ran(write_pipeline(tmp, "kmosaic", rasters=raster(vrt), **common))
    return Pair(files, mosaic, cell, {"chips": chips})


@pytest.fixture(scope="module")
def mumbai(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Pair:
    folder = scene("mumbai_train", "patches")
    tmp = tmp_path_factory.mktemp("mumbai_many")
    images = sorted(folder.glob("*_image.tif"))
    masks = sorted(folder.glob("*_mask.tif"))
    assert len(images) == len(masks) == 64
    vrt = write_vrt(tmp / "mosaic.vrt", images, alpha=True)
    labels = tmp / "reference.gpkg"
    mumbai_label_polygons(masks, labels)
    training = {"labels": {"source": "polygons", "path": str(labels), "layer": "labels", "class_field": "class"},
                "finetune": {"enabled": False}, "evaluation": {"folds": 5, "block_tiles": 6}}
    common = {"regions": {"path": str(scene("mumbai_train", "patches.gpkg")), "id_field": "patch",
                          "name_field": "patch"},
              "tiling": {"tile_size": "100m"}, "clustering": {"k": 6, "seed": 0}, "output": {"crs": "EPSG:32643"},
              "training": training, **SMALL}

    def raster(path: Path | str) -> list[dict]:
        return [{"path": str(path), "bands": [1, 2, 3], "scaling": {"method": "dtype"}}]

    files = Ran(write_pipeline(tmp, "mfiles", rasters=raster(folder / "*_image.tif"), **common))
    mosaic = Ran(write_pipeline(tmp, "mmosaic", rasters=raster(vrt), **common))
    trained = {}
    for ran in (files, mosaic):
        trained[ran.cfg.name] = train(ran.cfg)
        predict(ran.cfg, "top_model")
    return Pair(files, mosaic, 200.0, {"images": images, "masks": masks, "labels": labels, "trained": trained})


# ------------------------------------------------------------------------------------ labels

def test_polygon_labels_cover_tiles_in_every_file(mumbai: Pair) -> None:
    """Each of the 64 patches gets labels, and each label is the reference class under the tile centre."""
    cfg = mumbai.files.cfg
    ws = workspace(cfg)
    infos = load_infos(ws)
    tiles = kept_tiles(ws)
    for rule in ("centre", "area"):
        src = LabelSource(source="polygons", path=mumbai.extra["labels"], layer="labels", rule=rule)
        got = tiles.merge(tile_labels(cfg, src), on="tile_id")
        per_raster = got.groupby("raster")["tile_id"].count()
        assert len(per_raster) == 64 and per_raster.min() >= 5, rule
        if rule == "area":
            continue
        assert len(got) >= 0.98 * len(tiles)  # only tiles over unlabelled reference pixels go without
        names = sorted({"informal", "formal", "not built up"})
        for r, group in got.groupby("raster"):
            mask = next(m for m in mumbai.extra["masks"] if m.name.replace("_mask", "_image") == infos[r].path.name)
            grid, transform = mumbai_group_mask(mask, 8)
            cx, cy = (group["minx"] + group["maxx"]) / 2, (group["miny"] + group["maxy"]) / 2
            row, col = rasterio.transform.rowcol(transform, cx.to_numpy(), cy.to_numpy())
            expected = [names[v - 1] for v in grid[np.asarray(row), np.asarray(col)]]
            assert group["class"].tolist() == expected
