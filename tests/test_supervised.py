"""Supervised mapping on a real scene: labels, top model, fine tuning, blocked evaluation, prediction.

The real-scene fixture runs Olinda once with 16-pixel tiles (484 tiles, 64-pixel CNN input), labels
every tile from its NIR and red bands (the reference rule), trains, cross-validates and predicts.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pyogrio
import pytest
import rasterio
import rasterio.transform
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from settlements.cli import main
from settlements.config import LabelSource, TopModelSettings, load_config
from settlements.errors import ConfigError
from settlements.neighbours import neighbour_mean, neighbour_rows
from settlements.palette import column_keys
from settlements.pipeline import run
from settlements.rasters import load_infos
from settlements.store import workspace
from settlements.supervised.evaluation import block_folds, class_scores, cluster_quality, majority_mapping
from settlements.supervised.finetune import FineTuner, TileImages, augment
from settlements.supervised.reference import classify_pixels
from settlements.supervised.top_model import TopModel
from settlements.supervised.train import TopModelInputs, resolve_neighbours
from settlements.supervised.training_labels import read_polygons, tile_labels
from settlements.tile_tables import kept_tiles

from .conftest import run_cli, scene, write_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")  # from conftest

TRAINING = {
    "labels": {"source": "spectral"},
    "finetune": {"enabled": True, "epochs": 1, "max_tiles": 96, "batch_size": 16, "unfreeze": 2},
    "evaluation": {"folds": 3, "block_tiles": 4},
}



class Trained:
    def __init__(self, config: Path) -> None:
        self.config = config
        self.cfg = load_config(config)
        self.out = self.cfg.output_dir


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Trained:
    scene("olinda_brazil", "L7_ETMs.tif")
    tmp = tmp_path_factory.mktemp("supervised")
    config = write_pipeline(tmp, "olsup", "olinda", tiling={"tile_size": "16px"}, embedding={"input_size": 64},
                            training=TRAINING)
    run(load_config(config))
    mp = pytest.MonkeyPatch()
    try:
        for command in ("train", "predict"):
            mp.setattr(sys, "argv", ["settlements", command, str(config)])
            main()
    finally:
        mp.undo()
    return Trained(config)


# ----------------------------------------------------------------------------- small facts

def test_spectral_rule_separates_water_vegetation_and_built_up() -> None:
    green = np.array([60.0, 45.0, 80.0, 0.0])
    red = np.array([40.0, 30.0, 90.0, 0.0])
    nir = np.array([12.0, 80.0, 70.0, 0.0])
    # water: NDWI (60-12)/72 = 0.67; vegetation: NDVI (80-30)/110 = 0.45; built-up: NDVI -0.13, NDWI 0.07
    assert classify_pixels(green, red, nir, 0.3, 0.15).tolist() == [0, 1, 2, 2]


@settings(max_examples=30)
@given(st.integers(4, 30), st.integers(4, 30), st.integers(1, 5), st.integers(2, 5), st.integers(0, 99))
def test_blocks_never_straddle_folds(rows: int, cols: int, size: int, folds: int, seed: int) -> None:
    r, c = np.divmod(np.arange(rows * cols), cols)
    blocks = (r // size) * 1000 + c // size
    if len(np.unique(blocks)) < folds:
        with pytest.raises(ConfigError, match="spatial blocks"):
            block_folds(blocks, np.ones(len(blocks)), folds, seed)
        return
    fold = block_folds(blocks, np.ones(len(blocks)), folds, seed)
    per_block = pd.Series(fold).groupby(blocks).nunique()
    assert (per_block == 1).all()
    assert set(fold) == set(range(folds))


def test_class_scores_by_hand() -> None:
    y_true = np.array(["a", "a", "a", "b", "b", "c"])
    y_pred = np.array(["a", "a", "b", "b", "c", "c"])
    s = class_scores(y_true, y_pred, ["a", "b", "c"]).set_index("class")
    assert s.loc["a", "precision"] == 1.0 and s.loc["a", "recall"] == pytest.approx(2 / 3)
    assert s.loc["b", "precision"] == 0.5 and s.loc["b", "recall"] == 0.5
    assert s.loc["c", "precision"] == 0.5 and s.loc["c", "recall"] == 1.0
    assert s.loc["macro avg", "f1"] == pytest.approx(np.mean([0.8, 0.5, 2 / 3]))
    assert s.loc["macro avg", "support"] == 6


def test_cluster_quality_is_perfect_for_renamed_classes_and_low_for_noise() -> None:
    y = np.repeat(["water", "vegetation", "built-up"], 50)
    perfect = cluster_quality(y, np.repeat([7, 2, 5], 50))
    assert perfect == pytest.approx({"nmi": 1.0, "ari": 1.0, "purity": 1.0})
    noise = cluster_quality(y, np.random.default_rng(0).integers(0, 3, len(y)))
    assert noise["ari"] < 0.1 and noise["nmi"] < 0.1


def test_majority_mapping_falls_back_to_the_commonest_training_label() -> None:
    mapping, fallback = majority_mapping(np.array([0, 0, 0, 1, 1]), np.array(["a", "a", "b", "b", "b"]))
    assert mapping == {0: "a", 1: "b"} and fallback == "b"


def test_top_model_binary_probabilities_and_state_round_trip() -> None:
    rng = np.random.default_rng(1)
    x = np.vstack([rng.normal(-2, 1, (60, 5)), rng.normal(2, 1, (20, 5))]).astype(np.float32)
    y = np.array(["a"] * 60 + ["b"] * 20)
    model = TopModel(C=1.0).fit(x, y)
    p = model.predict_proba(x)
    assert p.shape == (80, 2) and np.allclose(p.sum(axis=1), 1, atol=1e-5)
    assert (model.predict(x) == y).mean() > 0.95
    again = TopModel.from_state(model.state())
    assert np.allclose(again.predict_proba(x), p)


def test_top_model_normalises_each_embedding_beside_the_other() -> None:
    """A tile's embedding and its neighbours' mean side by side: each is L2-normalised on its own, so
    rescaling either part of a row leaves the prediction as it was; a feature count not in equal parts is refused."""
    rng = np.random.default_rng(3)
    own, near = rng.normal(size=(120, 6)), rng.normal(size=(120, 6))
    y = np.where(own[:, 0] + near[:, 1] > 0, "a", "b")
    model = TopModel().fit(np.hstack([own, near]), y, parts=2)
    p = model.predict_proba(np.hstack([own, near]))
    scaled = np.hstack([own * rng.uniform(0.1, 10, (120, 1)), near * rng.uniform(0.1, 10, (120, 1))])
    np.testing.assert_allclose(model.predict_proba(scaled), p, atol=1e-5)
    assert (model.predict(np.hstack([own, near])) == y).mean() > 0.8
    whole = TopModel().fit(np.hstack([own, near]), y, parts=1)  # one 12-d vector normalised as a whole
    assert not np.allclose(whole.predict_proba(scaled), whole.predict_proba(np.hstack([own, near])), atol=1e-3)
    with pytest.raises(ValueError, match="equal parts"):
        TopModel().fit(np.hstack([own, near[:, :5]]), y, parts=2)


@pytest.mark.parametrize("context_decides", [True, False])
def test_neighbours_auto_keeps_them_only_where_they_score_better(context_decides: bool) -> None:
    """A 40 x 40 grid of tiles in 4 x 4-tile blocks. Where the class is the neighbourhood's (a tile's own
    embedding a noisy hint, its neighbours' mean a clear one), ``auto`` takes the neighbours; where each
    tile's class is its own and its neighbours' are unrelated, it keeps the tile alone."""
    rng = np.random.default_rng(4)
    side = 40
    r, c = np.divmod(np.arange(side * side), side)
    patch = ((r // 5) + (c // 5)) % 2  # 5 x 5-tile patches of two kinds
    y = np.where(patch == 1, "a", "b") if context_decides else rng.choice(["a", "b"], side * side)
    sign = np.where(y == "a", 1.0, -1.0)
    own = rng.normal(size=(side * side, 8))
    own[:, 0] += sign * (0.5 if context_decides else 2.0)
    rows = neighbour_rows(c + 0.5, -(r + 0.5), np.ones(side * side))
    inputs = TopModelInputs(own.astype(np.float32), neighbour_mean(own, rows), rows)
    blocks = (r // 4) * 100 + c // 4
    every = np.ones(side * side, bool)
    chosen, scores = resolve_neighbours(TopModelSettings(), inputs, y, blocks, every, 0)
    assert chosen.neighbours is context_decides
    gain = scores["neighbours"] - scores["alone"]
    assert gain > 0.05 if context_decides else gain < 0
    fixed, none = resolve_neighbours(TopModelSettings(neighbours=True), inputs, y, blocks, every, 0)
    assert fixed.neighbours is True and none == {}


def test_mlp_top_model_learns_a_nonlinear_boundary_and_balances_classes() -> None:
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, (400, 2)).astype(np.float32)
    y = np.where(np.hypot(x[:, 0], x[:, 1]) < 0.4, "inner", "outer")  # about 1 in 8 inside
    # points in a plane, not embeddings: their length is what tells the classes apart (no L2-normalisation)
    mlp = TopModel(hidden=32, lr=0.02, epochs=400, weight_decay=0.0, l2_normalize=False, standardise=True).fit(x, y)
    linear = TopModel(C=1.0, l2_normalize=False).fit(x, y)
    inner = y == "inner"
    assert (mlp.predict(x)[inner] == "inner").mean() > 0.9  # the rare class is found
    assert (mlp.predict(x) == y).mean() > 0.9
    assert (linear.predict(x) == y).mean() < 0.8  # no straight line separates a disc
    again = TopModel.from_state(mlp.state())
    assert np.allclose(again.predict_proba(x), mlp.predict_proba(x))


def test_augmentation_without_shift_is_a_symmetry_of_the_square() -> None:
    import torch

    x = torch.arange(2 * 5 * 5, dtype=torch.float32).reshape(2, 5, 5)
    symmetries = [torch.rot90(f, k, dims=(-2, -1)) for f in (x, x.flip(-1)) for k in range(4)]
    for seed in range(12):
        out = augment(x, np.random.default_rng(seed), 0.0)
        assert any(torch.equal(out, s) for s in symmetries)
        shifted = augment(x, np.random.default_rng(seed), 0.2)
        assert shifted.shape == x.shape


# ----------------------------------------------------------------------------- real scene

def test_blocked_cv_top_model_beats_the_kmeans_baseline(trained: Trained) -> None:
    ev = pd.read_csv(trained.out / "evaluation.csv")
    assert list(ev.columns) == ["method", "class", "precision", "recall", "f1", "support", "against"]
    assert set(ev["against"]) == {"training labels (spectral)"}  # no reference: the training labels themselves
    assert list(dict.fromkeys(ev["method"])) == ["kmeans", "top_model", "fine_tuned"]
    assert set(ev["class"]) == {"water", "vegetation", "built-up", "macro avg"}
    macro = ev[ev["class"] == "macro avg"].set_index("method")
    # every method is scored on the same held-out tiles: all 484 tiles, each held out once
    assert (macro["support"] == 484).all()
    per_class = ev[ev["class"] != "macro avg"].groupby("method")["support"].sum()
    assert (per_class == 484).all()
    # k-means labels come close on this colour-derived reference (macro F1 0.89 here), the top model closer
    assert macro.loc["top_model", "f1"] > macro.loc["kmeans", "f1"] + 0.05
    assert macro.loc["top_model", "f1"] > 0.9
    assert macro.loc["fine_tuned", "f1"] > macro.loc["kmeans", "f1"]
    assert ev[["precision", "recall", "f1"]].apply(lambda s: s.between(0, 1)).all().all()


def test_confusion_table_and_png_are_written(trained: Trained) -> None:
    conf = pd.read_csv(trained.out / "confusion.csv")
    assert list(conf.columns) == ["method", "true", "predicted", "count", "against"]
    ev = pd.read_csv(trained.out / "evaluation.csv")
    for method, group in conf.groupby("method"):
        diag = group[group["true"] == group["predicted"]].set_index("true")["count"]
        recall = ev[(ev["method"] == method) & (ev["class"] != "macro avg")].set_index("class")
        assert np.allclose(diag / recall["support"].reindex(diag.index), recall["recall"].reindex(diag.index),
                           atol=1e-4)
    assert (trained.out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cluster_quality_compares_cnn_and_colour_features(trained: Trained) -> None:
    q = pd.read_csv(trained.out / "cluster_quality.csv")
    assert list(q.columns) == ["features", "nmi", "ari", "purity", "against"]
    assert list(q["features"]) == ["cnn", "colour"]
    assert q[["nmi", "purity"]].apply(lambda s: s.between(0, 1)).all().all()
    assert (q["ari"] <= 1).all()
    assert (q["purity"] >= 280 / 484 - 1e-9).all()  # never below the share of the largest class


def test_models_are_saved_with_their_config(trained: Trained) -> None:
    """Saved as tensors and plain data: each loads with ``weights_only`` (nothing unpickled runs code)."""
    import torch

    work = trained.cfg.work_dir / "supervised"
    top = torch.load(work / "top_model.pt", weights_only=True)
    assert top["config"]["training"]["labels"]["source"] == "spectral"
    assert top["classes"] == ["built-up", "vegetation", "water"]
    # neighbours: auto, decided by a blocked cross-validation on the training labels, recorded with its
    # scores; with them the model sees twice the embedding's width
    record = json.loads((work / "training.json").read_text())
    scores = record["neighbours_macro_f1"]
    assert set(scores) == {"alone", "neighbours"} and all(0.5 < v <= 1 for v in scores.values())
    assert top["neighbours"] is record["neighbours"] is (scores["neighbours"] > scores["alone"])
    width = np.load(workspace(trained.cfg).embeddings, mmap_mode="r").shape[1]
    assert top["dim"] == (2 if top["neighbours"] else 1) * width
    assert top["params"]["l2_normalize"] and not top["params"]["standardise"]
    ckpt = torch.load(work / "finetune_checkpoint.pt", weights_only=True)
    assert ckpt["state"]["epoch"] == 1 and ckpt["params"]["input_size"] == 64
    torch.load(work / "fine_tuned.pt", weights_only=True)
    e = trained.cfg.embedding
    ft = FineTuner.load(work / "fine_tuned.pt", e.backbone, e.layer, e.weights)
    assert ft.trainable_ and all(b.startswith("body.features.") for b in ft.trainable_)
    assert len(ft.trainable_) == 2


def test_prediction_feeds_a_styled_geopackage(trained: Trained) -> None:
    gpkg = trained.out / "olsup_supervised.gpkg"
    tiles = pyogrio.read_dataframe(gpkg, layer="predicted_tiles")
    regions = pyogrio.read_dataframe(gpkg, layer="predicted_regions")
    classes = ["built-up", "vegetation", "water"]
    slug = column_keys(classes).__getitem__
    probs = tiles[[f"p_{slug(c)}" for c in classes]].to_numpy()
    assert len(tiles) == 484 and set(tiles["model"]) == {"fine_tuned"}
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-4)
    assert (np.asarray(classes)[probs.argmax(axis=1)] == tiles["class"].to_numpy()).all()
    assert np.allclose(probs.max(axis=1), tiles["probability"])
    counts = regions[[f"n_{slug(c)}" for c in classes]].sum(axis=1)
    assert (counts == regions["n_tiles"]).all()
    mapped = regions["mapped_km2"] > 0
    fracs = regions.loc[mapped, [f"frac_{slug(c)}" for c in classes]].sum(axis=1)
    assert np.allclose(fracs, 1)
    km2 = regions[[f"km2_{slug(c)}" for c in classes]].sum(axis=1)
    assert np.allclose(km2, regions["mapped_km2"])
    con = sqlite3.connect(gpkg)
    try:
        styled = {r[0] for r in con.execute("SELECT f_table_name FROM layer_styles WHERE useAsDefault = 1")}
    finally:
        con.close()
    assert styled == {"predicted_tiles", "predicted_regions"}
    assert (trained.out / "supervised_map.png").stat().st_size > 1000


def test_prediction_is_also_a_paletted_cog_of_the_predicted_classes(trained: Trained) -> None:
    """Each 16 px tile cell painted with its tile's predicted class code (edge cells at their true width), with
    the palette, attribute table and .qml the cluster map carries."""
    from rio_cogeo.cogeo import cog_validate

    from settlements.palette import NO_DATA_CODE

    path = trained.out / "olsup_predicted.tif"
    valid, errors, _ = cog_validate(str(path))
    assert valid and errors == []
    tiles = pyogrio.read_dataframe(trained.out / "olsup_supervised.gpkg", layer="predicted_tiles")
    with rasterio.open(path) as src:
        codes = src.read(1)
        cmap = src.colormap(1)
        assert src.nodata == NO_DATA_CODE and src.crs.to_epsg() == 31985
        pixel_area = abs(src.transform.a * src.transform.e)
        cells = tiles.to_crs(src.crs).geometry.area.sum()
        # each tile's centre, in the raster's CRS, falls on a pixel of that tile's class
        centres = tiles.to_crs(src.crs).geometry.centroid
        rows, cols = rasterio.transform.rowcol(src.transform, centres.x, centres.y)
    rat = ET.parse(f"{path}.aux.xml").getroot().find(".//GDALRasterAttributeTable")
    code_of = {row.findall("F")[1].text: int(row.findall("F")[0].text) for row in rat.findall("Row")}
    assert set(code_of) == {"built-up", "vegetation", "water"}
    np.testing.assert_array_equal(codes[rows, cols], tiles["class"].map(code_of).to_numpy())
    # the tiles' cells and nothing else are painted (349 x 352 px in 16 px cells: 13 px edge cells end at the edge)
    assert len(tiles) == 484
    assert int((codes != NO_DATA_CODE).sum()) * pixel_area == pytest.approx(cells, rel=1e-6)
    assert cmap[NO_DATA_CODE][3] == 0
    qml = path.with_suffix(".qml").read_text()
    assert all(f'label="{name}"' in qml for name in code_of)


def test_polygon_labels_reproduce_the_tile_classes(trained: Trained, tmp_path: Path) -> None:
    """Tiles drawn as polygons per class (in another CRS) give each tile back its class, by either rule."""
    import geopandas as gpd
    import shapely

    cfg = trained.cfg
    spectral = tile_labels(cfg, LabelSource(source="spectral"))
    tiles = kept_tiles(workspace(cfg)).merge(spectral, on="tile_id")
    crs = load_infos(workspace(cfg))[0].crs
    cells = gpd.GeoDataFrame({"landcover": tiles["class"]}, crs=crs,
                             geometry=shapely.box(tiles["minx"], tiles["miny"], tiles["maxx"], tiles["maxy"]))
    layer = cells.dissolve("landcover").reset_index().to_crs("EPSG:4326")
    path = tmp_path / "drawn.gpkg"
    layer.to_file(path, layer="classes", driver="GPKG")
    expected = spectral.sort_values("tile_id").reset_index(drop=True)
    for rule in ("centre", "area"):
        src = LabelSource(source="polygons", path=path, layer="classes", class_field="landcover", rule=rule)
        got = tile_labels(cfg, src).sort_values("tile_id").reset_index(drop=True)
        pd.testing.assert_frame_equal(got[["tile_id", "class"]], expected[["tile_id", "class"]])


def test_cluster_labels_take_names_and_the_nearest_share(trained: Trained, tmp_path: Path) -> None:
    cfg = trained.cfg
    labels_path = tmp_path / "named.labels.yaml"
    labels_path.write_text(yaml.safe_dump({"clusters": {0: {"name": "built-up"}, 1: {"name": "water"},
                                                        2: {"name": "unlabelled"}}}))
    named = cfg.model_copy(update={"labels": labels_path})
    assign = pd.read_parquet(cfg.work_dir / "assignments.parquet")
    all_named = tile_labels(named, LabelSource(source="clusters"))
    assert set(all_named["class"]) == {"built-up", "water"}  # unnamed and 'unlabelled' clusters excluded
    assert len(all_named) == int(assign["cluster"].isin([0, 1]).sum())
    near = tile_labels(named, LabelSource(source="clusters", max_distance_quantile=0.5))
    near = near.merge(assign, on="tile_id")
    for c, group in assign[assign["cluster"].isin([0, 1])].groupby("cluster"):
        kept = near[near["cluster"] == c]
        assert len(kept) == pytest.approx(len(group) / 2, abs=1)
        assert kept["distance"].max() <= group["distance"].median() + 1e-6


def test_finetuning_resumes_from_its_checkpoint(trained: Trained, tmp_path: Path) -> None:
    """One epoch, then resumed to two, matches two epochs in one go."""
    cfg = trained.cfg
    infos = load_infos(workspace(cfg))
    tiles = kept_tiles(workspace(cfg)).merge(tile_labels(cfg, LabelSource(source="spectral")), on="tile_id")
    tiles = tiles.groupby("class").head(8).reset_index(drop=True)
    emb = np.load(cfg.work_dir / "embeddings.npy")
    top = TopModel().fit(emb[tiles["emb_row"]], tiles["class"].to_numpy())
    y = np.searchsorted(top.classes_, tiles["class"].to_numpy())
    tr, va = tiles.index % 3 != 0, tiles.index % 3 == 0

    def tuner(epochs: int) -> FineTuner:
        return FineTuner("mobilenet_v2", input_size=64, epochs=epochs, batch_size=8, device="cpu")

    def data(mask: np.ndarray, aug: bool) -> TileImages:
        return TileImages(infos, tiles[mask], 64, y[mask], augment=aug, max_shift=0.125)

    ckpt = tmp_path / "ckpt.pt"
    first = tuner(1).fit(data(tr, True), data(va, False), top, ckpt)
    resumed = tuner(2).fit(data(tr, True), data(va, False), top, ckpt)
    straight = tuner(2).fit(data(tr, True), data(va, False), top, tmp_path / "other.pt")
    assert [h["epoch"] for h in resumed.history_] == [0, 1, 2]
    assert resumed.history_[:2] == first.history_
    for a, b in zip(resumed.history_, straight.history_, strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)


def test_bad_polygon_layer_names_the_file_and_column(tmp_path: Path) -> None:
    import geopandas as gpd
    import shapely

    path = tmp_path / "labels.gpkg"
    gpd.GeoDataFrame({"kind": ["water"]}, geometry=[shapely.box(0, 0, 1, 1)], crs="EPSG:4326").to_file(path)
    with pytest.raises(ConfigError, match=r"labels\.gpkg: training\.labels\.class_field: no column 'class'"):
        read_polygons(LabelSource(source="polygons", path=path))
    with pytest.raises(ConfigError, match="not found"):
        read_polygons(LabelSource(source="polygons", path=tmp_path / "missing.gpkg"))


def test_train_without_a_training_section_is_one_clear_error(tmp_path: Path, monkeypatch, capsys) -> None:
    config = write_pipeline(tmp_path, "plain", "olinda")
    code, _, err = run_cli(monkeypatch, capsys, "train", str(config))
    assert code == 2
    assert err.strip().count("\n") == 0 and "training: section missing" in err
    assert not (tmp_path / "outputs").exists()


def test_unknown_training_key_is_a_config_error(tmp_path: Path) -> None:
    config = write_pipeline(tmp_path, "typo", "olinda", training={"labels": {"source": "spectral"}, "epochz": 3})
    with pytest.raises(ConfigError, match=r"training\.epochz: unknown key"):
        load_config(config)
    config = write_pipeline(tmp_path, "nopath", "olinda", training={"labels": {"source": "polygons"}})
    with pytest.raises(ConfigError, match="needs 'path'"):
        load_config(config)
