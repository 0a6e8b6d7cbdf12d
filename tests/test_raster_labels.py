"""Labels from class rasters: the hand-labelled Mumbai masks, reprojected, coarser images, nodata, bad codes."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import rasterio.warp
from rasterio.enums import Resampling

from settlements.config import LabelSource, load_config
from settlements.errors import ConfigError
from settlements.pipeline import run, stage_tile
from settlements.rasters import load_infos
from settlements.store import read_table, workspace
from settlements.supervised.raster_labels import raster_labels

from .conftest import scene, write_pipeline

PATCHES = "tile_1.1*"  # 8 of the 64 patches: 288 tiles of 50 m
CLASSES = {1: "informal", 2: "built-up", 3: "impervious", 4: "vegetation", 5: "barren", 6: "water"}
GROUPS = {"informal": {"classes": ["informal"]},
          "formal": {"classes": ["built-up", "impervious"], "below": {"informal": 0.1}},
          "not built up": {"classes": ["vegetation", "barren", "water"], "below": {"informal": 0.1}}}


def source(path: Path | str, **kw: object) -> LabelSource:
    return LabelSource.model_validate({"source": "raster", "path": str(path), "classes": CLASSES, "ignore": [0],
                                       "groups": GROUPS, **kw})


def expected_class(codes: np.ndarray, min_labelled: float = 0.5) -> str | None:
    """The issue's reference rule, written out on one cell's mask pixels."""
    labelled = codes[(codes != 255) & (codes != 0)]
    if labelled.size < min_labelled * codes.size:
        return None
    share = np.bincount(labelled, minlength=7)[1:] / labelled.size
    informal, formal, open_land = share[0], share[1] + share[2], share[3:].sum()
    if informal >= 0.5:
        return "informal"
    if formal >= 0.5 and informal < 0.1:
        return "formal"
    if open_land >= 0.5 and informal < 0.1:
        return "not built up"
    return None


def by_hand(tiles: pd.DataFrame, infos: list, mask_of) -> pd.DataFrame:
    rows = []
    for r, group in tiles.groupby("raster"):
        with rasterio.open(mask_of(infos[r].path)) as src:
            mask = src.read(1)
        for tid, c, row, w, h in group[["tile_id", "cell_col", "cell_row", "cell_w", "cell_h"]].itertuples(
                index=False):
            cls = expected_class(mask[row: row + h, c: c + w])
            if cls is not None:
                rows.append((tid, cls))
    return pd.DataFrame(rows, columns=["tile_id", "class"])


def sort(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values("tile_id").reset_index(drop=True)[["tile_id", "class"]].astype({"tile_id": np.int64})


class Tiled:
    def __init__(self, config: Path) -> None:
        self.cfg = load_config(config)
        stage_tile(self.cfg)
        self.infos = load_infos(workspace(self.cfg))
        self.tiles = read_table(workspace(self.cfg).tiles, "tile")


def mask_path(image: Path) -> Path:
    return image.with_name(image.name.replace("_image.tif", "_mask.tif"))


@pytest.fixture(scope="module")
def mumbai(tmp_path_factory: pytest.TempPathFactory) -> Tiled:
    patches = scene("mumbai_train", "patches")
    tmp = tmp_path_factory.mktemp("mumbai")
    config = write_pipeline(tmp, "mumbai8", rasters=[{"path": str(patches / f"{PATCHES}_image.tif")}],
                            regions={"path": str(patches.parent / "patches.gpkg"), "id_field": "patch"},
                            tiling={"tile_size": "50m"}, embedding={"input_size": 32}, clustering={"k": 4})
    return Tiled(config)


def test_each_cell_takes_the_reference_class_of_its_own_mask(mumbai: Tiled) -> None:
    """A glob of 64 masks: each image finds its own by footprint; classes equal the rule applied by hand."""
    got = raster_labels(mumbai.infos, mumbai.tiles, source(scene("mumbai_train", "patches") / "*_mask.tif"))
    want = by_hand(mumbai.tiles, mumbai.infos, mask_path)
    pd.testing.assert_frame_equal(sort(got), sort(want))
    assert set(got["class"]) == {"informal", "formal", "not built up"}
    assert 0.8 * len(mumbai.tiles) < len(got) < len(mumbai.tiles)  # mixed cells are left out


def test_without_groups_each_class_is_its_own_and_needs_min_share(mumbai: Tiled) -> None:
    src = LabelSource(source="raster", path=scene("mumbai_train", "patches") / "*_mask.tif", classes=CLASSES,
                      ignore=[0], min_share=0.6)
    got = sort(raster_labels(mumbai.infos, mumbai.tiles, src))
    info = mumbai.infos[0]
    with rasterio.open(mask_path(info.path)) as m:
        mask = m.read(1)
    tiles = mumbai.tiles[mumbai.tiles["raster"] == 0]
    for tid, c, row in tiles[["tile_id", "cell_col", "cell_row"]].itertuples(index=False):
        px = mask[row: row + 100, c: c + 100]
        px = px[(px != 0) & (px != 255)]
        share = np.bincount(px, minlength=7) / px.size
        best = int(share.argmax())
        hit = got[got["tile_id"] == tid]["class"].tolist()
        assert hit == ([CLASSES[best]] if share[best] >= 0.6 else [])


def test_a_mask_in_another_crs_gives_the_same_classes(mumbai: Tiled, tmp_path: Path) -> None:
    """Masks warped to geographic coordinates (nearest, nodata outside) label the cells almost as the originals."""
    for info in mumbai.infos:
        with rasterio.open(mask_path(info.path)) as src:
            transform, w, h = rasterio.warp.calculate_default_transform(src.crs, "EPSG:4326", src.width, src.height,
                                                                        *src.bounds)
            profile = src.profile | {"crs": "EPSG:4326", "transform": transform, "width": w, "height": h}
            with rasterio.open(tmp_path / mask_path(info.path).name, "w", **profile) as dst:
                rasterio.warp.reproject(rasterio.band(src, 1), rasterio.band(dst, 1), resampling=Resampling.nearest)
    original = sort(by_hand(mumbai.tiles, mumbai.infos, mask_path))
    warped = sort(raster_labels(mumbai.infos, mumbai.tiles, source(tmp_path / "*_mask.tif")))
    both = original.merge(warped, on="tile_id", how="outer", suffixes=("_orig", "_warp"))
    agree = (both["class_orig"] == both["class_warp"]).mean()
    assert agree >= 0.95, both[both["class_orig"] != both["class_warp"]]
    assert abs(len(warped) - len(original)) <= 0.03 * len(original)


def test_a_coarser_image_samples_the_finer_mask_exactly(mumbai: Tiled, tmp_path: Path) -> None:
    """Images at 1 m with the 0.5 m masks: each cell is sampled 2 x 2 per pixel, which is every mask pixel."""
    images = []
    for info in mumbai.infos[:3]:
        with rasterio.open(info.path) as src:
            data = src.read(out_shape=(src.count, src.height // 2, src.width // 2), resampling=Resampling.average)
            profile = src.profile | {"width": src.width // 2, "height": src.height // 2,
                                     "transform": src.transform @ rasterio.Affine.scale(2)}
        path = tmp_path / info.path.name
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data)
        images.append(path)
    config = write_pipeline(tmp_path, "coarse", rasters=[{"path": str(p)} for p in images],
                            regions={"path": str(scene("mumbai_train", "patches.gpkg"))}, tiling={"tile_size": "50m"},
                            clustering={"k": 2})
    coarse = Tiled(config)
    assert coarse.tiles["cell_w"].max() == 50
    got = sort(raster_labels(coarse.infos, coarse.tiles, source(scene("mumbai_train", "patches") / "*_mask.tif")))
    fine = mumbai.tiles[mumbai.tiles["raster"] < 3]
    want = sort(by_hand(fine, mumbai.infos, mask_path))
    # same grids (6 x 6 cells per patch, same order), so tile ids line up
    assert len(coarse.tiles) == len(fine)
    pd.testing.assert_frame_equal(got, want)


def test_nodata_and_ignored_codes_count_as_no_class(mumbai: Tiled, tmp_path: Path) -> None:
    info = mumbai.infos[0]
    with rasterio.open(mask_path(info.path)) as src:
        mask, profile = src.read(1), src.profile
    mask[0:100, 0:60] = 255  # cell (0, 0): 40 % labelled -> no class
    mask[0:100, 100:130] = 0  # cell (0, 1): 30 % ignored -> the rule on the other 70 %
    mask[100:200, 0:100] = 255
    mask[100:155, 0:100] = 1  # cell (1, 0): 55 % informal, the rest nodata -> informal
    out = tmp_path / mask_path(info.path).name
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(mask, 1)
    tiles = mumbai.tiles[mumbai.tiles["raster"] == 0]
    got = sort(raster_labels(mumbai.infos, tiles, source(out)))
    cls = dict(zip(got["tile_id"], got["class"], strict=True))
    first = tiles.set_index(["row", "col"])["tile_id"]
    assert first[(0, 0)] not in cls
    assert cls.get(first[(0, 1)]) == expected_class(mask[0:100, 100:200])
    assert cls[first[(1, 0)]] == "informal"
    pd.testing.assert_frame_equal(got, sort(by_hand(tiles, mumbai.infos, lambda _: out)))


def test_a_code_the_config_does_not_name_is_one_clear_error(mumbai: Tiled, tmp_path: Path) -> None:
    info = mumbai.infos[0]
    out = tmp_path / "odd_mask.tif"
    shutil.copy(mask_path(info.path), out)
    with rasterio.open(out, "r+") as dst:
        dst.write(np.full((1, 3), 9, np.uint8), 1, window=rasterio.windows.Window(10, 10, 3, 1))
    with pytest.raises(ConfigError, match=r"odd_mask\.tif: code\(s\) \[9\] are in neither training\.labels\.classes"):
        raster_labels(mumbai.infos, mumbai.tiles[mumbai.tiles["raster"] == 0], source(out))
    with pytest.raises(ConfigError, match="no class raster matches"):
        raster_labels(mumbai.infos, mumbai.tiles, source(tmp_path / "none_*.tif"))


@pytest.mark.parametrize(("labels", "message"), [
    ({"source": "raster", "path": "m.tif"}, "needs 'classes'"),
    ({"source": "raster", "classes": {1: "a"}}, "needs 'path'"),
    ({"source": "raster", "path": "m.tif", "classes": {1: "a", 2: "b"}, "ignore": [2]}, r"codes \[2\] are both"),
    ({"source": "raster", "path": "m.tif", "classes": {1: "a"}, "groups": {"g": {"classes": ["a", "z"]}}},
     r"groups\.g: unknown class\(es\) \['z'\]"),
    ({"source": "raster", "path": "m.tif", "classes": {1: "a"}, "groups": {"g": {"classes": ["a"], "below": {"a": 2}}}},
     "shares must be in"),
])
def test_raster_label_config_errors_name_the_key(tmp_path: Path, labels: dict, message: str) -> None:
    config = write_pipeline(tmp_path, "bad", "olinda", training={"labels": labels})
    with pytest.raises(ConfigError, match=message):
        load_config(config)


def test_train_scores_against_the_masks(mumbai: Tiled, monkeypatch: pytest.MonkeyPatch) -> None:
    """`settlements train` with a class-raster reference: blocked CV scores the three reference classes."""
    from settlements.cli import main

    patches = scene("mumbai_train", "patches")
    config = mumbai.cfg.source
    assert config is not None
    data = mumbai.cfg.to_yaml_dict()
    data["training"] = {"labels": {"source": "raster", "path": str(patches / "*_mask.tif"), "classes": CLASSES,
                                   "ignore": [0], "groups": GROUPS},
                        "evaluation": {"folds": 2, "block_tiles": 6}}
    import yaml

    config.write_text(yaml.safe_dump(data, sort_keys=False))
    cfg = load_config(config)
    run(cfg)
    monkeypatch.setattr(sys, "argv", ["settlements", "train", str(config)])
    main()
    scores = pd.read_csv(cfg.output_dir / "evaluation.csv")
    want = by_hand(mumbai.tiles, mumbai.infos, mask_path)
    top = scores[scores["method"] == "top_model"].set_index("class")
    assert set(top.index) == {"informal", "formal", "not built up", "macro avg"}
    assert top.loc["macro avg", "support"] == len(want)
    assert top.loc["informal", "support"] == int((want["class"] == "informal").sum())
