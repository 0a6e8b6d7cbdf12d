"""Many rasters give what one mosaic of the same pixels gives: same tiles, embeddings, clusters,
histograms, labels and evaluation blocks.

Two real inputs, each run twice (module fixtures, one run each): the Kampala drone mosaic cut into
64 GeoTIFF chips of 96 x 64 px (neighbours touch) beside a VRT of those chips; and the 64 separate
Mumbai patches (600 x 600 px, 400 m apart) beside a VRT of them whose gaps are alpha 0. Tiles are
small and the CNN input 32 px so that each run takes seconds.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import pytest
import rasterio
import rasterio.transform
import shapely
import torch

from settlements.cli import run_summary
from settlements.config import LabelSource, load_config
from settlements.embedding import infer
from settlements.embedding.infer import TileStream, forward, iter_batches
from settlements.pipeline import predict, stage_embed, train
from settlements.rasters import load_infos
from settlements.store import workspace
from settlements.supervised.evaluation import block_side_m, spatial_blocks
from settlements.supervised.finetune import TileImages
from settlements.supervised.train import colour_features
from settlements.supervised.training_labels import tile_labels
from settlements.tile_tables import kept_tiles
from settlements.tiling import WINDOW_COLUMNS
from settlements.validate import validate

from .conftest import Ran, run_cli, scene, write_pipeline
from .many_files import cut_chips, match_tiles, mumbai_group_mask, mumbai_label_polygons, write_vrt

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


# ------------------------------------------------------------------------------- spatial blocks

def _blocks(ran: Ran, block_tiles: int) -> pd.DataFrame:
    ws = workspace(ran.cfg)
    tiles = kept_tiles(ws)
    side = block_side_m(ran.cfg.tiling.stride_length, load_infos(ws), tiles, block_tiles)
    return tiles.assign(block=spatial_blocks(tiles, side), side=side)


def test_spatial_blocks_lie_on_the_ground_across_files(kampala: Pair) -> None:
    """Blocks of 4 x 4 tiles span neighbouring chips, and the chips get the blocks the mosaic gets."""
    files, mosaic = _blocks(kampala.files, 4), _blocks(kampala.mosaic, 4)
    i, j = match_tiles(files, mosaic, kampala.cell)
    assert len(i) == len(files) == len(mosaic) == 384
    assert np.array_equal(files["block"].to_numpy()[i], mosaic["block"].to_numpy()[j])
    rasters_per_block = files.groupby("block")["raster"].nunique()
    assert (rasters_per_block > 1).mean() > 0.9  # a chip is 3 x 2 tiles: most blocks hold several
    assert files.groupby("block").size().max() <= 16
    side = float(files["side"].iloc[0])
    info = load_infos(workspace(kampala.files.cfg))[0]
    assert side == pytest.approx(4 * 32 * np.sqrt(info.pixel_w_m * info.pixel_h_m), rel=1e-3)
    spread = files.groupby("block").agg(x=("ground_x", np.ptp), y=("ground_y", np.ptp))
    assert (spread.to_numpy() < side).all()


def test_training_on_many_patches_evaluates_as_on_one_mosaic(mumbai: Pair) -> None:
    """block_tiles 6 on the 64 patches trains; the blocked evaluation equals the mosaic's (same folds)."""
    runs = mumbai.extra["trained"]
    for name in ("mfiles", "mmosaic"):
        assert runs[name]["labelled_tiles"] >= 0.98 * 576
        assert set(runs[name]["classes"]) == {"formal", "informal", "not built up"}
    a, b = (pd.read_csv(r.cfg.output_dir / "evaluation.csv") for r in (mumbai.files, mumbai.mosaic))
    pd.testing.assert_frame_equal(a[["method", "class", "support"]], b[["method", "class", "support"]])
    np.testing.assert_allclose(a[["precision", "recall", "f1"]], b[["precision", "recall", "f1"]], atol=0.02)
    files, mosaic = _blocks(mumbai.files, 6), _blocks(mumbai.mosaic, 6)
    assert float(files["side"].iloc[0]) == 600.0
    i, j = match_tiles(files, mosaic, mumbai.cell)
    assert len(i) == len(files) == len(mosaic) == 576
    assert np.array_equal(files["block"].to_numpy()[i], mosaic["block"].to_numpy()[j])


# ---------------------------------------------------------------------------- files == mosaic

def _kept(ran: Ran) -> pd.DataFrame:
    ws = workspace(ran.cfg)
    return kept_tiles(ws).merge(pd.read_parquet(ws.assignments), on="tile_id")


@pytest.mark.parametrize("scene_pair", ["kampala", "mumbai"])
def test_many_files_give_what_one_mosaic_gives(scene_pair: str, request: pytest.FixtureRequest) -> None:
    """Same ground cells, embeddings within float tolerance, the same cluster per cell (fixed seed),
    the same region histograms and the same cluster map, whatever the files' order."""
    pair: Pair = request.getfixturevalue(scene_pair)
    a, b = _kept(pair.files), _kept(pair.mosaic)
    assert a["raster"].nunique() == 64 and b["raster"].nunique() == 1
    i, j = match_tiles(a, b, pair.cell)
    assert len(i) == len(a) == len(b)
    assert not np.array_equal(a["tile_id"].to_numpy()[i], b["tile_id"].to_numpy()[j])  # the orders differ
    np.testing.assert_allclose(a["valid_cell"].to_numpy()[i], b["valid_cell"].to_numpy()[j])
    ea, eb = (np.load(workspace(r.cfg).embeddings) for r in (pair.files, pair.mosaic))
    ea, eb = ea[a["emb_row"].to_numpy()[i]], eb[b["emb_row"].to_numpy()[j]]
    np.testing.assert_allclose(ea, eb, rtol=0, atol=1e-4 * float(np.abs(eb).max()))
    assert np.array_equal(a["cluster"].to_numpy()[i], b["cluster"].to_numpy()[j])
    np.testing.assert_allclose(a["distance"].to_numpy()[i], b["distance"].to_numpy()[j], rtol=1e-4, atol=1e-4)

    ta, tb = (pyogrio.read_dataframe(r.gpkg, layer="tiles") for r in (pair.files, pair.mosaic))
    assert len(ta) == len(a) and ta["raster"].nunique() == 64 and ta.geometry.notna().all()
    for frame in (ta, tb):
        frame[["minx", "miny", "maxx", "maxy"]] = frame.geometry.bounds.to_numpy()
    ti, tj = match_tiles(ta, tb, pair.cell)
    assert len(ti) == len(ta) == len(tb)
    for column in ("cluster", "label", "region_id"):
        assert np.array_equal(ta[column].to_numpy()[ti], tb[column].to_numpy()[tj]), column

    ra, rb = (pyogrio.read_dataframe(r.gpkg, layer="regions").sort_values("region_id").reset_index(drop=True)
              for r in (pair.files, pair.mosaic))
    numbers = [c for c in ra.columns if c.split("_")[0] in ("n", "frac", "km2") or c.endswith("_km2")]
    assert len(ra) == len(rb) and "km2_c0" in numbers and "mapped_km2" in numbers
    pd.testing.assert_frame_equal(ra[["region_id", "dominant_label", *numbers]],
                                  rb[["region_id", "dominant_label", *numbers]], rtol=1e-9)
    assert (ra["n_tiles"] > 0).all()
    ha, hb = (pyogrio.read_dataframe(r.gpkg, layer="histogram").sort_values(["region_id", "kind", "class"])
              .reset_index(drop=True) for r in (pair.files, pair.mosaic))
    pd.testing.assert_frame_equal(ha, hb, rtol=1e-9)

    with rasterio.open(pair.files.report.outputs["cluster_map"]) as fa, \
            rasterio.open(pair.mosaic.report.outputs["cluster_map"]) as fb:
        assert fa.shape == fb.shape and fa.transform.almost_equals(fb.transform)
        ca, cb = fa.read(1), fb.read(1)
    assert np.array_equal(ca, cb)
    assert (ca > 0).sum() == len(a)  # one pixel per kept tile cell


# ----------------------------------------------------------------------------------- counters

def test_counters_say_what_became_of_every_tile(mumbai: Pair) -> None:
    """The mosaic's gaps are read and skipped as nodata, never counted as embedded; the files have no gaps."""
    files, mosaic = mumbai.files.report, mumbai.mosaic.report
    assert files.tiles["tiles"] == 576 and files.tiles["rasters"] == 64
    assert files.embedding == {"tiles_embedded": 576, "tiles_reused": 0, "tiles_kept": 576, "tiles_skipped": 0,
                               "tiles_skipped_nodata": 0, "tiles_skipped_invalid": 0, "tiles_read": 576}
    assert mosaic.tiles["tiles"] == 43 * 31 and mosaic.tiles["tiles_outside_regions"] == 43 * 31 - 576
    assert mosaic.embedding == {"tiles_embedded": 576, "tiles_reused": 0, "tiles_kept": 576, "tiles_skipped": 757,
                                "tiles_skipped_nodata": 757, "tiles_skipped_invalid": 0, "tiles_read": 1333}
    line = run_summary(mumbai.mosaic.cfg, mosaic)
    assert line.startswith("mmosaic: 1333 tiles in 1 raster(s); 576 kept (576 embedded, 0 reused from cache); "
                           "757 skipped (757 without valid pixels, 0 over 50% invalid); "
                           "757 outside every region (in no histogram); k=6 (10 restarts, agreement ARI "), line
    runs = pyogrio.read_dataframe(mumbai.mosaic.gpkg, layer="runs", read_geometry=False)
    assert runs[["tiles_total", "tiles_kept", "tiles_embedded", "tiles_reused", "tiles_skipped",
                 "tiles_skipped_nodata", "tiles_skipped_invalid", "tiles_outside_regions",
                 "cells_clipped"]].iloc[-1].tolist() == [1333, 576, 576, 0, 757, 757, 0, 757, 0]


def test_validate_counts_the_tiles_a_run_makes(mumbai: Pair) -> None:
    """validate builds tiles as the tile stage does; it knows the skips of plain files, not of alpha."""
    files, mosaic = (validate(r.cfg) for r in (mumbai.files, mumbai.mosaic))
    assert files.tiles == 576 and [r.skips for r in files.rasters] == [0] * 64
    assert all(r.tiles == 9 and r.regions_met == 1 and r.overlap_km2 == pytest.approx(0.09, rel=2e-3)
               for r in files.rasters)  # UTM squares, measured in an equal-area CRS
    assert mosaic.tiles == 1333 and mosaic.rasters[0].skips is None and mosaic.rasters[0].outside == 757
    assert mosaic.rasters[0].regions_met == 64
    out = "\n".join(files.lines())  # what `settlements validate` prints
    assert out.endswith("total: 576 tiles for k=6; 0 will be skipped at raster edges"), out
    out = "\n".join(mosaic.lines())
    assert "-> 1333 tiles; meets 64 region(s), 5.75 km²; skips known only once read (nodata, mask or alpha); " \
           "757 outside every region" in out, out


def test_validate_predicts_the_edge_skips_of_a_run(tmp_path: Path, monkeypatch, capsys) -> None:
    """48 px tiles on a 256 px chip: the last row and column hold a third of a tile, and both
    validate and the run skip those 11 tiles as too invalid, not as nodata."""
    chip = sorted(scene("kampala_oam").glob("OAM-*-19.tif"))[0]
    config = write_pipeline(tmp_path, "edge", "kampala", rasters=[{"path": str(chip), "bands": [1, 2, 3]}],
                            tiling={"tile_size": "48px"}, clustering={"k": 2}, **SMALL)
    checked = validate(load_config(config))
    assert checked.tiles == 36 and checked.rasters[0].skips == 11
    code, out, err = run_cli(monkeypatch, capsys, "run", str(config))
    assert code == 0, err
    assert out.startswith("edge: 36 tiles in 1 raster(s); 25 kept (25 embedded, 0 reused from cache); "
                          "11 skipped (0 without valid pixels, 11 over 50% invalid); "
                          "k=2 (10 restarts, agreement ARI "), out
    code, out, err = run_cli(monkeypatch, capsys, "run", str(config), "--force")
    assert code == 0 and "25 kept (0 embedded, 25 reused from cache); 11 skipped (0 without valid pixels, 11 " in out


def test_tiles_of_many_files_are_read_with_few_files_open(kampala: Pair) -> None:
    """Colour statistics and fine-tuning images of all 64 chips, with room for only 48 more open files
    (a country of Sentinel-2 granules exceeds a desktop's 1,024): the same values as from the mosaic."""
    import os
    import resource

    a, b = (kept_tiles(workspace(r.cfg)) for r in (kampala.files, kampala.mosaic))
    infos_a, infos_b = (load_infos(workspace(r.cfg)) for r in (kampala.files, kampala.mosaic))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 48, hard))
    try:
        features = colour_features(infos_a, a)
        images = TileImages(infos_a, a, 32)
        pixels = torch.stack([images[i][0] for i in range(len(images))])
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    i, j = match_tiles(a, b, kampala.cell)
    np.testing.assert_allclose(features[i], colour_features(infos_b, b)[j], rtol=1e-6, atol=1e-6)
    mosaic = TileImages(infos_b, b, 32)
    assert torch.equal(pixels[i[:20]], torch.stack([mosaic[int(k)][0] for k in j[:20]]))


def test_batches_span_files_and_each_file_keeps_its_own_cache(kampala: Pair, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The 384 tiles of the 64 chips (6 each) are one stream: 12 forward passes of 32 tiles, not 64 of 6;
    each chip's embeddings still go to its own cache key and equal the run's bit for bit, also when two
    workers hand the batches on out of order (each reads its own half)."""
    files = kampala.files.cfg
    sizes: list[int] = []

    def counted(model: torch.nn.Module, x: torch.Tensor, *args: object) -> torch.Tensor:
        sizes.append(len(x))
        return forward(model, x, *args)

    monkeypatch.setattr(infer, "forward", counted)
    for workers in (0, 2):
        work = tmp_path / f"work{workers}"
        embedding = files.embedding.model_copy(update={"num_workers": workers})
        cfg = files.model_copy(update={"output": files.output.model_copy(update={"work_dir": work}),
                                       "embedding": embedding})
        work.mkdir()
        for name in ("rasters.json", "tiles.parquet"):
            shutil.copy(files.work_dir / name, work / name)
        sizes.clear()
        counts = stage_embed(cfg)
        assert counts["tiles_embedded"] == 384 and sizes == [32] * 12
        shards = sorted((work / "cache").iterdir())
        assert len(shards) == 64 and {len(list(s.glob("chunk-*.npz"))) for s in shards} == {1}
        assert {len(np.load(next(s.glob("chunk-*.npz")))["windows"]) for s in shards} == {6}
        assert np.array_equal(np.load(workspace(cfg).embeddings), np.load(workspace(files).embeddings))


def test_a_reading_process_keeps_few_files_open(kampala: Pair) -> None:
    """Reading the 64 chips with room for 20 more open files: each process (this one, or each of two
    workers) holds at most 4 datasets open; without the bound 64 would be opened."""
    import os
    import resource

    ws = workspace(kampala.files.cfg)
    tiles = pd.read_parquet(ws.tiles)
    windows = tiles[WINDOW_COLUMNS].to_numpy()
    stream = TileStream(load_infos(ws), tiles["raster"].to_numpy(), windows[:, :4], windows[:, 4:], 32, 16,
                        open_limit=4)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 20, hard))
    try:
        held = []
        for i in range(len(stream)):
            stream[i]
            held.append(len(stream._open._open))
        read = sum(len(b.index) for b in iter_batches(stream, 2))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        stream.close()
    assert max(held) == 4 and read == len(tiles) == 384


def test_prediction_covers_every_patch_as_on_the_mosaic(mumbai: Pair) -> None:
    """predicted_tiles holds every kept tile of the 64 files at its cell; classes, region histograms and
    the class map equal the mosaic's."""
    a, b = (pyogrio.read_dataframe(r.cfg.output_dir / f"{r.cfg.name}_supervised.gpkg", layer="predicted_tiles")
            for r in (mumbai.files, mumbai.mosaic))
    assert len(a) == len(b) == 576 and a["raster"].nunique() == 64 and a.geometry.notna().all()
    kept = kept_tiles(workspace(mumbai.files.cfg)).set_index("tile_id").loc[a["tile_id"]]
    cells = shapely.box(*(kept[c].to_numpy() for c in ("minx", "miny", "maxx", "maxy")))
    assert shapely.equals_exact(a.geometry.values, cells, tolerance=1e-6).all()
    for frame in (a, b):
        frame[["minx", "miny", "maxx", "maxy"]] = frame.geometry.bounds.to_numpy()
    i, j = match_tiles(a, b, mumbai.cell)
    assert len(i) == 576
    assert np.array_equal(a["class"].to_numpy()[i], b["class"].to_numpy()[j])
    # the top model is fitted on the rows in another order: equal to the solver's tolerance
    np.testing.assert_allclose(a["probability"].to_numpy()[i], b["probability"].to_numpy()[j], atol=0.01)
    ra, rb = (pyogrio.read_dataframe(r.cfg.output_dir / f"{r.cfg.name}_supervised.gpkg", layer="predicted_regions")
              .sort_values("region_id").reset_index(drop=True) for r in (mumbai.files, mumbai.mosaic))
    assert (ra["n_tiles"] == 9).all()
    np.testing.assert_allclose(ra["mapped_km2"], rb["mapped_km2"], rtol=1e-9)
    with rasterio.open(mumbai.files.cfg.output_dir / "mfiles_predicted.tif") as fa, \
            rasterio.open(mumbai.mosaic.cfg.output_dir / "mmosaic_predicted.tif") as fb:
        ca, cb = fa.read(1), fb.read(1)
        assert fa.transform.almost_equals(fb.transform)
    assert (ca > 0).sum() == 576 and np.array_equal(ca, cb)
