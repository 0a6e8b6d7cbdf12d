"""Odd but legal inputs, handled exactly or flagged: nothing passes silently with a wrong result.

Non-finite pixels, scalings that flatten the image, label names that collide as column names,
regions listed twice or without geometry. Rasters are the real Olinda scene, rewritten under tmp_path.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyogrio
import pytest
import rasterio

from .conftest import run_cli, said, scene, write_pipeline

SMALL = {"tiling": {"tile_size": "64px"}, "embedding": {"input_size": 32, "num_workers": 0},
         "clustering": {"k": 2}}


def olinda_copy(tmp: Path, name: str, dtype: str = "uint8") -> tuple[Path, np.ndarray, dict]:
    with rasterio.open(scene("olinda_brazil", "L7_ETMs.tif")) as src:
        return tmp / f"{name}.tif", src.read([3, 2, 1]).astype(dtype), src.profile | {"count": 3, "dtype": dtype}


def small_run(tmp: Path, path: Path, monkeypatch, capsys, raster: dict | None = None,
              **overrides: object) -> tuple[int, str, str, Path]:
    cfg = write_pipeline(tmp, "odd", "olinda", rasters=[{"path": str(path), "bands": [1, 2, 3], **(raster or {})}],
                         **{**SMALL, **overrides})
    code, out, err = run_cli(monkeypatch, capsys, "run", str(cfg))
    return code, out, err, tmp / "outputs" / "odd" / "odd.gpkg"


def test_non_finite_pixels_are_no_data_in_a_run(tmp_path, monkeypatch, capsys) -> None:
    """float32 with 5 % +inf, 2 % NaN, 2 % -inf scattered: a tile is kept when at least half of its 64 x 64
    window is finite, and its cell's valid share is its share of finite pixels (such rasters stopped the
    run, or lost fully valid tiles as 'skipped')."""
    path, data, prof = olinda_copy(tmp_path, "nonfinite", "float32")
    u = np.random.default_rng(1).random(data.shape[1:])
    data[0][u < 0.05] = np.inf
    data[1][(u >= 0.05) & (u < 0.07)] = np.nan
    data[2][(u >= 0.07) & (u < 0.09)] = -np.inf
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(data)
    code, out, err, gpkg = small_run(tmp_path, path, monkeypatch, capsys)
    assert code == 0, err
    tiles = pyogrio.read_dataframe(gpkg, layer="tiles")
    finite = np.isfinite(data).all(axis=0)
    keep = {(r, c) for r in range(6) for c in range(6)
            if finite[r * 64:(r + 1) * 64, c * 64:(c + 1) * 64].sum() >= 64 * 64 / 2}
    assert len(keep) == 25  # the 29 px wide last column and the 32 px high last row fall short
    assert set(zip(tiles["row"], tiles["col"], strict=True)) == keep
    for row, col, share in zip(tiles["row"], tiles["col"], tiles["valid_fraction"], strict=True):
        cell = finite[row * 64:(row + 1) * 64, col * 64:(col + 1) * 64]
        assert share == pytest.approx(cell.mean(), abs=1e-6)


def test_a_flat_result_warns_in_one_line_and_the_runs_row_says_so(tmp_path, monkeypatch, capsys, caplog) -> None:
    """range 0..10 on 8-bit Landsat: nearly every pixel clips to white, every tile has the same embedding, and
    the warning says so from the embeddings (not from how k-means split their rounding noise)."""
    path, data, prof = olinda_copy(tmp_path, "clipped")
    with rasterio.open(path, "w", **prof | {"width": 320, "height": 320}) as dst:  # whole tiles: no grey edges
        dst.write(data[:, :320, :320])
    with caplog.at_level(logging.WARNING, logger="settlements"):
        code, out, err, gpkg = small_run(tmp_path, path, monkeypatch, capsys,
                                         raster={"scaling": {"method": "range", "min": 0, "max": 10}})
    assert code == 0, err
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("settlements") and r.levelno >= logging.WARNING]
    assert len(ours) == 1 and "\n" not in ours[0], ours
    assert "clipped.tif: 100% of the valid pixels lie outside the scaling range (band 1: 0..10," in ours[0]
    assert ours[0].endswith("; clusters: all 25 tiles have the same embedding (within 1%); the tiles barely differ "
                            "to the CNN (check rasters.scaling and look at atlas.png)")
    runs = pyogrio.read_dataframe(gpkg, layer="runs", read_geometry=False)
    warnings = json.loads(runs["warnings"].iloc[-1])
    assert len(warnings) == 2 and "outside the scaling range" in warnings[0]
    assert warnings[1].startswith("clusters: all 25 tiles have the same embedding (within 1%)")


def rounded(x: np.ndarray) -> dict[str, np.ndarray]:
    """``x`` and what other machines and library versions make of it: float16 storage, kernels that differ in
    the last bits (relative 1e-6 and 1e-4 of each row), and every row bit-identical to the first."""
    rng = np.random.default_rng(0)
    scale = np.linalg.norm(x, axis=1, keepdims=True)
    return {"as run": x, "float16": x.astype(np.float16).astype(np.float32),
            **{f"noise {e:g}": x + (rng.normal(size=x.shape) * e / np.sqrt(x.shape[1]) * scale).astype(np.float32)
               for e in (1e-6, 1e-4)},
            "identical": np.repeat(x[:1], len(x), axis=0)}


def test_the_flat_check_answers_the_same_for_embeddings_that_differ_only_by_rounding(
        tmp_path, monkeypatch, capsys) -> None:
    """The check reads the embeddings k-means is given: the clipped scene's (all alike) give one verdict and
    one text however they are rounded, k-means' split of them aside; the real scene's give none, and a few
    real embeddings repeated give 'only N distinct'."""
    from settlements.clustering import sameness, sameness_warning

    def embeddings(name: str, **raster: object) -> np.ndarray:
        path, data, prof = olinda_copy(tmp_path / name, name)
        path.parent.mkdir()
        with rasterio.open(path, "w", **prof | {"width": 320, "height": 320}) as dst:
            dst.write(data[:, :320, :320])
        code, _, err, _ = small_run(tmp_path / name, path, monkeypatch, capsys, raster=raster)
        assert code == 0, err
        x = np.load(tmp_path / name / "work" / "odd" / "cluster_input.npy").astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)  # as k-means is given them (l2_normalize)

    flat = embeddings("white", scaling={"method": "range", "min": 0, "max": 10})
    real = embeddings("real")
    for k in (2, 8):
        for how, x in rounded(flat).items():
            assert sameness(x, k) == {"tiles": 25, "distinct": 1, "largest": 25}, (k, how)
            assert sameness_warning(sameness(x, k), k) == ("clusters: all 25 tiles have the same embedding (within "
                                                           "1%); the tiles barely differ to the CNN (check "
                                                           "rasters.scaling and look at atlas.png)"), (k, how)
    for how, x in rounded(real).items():
        if how != "identical":
            assert sameness(x, 8) == {"tiles": 25, "distinct": None, "largest": 1}, how
            assert sameness_warning(sameness(x, 8), 8) is None
    few = np.repeat(real[[0, 7, 14]], [10, 8, 7], axis=0)
    for how, x in rounded(few).items():
        if how != "identical":
            assert sameness(x, 8) == {"tiles": 25, "distinct": 3, "largest": 10}, how
            assert sameness_warning(sameness(x, 8), 8).startswith(
                "clusters: the 25 tiles have only 3 distinct embeddings (within 1%) for k=8: clusters beyond those "
                "split identical tiles;")


# ------------------------------------------------------------------------------ label names as columns

COLLIDING = {  # cluster -> name; clusters without one keep 'cluster N'
    "case_and_punctuation_and_scripts": {0: "Water", 1: "water", 2: "dense city", 3: "dense-city", 4: "水",
                                         5: "森林", 6: "c0", 7: "tiles"},
    "reserved_and_lookalikes": {0: "skipped", 1: "tiles", 2: "水", 3: "l3", 4: "c1", 5: "Tiles"},
}
KEYS = {
    "case_and_punctuation_and_scripts": {"Water": "water", "water": "water_2", "dense city": "dense_city",
                                         "dense-city": "dense_city_2", "水": "l5", "森林": "l6", "c0": "c0_2",
                                         "tiles": "tiles_2"},
    "reserved_and_lookalikes": {"skipped": "skipped_2", "tiles": "tiles_2", "水": "l3", "l3": "l3_2", "c1": "c1_2",
                                "Tiles": "tiles_3", "cluster 6": "cluster_6", "cluster 7": "cluster_7"},
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(COLLIDING))
def test_label_names_never_share_a_column(olinda, tmp_path, case) -> None:
    """Names that slug alike ('Water'/'water'), have no Latin letters ('水', '森林') or are the table's own
    ('tiles', 'skipped', 'c0') each get their own n_/frac_/km2_/dfrac_/dkm2_ columns: each label's km² is
    the sum of its clusters' km², label km² add up to mapped_km2, and the label's text is in the aliases
    and the histogram table. (They overwrote each other: 32.15 of 41.64 km² mapped; 'tiles' crashed.)"""
    import sqlite3

    import yaml

    from settlements.palette import column_keys
    from settlements.pipeline import stage_export

    names = COLLIDING[case]
    labels_path = tmp_path / "labels.yaml"
    labels_path.write_text(yaml.safe_dump({"clusters": {c: {"name": n} for c, n in names.items()}},
                                          allow_unicode=True), encoding="utf-8")
    cfg = olinda.cfg.model_copy(update={"labels": labels_path,
                                        "output": olinda.cfg.output.model_copy(update={"dir": tmp_path / "out"})})
    stage_export(cfg)
    gpkg = stage_export(cfg)["gpkg"]  # twice: the change layer then compares two runs
    clusters = pyogrio.read_dataframe(gpkg, layer="clusters")
    labels = list(dict.fromkeys(clusters["label"]))
    keys = column_keys(labels)
    assert {lb: keys[lb] for lb in KEYS[case]} == KEYS[case]
    regions = pyogrio.read_dataframe(gpkg, layer="regions")
    same = pyogrio.read_dataframe(olinda.gpkg, layer="regions")
    for col in ("n_tiles", "n_skipped", "mapped_km2"):
        np.testing.assert_array_equal(regions[col], same[col])
    for label in labels:
        ids = clusters.loc[clusters["label"] == label, "cluster"].tolist()
        key = keys[label]
        np.testing.assert_allclose(regions[f"km2_{key}"], regions[[f"km2_c{i}" for i in ids]].sum(axis=1), rtol=1e-12)
        np.testing.assert_array_equal(regions[f"n_{key}"], regions[[f"n_c{i}" for i in ids]].sum(axis=1))
    km2 = regions[[f"km2_{keys[lb]}" for lb in labels]].sum(axis=1)
    np.testing.assert_allclose(km2, regions["mapped_km2"], rtol=1e-9, atol=1e-12)
    assert regions["mapped_km2"].sum() > 40
    hist = pyogrio.read_dataframe(gpkg, layer="histogram", read_geometry=False)
    by_label = hist[hist["kind"] == "label"].groupby("class")["km2"].sum()
    assert set(by_label.index) == set(labels)
    assert by_label.sum() == pytest.approx(regions["mapped_km2"].sum(), rel=1e-9)
    changes = pyogrio.read_dataframe(gpkg, layer="changes")
    for label in labels:  # the same labels twice: every region seen before, no change in any label
        assert (changes[f"dkm2_{keys[label]}"] == 0).all() and (changes[f"dfrac_{keys[label]}"] == 0).all()
    con = sqlite3.connect(gpkg)
    try:
        qml = con.execute("SELECT styleQML FROM layer_styles WHERE f_table_name = 'regions' AND useAsDefault = 1"
                          ).fetchone()[0]
    finally:
        con.close()
    for label in labels:
        assert f'field="km2_{keys[label]}" index=' in qml and f'name="Area (km²): {label}"' in qml


# ------------------------------------------------------------------------------ what the analyst reads

def _figures(monkeypatch) -> list:
    """Figures the plots module would save, kept for inspection instead."""
    from settlements.export import plots

    figs: list = []
    monkeypatch.setattr(plots, "_save", lambda fig, path, dpi=110, tight=False: figs.append(fig))
    return figs


def test_map_axes_read_in_plain_degrees(monkeypatch) -> None:
    """The 230 m Kampala mosaic in lon/lat: ticks read '32.5810', not 0.0005 with an offset '+3.258e1'."""
    import geopandas as gpd
    import shapely

    from settlements.export import plots
    from settlements.palette import build_legend

    path = scene("kampala_oam", "kampala_z19_mosaic_DERIVED.tif")
    with rasterio.open(path) as src:
        b, crs = src.bounds, src.crs
    xs, ys = np.linspace(b.left, b.right, 9), np.linspace(b.bottom, b.top, 7)
    boxes = [shapely.box(x0, y0, x1, y1) for x0, x1 in zip(xs[:-1], xs[1:], strict=True)
             for y0, y1 in zip(ys[:-1], ys[1:], strict=True)]
    labels = ["roofs" if i % 3 else "trees" for i in range(len(boxes))]
    tiles = gpd.GeoDataFrame({"label": labels}, geometry=boxes, crs=crs)
    regions = gpd.GeoDataFrame({"region_id": ["1"]}, geometry=[shapely.box(*b)], crs=crs)
    figs = _figures(monkeypatch)
    plots.label_map(Path("map.png"), tiles, regions, build_legend({0: "roofs", 1: "trees"}, {}), "kampala")
    ax = figs[0].axes[0]
    figs[0].canvas.draw()
    for axis, (lo, hi) in ((ax.xaxis, (b.left, b.right)), (ax.yaxis, (b.bottom, b.top))):
        assert axis.get_offset_text().get_text() == ""
        ticks = [t.get_text().replace("−", "-") for t in axis.get_ticklabels() if t.get_text()]
        assert len(ticks) >= 2 and all(lo - 1e-3 <= float(t) <= hi + 1e-3 for t in ticks), ticks
    assert "longitude" in ax.get_xlabel() and "latitude" in ax.get_ylabel()


@pytest.mark.slow
def test_histogram_areas_read_in_one_unit_per_figure(olinda, monkeypatch) -> None:
    """Olinda's census tracts, from 0.3 ha to 2 km²: the titles said '0.00 km2 mapped', then mixed m², ha and km²
    in one figure; now every panel is in the unit of the median panel, small ones with three digits."""
    from settlements.export import plots
    from settlements.palette import build_legend
    from settlements.regions import area_unit, format_area

    regions = pyogrio.read_dataframe(olinda.gpkg, layer="regions", read_geometry=False)
    clusters = pyogrio.read_dataframe(olinda.gpkg, layer="clusters", read_geometry=False)
    legend = build_legend(dict(enumerate(clusters["label"])), {})
    mapped = regions[regions["mapped_km2"] > 0].sort_values("mapped_km2")
    regions = pd.concat([mapped.head(6), mapped.iloc[len(mapped) // 2 - 3:len(mapped) // 2 + 3], mapped.tail(6)])
    figs = _figures(monkeypatch)
    plots.histograms(Path("h.png"), regions, legend, 24, "olinda")
    titles = [ax.get_title() for ax in figs[0].axes if ax.get_title()]
    mapped = regions.nlargest(24, "mapped_km2")["mapped_km2"]
    assert len(titles) == len(mapped)
    unit = area_unit(float(mapped.median()))
    assert [t.splitlines()[-1] for t in titles] == [f"{format_area(v, unit)} mapped" for v in mapped]
    assert {t.split()[-2] for t in titles} == {unit} and mapped.min() < 0.01 < 1 < mapped.max()
    assert not any(t.splitlines()[-1].startswith("0.00 ") for t in titles)  # the smallest still reads
    assert figs[0].get_suptitle().endswith(f"all {len(mapped)} regions (areas in {unit})")
    assert format_area(0.003) == "3,000 m²" and format_area(0.25) == "25.00 ha" and format_area(12.3) == "12.30 km²"
    assert format_area(0.0512, "km²") == "0.0512 km²" and format_area(12.3, "ha") == "1,230.00 ha"


def white_bands(png: Path) -> tuple[float, float, float]:
    """The widest run of white rows and of white columns (edge to edge) as shares of the picture's height and
    width, and the share of its rows above anything drawn (an empty top)."""
    import matplotlib.image

    img = matplotlib.image.imread(png)[..., :3]
    white = (img > 0.99).all(axis=2)

    def widest(run: np.ndarray) -> float:
        best = n = 0
        for w in run:
            n = n + 1 if w else 0
            best = max(best, n)
        return best / len(run)

    rows = white.all(axis=1)
    return widest(rows), widest(white.all(axis=0)), (int(np.argmin(rows)) if not rows.all() else len(rows)) / len(rows)


@pytest.mark.parametrize(("scene_path", "bands"), [("amsterdam_s2/OudeKerk.tif", [1, 2, 3]),
                                                    ("swellendam_za/3420B_2010_328_RGB_LATLNG.tif", [1, 2, 3])])
def test_map_png_has_no_white_bands(tmp_path, scene_path: str, bands: list[int]) -> None:
    """A wide scene (Amsterdam, UTM, 834 x 386 px) and a tall one (Swellendam, lon/lat, 1098 x 3039 px) drawn
    on a square figure left white bands above and below, or left and right; the figure now takes the map's
    shape (degrees of longitude shortened by cos(latitude)) and is saved without margins."""
    import geopandas as gpd
    import shapely

    from settlements.config import RasterInput, Tiling
    from settlements.export import plots
    from settlements.palette import build_legend
    from settlements.rasters import inspect_raster
    from settlements.tiling import raster_grid, tile_plan

    path = scene(*scene_path.split("/"))
    info = inspect_raster(path, RasterInput(path=path, bands=bands))
    plan = tile_plan(raster_grid(Tiling(tile_size="16px"), info.width, info.height, info.pixel_w_m, info.pixel_h_m,
                                 path), info.affine)
    tiles = gpd.GeoDataFrame({"label": np.where(plan["row"] % 2 == 0, "roofs", "trees")},
                             geometry=shapely.box(plan["minx"], plan["miny"], plan["maxx"], plan["maxy"]),
                             crs=info.crs)
    regions = gpd.GeoDataFrame({"region_id": ["1"]}, geometry=[shapely.box(*tiles.total_bounds)], crs=info.crs)
    plots.label_map(tmp_path / "map.png", tiles, regions, build_legend({0: "roofs", 1: "trees"}, {}), "map")
    rows, cols, _ = white_bands(tmp_path / "map.png")
    assert rows < 0.05 and cols < 0.05, (rows, cols)


def test_a_histogram_of_one_region_has_no_empty_top(tmp_path, monkeypatch) -> None:
    """One region: the figure had a large empty top and said '(largest 1 regions)'."""
    from settlements.export import plots
    from settlements.palette import build_legend

    regions = pd.DataFrame({"region_id": ["1"], "region_name": ["centre"], "mapped_km2": [0.42],
                            "frac_roofs": [0.7], "frac_trees": [0.3]})
    legend = build_legend({0: "roofs", 1: "trees"}, {})
    plots.histograms(tmp_path / "h.png", regions, legend, 24, "centre: label histograms")
    _, _, top = white_bands(tmp_path / "h.png")
    assert top < 0.06, top
    figs = _figures(monkeypatch)
    plots.histograms(tmp_path / "h2.png", regions, legend, 24, "centre: label histograms")
    heading = figs[0].get_suptitle()
    assert "largest 1 regions" not in heading and heading.endswith("the one region (areas in ha)")


def test_validate_reads_a_small_region_in_square_metres(tmp_path, monkeypatch, capsys) -> None:
    """A 60 m square: validate printed '(0.0 km2)'."""
    import re

    with rasterio.open(scene("olinda_brazil", "L7_ETMs.tif")) as src:
        x, y = src.bounds.left + 3000, src.bounds.top - 3000
    square = f"POLYGON (({x} {y}, {x + 60} {y}, {x + 60} {y + 60}, {x} {y + 60}, {x} {y}))"
    cfg = write_pipeline(tmp_path, "tiny", "olinda", regions=[{"wkt": square, "crs": "EPSG:31985"}],
                         clustering={"k": 2}, tiling={"tile_size": "4px"})
    code, out, _ = run_cli(monkeypatch, capsys, "validate", str(cfg))
    assert code == 0, out
    m = re.search(r"regions: 1 \(([\d,]+) m²\)", out)
    assert m and float(m.group(1).replace(",", "")) == pytest.approx(3600, rel=0.01), out
    assert re.search(r"meets 1 region\(s\), [\d,]+ m²", out), out


def test_too_few_valid_pixels_advises_what_can_help(tmp_path, monkeypatch, capsys) -> None:
    """Every 64 px tile is about 35 % imagery: the error says the threshold now in force and that raising
    it (up to 1) or smaller tiles help; with the threshold at 1 that advice would be void (see
    test_constant_band in test_bad_inputs: that case now stops earlier, naming the band)."""
    path, data, prof = olinda_copy(tmp_path, "sparse")
    holes = np.random.default_rng(2).random(data.shape[1:]) < 0.65
    data[:, holes] = 0
    with rasterio.open(path, "w", **prof | {"nodata": 0}) as dst:
        dst.write(data)
    code, _, err, _ = small_run(tmp_path, path, monkeypatch, capsys)
    assert code == 2 and len(said(err)) == 1, err
    assert ("error: tiling.max_invalid_fraction: no tile has at least 50% valid pixels in any raster (most pixels "
            "are nodata, masked or non-finite); raise max_invalid_fraction (now 0.5, at most 1) or use smaller "
            "tiles") in err
