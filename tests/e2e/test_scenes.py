"""Facts about real pipeline runs on the scenes in ../shared/data."""

from __future__ import annotations

import json
import sqlite3

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import pytest
import rasterio
import rasterio.features
import shapely
from pyproj import CRS, Geod

from settlements.clustering import RESTART_AGREEMENT
from settlements.palette import column_keys

from ..conftest import Ran

pytestmark = pytest.mark.slow
GEOD = Geod(ellps="WGS84")


def layer(ran: Ran, name: str) -> pd.DataFrame:
    return pyogrio.read_dataframe(ran.gpkg, layer=name)


def label_keys(ran: Ran) -> list[str]:
    """The regions layer's label column keys, labels in palette order (first cluster id)."""
    return list(column_keys(list(dict.fromkeys(layer(ran, "clusters")["label"]))).values())


def test_every_valid_pixel_lies_in_exactly_one_cell(any_scene: Ran) -> None:
    tiles = pd.read_parquet(any_scene.work / "tiles.parquet")
    for r, group in tiles.groupby("raster"):
        h = int((group["cell_row"] + group["cell_h"]).max())
        w = int((group["cell_col"] + group["cell_w"]).max())
        cov = np.zeros((h, w), dtype=np.int16)
        for c0, r0, cw, ch in group[["cell_col", "cell_row", "cell_w", "cell_h"]].itertuples(index=False):
            cov[r0: r0 + ch, c0: c0 + cw] += 1
        with rasterio.open(sorted({p for p in _raster_paths(any_scene)})[r]) as src:
            assert (h, w) == (src.height, src.width)
        assert (cov == 1).all()


def _raster_paths(ran: Ran) -> list[str]:
    import json

    return [d["path"] for d in json.loads((ran.work / "rasters.json").read_text())["rasters"]]


def test_output_crs_is_the_configured_one(any_scene: Ran) -> None:
    for name in ("tiles", "regions"):
        info = pyogrio.read_info(any_scene.gpkg, layer=name)
        assert CRS.from_user_input(info["crs"]) == CRS.from_user_input(any_scene.cfg.output.crs)


def test_geopackage_is_version_1_2_with_styles_for_both_layers(any_scene: Ran) -> None:
    con = sqlite3.connect(any_scene.gpkg)
    try:
        assert con.execute("PRAGMA application_id").fetchone()[0] == 0x47504B47
        assert con.execute("PRAGMA user_version").fetchone()[0] == 10200
        rows = con.execute("SELECT f_table_name, f_table_schema, f_geometry_column, useAsDefault, styleQML "
                           "FROM layer_styles").fetchall()
        tables = {r[0] for r in con.execute("SELECT table_name FROM gpkg_contents")}
    finally:
        con.close()
    assert {"tiles", "regions", "clusters", "runs", "layer_styles"} <= tables
    by_layer = {r[0]: r for r in rows}
    assert set(by_layer) == {"tiles", "regions", "changes", "tile_changes", "examples", "negatives"}
    for name, row in by_layer.items():
        assert row[1] == "" and row[2] == "geom" and row[3] == 1
        # the layers to draw examples in for `settlements similar`: outlines only
        assert ("singleSymbol" if name in ("examples", "negatives") else "categorizedSymbol") in row[4]


def test_histogram_counts_sum_to_the_region_tiles(any_scene: Ran) -> None:
    regions = layer(any_scene, "regions")
    clusters = layer(any_scene, "clusters")
    k = len(clusters)
    cluster_counts = regions[[f"n_c{i}" for i in range(k)]].sum(axis=1)
    assert (cluster_counts == regions["n_tiles"]).all()
    label_counts = regions[[f"n_{key}" for key in label_keys(any_scene)]].sum(axis=1)
    assert (label_counts == regions["n_tiles"]).all()
    tiles = layer(any_scene, "tiles")
    assert regions["n_tiles"].sum() >= tiles["region_id"].notna().sum()


def test_fractions_sum_to_one(any_scene: Ran) -> None:
    regions = layer(any_scene, "regions")
    clusters = layer(any_scene, "clusters")
    mapped = regions["mapped_km2"] > 0
    assert mapped.any()
    for cols in ([f"frac_c{i}" for i in range(len(clusters))],
                 [f"frac_{key}" for key in label_keys(any_scene)]):
        sums = regions.loc[mapped, cols].sum(axis=1)
        assert np.allclose(sums, 1.0, atol=1e-9)
    assert (regions.loc[~mapped, "dominant_label"].isna()).all()


def test_label_areas_add_up_to_the_mapped_area(any_scene: Ran) -> None:
    regions = layer(any_scene, "regions")
    total = regions[[f"km2_{key}" for key in label_keys(any_scene)]].sum(axis=1)
    assert np.allclose(total, regions["mapped_km2"], rtol=1e-9, atol=1e-12)
    assert (regions["mapped_km2"] <= regions["imaged_km2"] + 1e-12).all()
    assert (regions["imaged_km2"] <= regions["area_km2"] * (1 + 1e-6)).all()


def _valid_footprint(path: str, bands: list[int]) -> tuple[shapely.Geometry, CRS]:
    """Polygon of valid pixels, from the raster's own masks (independent of the pipeline)."""
    with rasterio.open(path) as src:
        mask = np.all(src.read_masks(bands) > 0, axis=0).astype(np.uint8)
        shapes = [shapely.geometry.shape(g) for g, v in rasterio.features.shapes(mask, transform=src.transform)
                  if v == 1]
        return shapely.union_all(shapes), CRS.from_user_input(src.crs)


def _geodesic_km2(geom: shapely.Geometry, crs: CRS) -> float:
    lonlat = gpd.GeoSeries([shapely.segmentize(geom, _seg(crs))], crs=crs).to_crs(4326).iloc[0]
    return abs(GEOD.geometry_area_perimeter(lonlat)[0]) / 1e6


def _seg(crs: CRS) -> float:
    return 1e-4 if crs.is_geographic else 10.0


@pytest.mark.parametrize("scene_name", ["olinda", "bangalore", "swellendam"])
def test_label_areas_match_independent_valid_area(scene_name: str, request: pytest.FixtureRequest) -> None:
    """Region km2 per label sum to the region's area covered by valid imagery (geodesic, within 1 %)."""
    ran: Ran = request.getfixturevalue(scene_name)
    (path,) = _raster_paths(ran)
    footprint, rcrs = _valid_footprint(path, list(ran.cfg.rasters[0].bands))
    regions = layer(ran, "regions")
    source = gpd.read_parquet(ran.work / "regions.parquet").to_crs(rcrs)
    ours = regions[[f"km2_{key}" for key in label_keys(ran)]].sum(axis=1).to_numpy()
    big = np.argsort(-regions["imaged_km2"].to_numpy())[:25]
    checked = 0
    for i in big:
        covered = shapely.intersection(source.geometry.iloc[i], footprint)
        if covered.is_empty:
            continue
        expected = _geodesic_km2(covered, rcrs)
        if expected < 0.05:  # a sliver under 0.05 km2 is smaller than a handful of tiles
            continue
        assert ours[i] == pytest.approx(expected, rel=0.01), regions["region_id"].iloc[i]
        checked += 1
    assert checked >= 1


def test_tiles_layer_carries_cluster_label_distance_region_raster(any_scene: Ran) -> None:
    tiles = layer(any_scene, "tiles")
    assert {"cluster", "label", "distance", "region_id", "raster"} <= set(tiles.columns)
    assert (tiles["distance"] >= 0).all()
    assert tiles["cluster"].between(0, any_scene.cfg.clustering.k - 1).all()
    assert len(tiles) == any_scene.report.embedding["tiles_kept"]


def test_clusters_and_runs_tables(any_scene: Ran) -> None:
    clusters = layer(any_scene, "clusters")
    assert list(clusters["cluster"]) == list(range(any_scene.cfg.clustering.k))
    assert clusters["size"].sum() == any_scene.report.embedding["tiles_kept"]
    assert (np.diff(clusters["size"]) <= 0).all()  # ids ordered by size
    assert clusters["colour"].str.match(r"^#[0-9a-f]{6}$").all()
    runs = layer(any_scene, "runs")
    assert len(runs) == 1
    assert len(runs["weights_sha256"].iloc[0]) == 64
    assert runs["backbone"].iloc[0] == "mobilenet_v2"
    # the defaults: MobileNetV2 cut at features.15, 10 k-means restarts whose agreement is recorded
    assert runs["layer"].iloc[0] == "features.15"
    restarts = json.loads((any_scene.work / "clusters.json").read_text())["restarts"]
    assert runs[["restarts", "restart_ari_min", "restart_ari_mean"]].iloc[0].tolist() == [
        10, restarts["min"], restarts["mean"]]
    assert 0 < restarts["min"] <= restarts["mean"] <= 1
    # on real scenes the restarts agree, so no warning (structureless data warns: test_clustering)
    assert restarts["mean"] >= RESTART_AGREEMENT
    assert not any("restarts agree little" in w for w in json.loads(runs["warnings"].iloc[0]))


def test_multi_file_input_reads_all_six_chips(kampala: Ran) -> None:
    tiles = layer(kampala, "tiles")
    assert tiles["raster"].nunique() == 6


def test_nodata_pixels_are_invalid_and_tiles_skipped(bangalore: Ran) -> None:
    emb = pd.read_parquet(bangalore.work / "embedded.parquet")
    assert (emb["valid_tile"] < 1).any()
    assert bangalore.report.embedding["tiles_skipped"] > 0
    assert (emb.loc[emb["kept"], "valid_tile"] >= 0.5).all()
    assert (emb.loc[~emb["kept"], "valid_tile"] < 0.5).all()


def test_edge_tiles_reaching_past_the_raster_are_skipped_by_their_invalid_share(swellendam: Ran) -> None:
    emb = pd.read_parquet(swellendam.work / "embedded.parquet")
    tiles = pd.read_parquet(swellendam.work / "tiles.parquet").merge(emb, on="tile_id")
    inner = tiles[(tiles["tile_col"] >= 0) & (tiles["tile_row"] >= 0)
                  & (tiles["tile_col"] + tiles["tile_w"] <= 1098) & (tiles["tile_row"] + tiles["tile_h"] <= 3039)]
    assert (inner["valid_tile"] == 1).all()
    assert (tiles["valid_tile"] < 1).any()
    limit = 1 - swellendam.cfg.tiling.max_invalid_fraction
    assert (tiles["kept"] == (tiles["valid_tile"] >= limit)).all()


def test_pictures_are_written(any_scene: Ran) -> None:
    from PIL import Image

    for name in ("atlas", "histograms", "map"):
        path = any_scene.report.outputs[name]
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 400 and im.height > 300
            arr = np.asarray(im.convert("RGB"))
            assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 20  # real content, not a blank canvas


def test_labels_round_trip_renames_every_output(olinda: Ran, tmp_path) -> None:
    """Write names into the labels YAML, export again: tables, layers, styles and histograms follow."""
    import yaml

    from settlements.labels import read_labels
    from settlements.pipeline import stage_export

    template = yaml.safe_load(olinda.cfg.labels_path.read_text())
    sizes = {int(k): v["size"] for k, v in template["clusters"].items()}
    assert sum(sizes.values()) == olinda.report.embedding["tiles_kept"]
    names = {0: "vegetation", 1: "town", 2: "town"}
    template["clusters"] = {cid: {"name": names.get(cid, f"class {cid}"), "colour": "#123456" if cid == 1 else None,
                                  "size": s} for cid, s in sizes.items()}
    labels_path = tmp_path / "olinda.labels.yaml"
    labels_path.write_text(yaml.safe_dump(template))
    cfg = olinda.cfg.model_copy(update={"labels": labels_path,
                                        "output": olinda.cfg.output.model_copy(update={"dir": tmp_path / "out"})})
    outputs = stage_export(cfg)
    clusters = pyogrio.read_dataframe(outputs["gpkg"], layer="clusters")
    assert list(clusters["label"][:3]) == ["vegetation", "town", "town"]
    assert clusters.loc[clusters["label"] == "town", "colour"].unique().tolist() == ["#123456"]
    tiles = pyogrio.read_dataframe(outputs["gpkg"], layer="tiles")
    assert (tiles.loc[tiles["cluster"].isin([1, 2]), "label"] == "town").all()
    regions = pyogrio.read_dataframe(outputs["gpkg"], layer="regions")
    np.testing.assert_allclose(regions["n_town"], regions["n_c1"] + regions["n_c2"])
    np.testing.assert_allclose(regions["km2_town"], regions["km2_c1"] + regions["km2_c2"], rtol=1e-9)
    con = sqlite3.connect(outputs["gpkg"])
    qml = con.execute("SELECT styleQML FROM layer_styles WHERE f_table_name = 'tiles'").fetchone()[0]
    con.close()
    assert 'value="town"' in qml and "18,52,86,255" in qml and "cluster 1" not in qml
    assert read_labels(labels_path, 8).names[2] == "town"
