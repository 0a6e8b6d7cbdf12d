"""Real QGIS (Debian python3-qgis, headless) on the outputs of real pipeline runs.

One QGIS subprocess per run (tests/qgis/probe.py) opens the GeoPackage layers with their default
styles, the cluster map with its sidecar, and the project copied to another folder, renders it,
and reports colours at places chosen here from the outputs; the tests assert on that report.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import pytest
import shapely

from settlements.export.qgis_render import SYSTEM_PYTHON, qgis_available, qgis_environment

from ..conftest import HANG_GUARD, Ran

WHY_NOT = qgis_available()
pytestmark = [pytest.mark.qgis, pytest.mark.slow,
              pytest.mark.skipif(WHY_NOT is not None, reason=f"real QGIS needed: {WHY_NOT}")]
PROBE = Path(__file__).with_name("probe.py")
WIDTH = 800
SCENES = ["olinda", "swellendam"]


def palette_of(gpkg: Path) -> dict[str, str]:
    """Label -> colour as the GeoPackage's clusters table states it (the palette of this run)."""
    clusters = pyogrio.read_dataframe(gpkg, layer="clusters")
    return dict(zip(clusters["label"], clusters["colour"], strict=True))


def homogeneous(tiles: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """Tiles whose 4 neighbours all exist and carry the same label: their centres are safe to sample."""
    key = {(r, y, x): lb for r, y, x, lb in zip(tiles["raster"], tiles["row"], tiles["col"], tiles["label"],
                                                strict=True)}
    ok = [all(key.get((r, y + dy, x + dx)) == lb for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)))
          for r, y, x, lb in zip(tiles["raster"], tiles["row"], tiles["col"], tiles["label"], strict=True)]
    return tiles[np.array(ok, dtype=bool)]


def places(ran: Ran) -> dict[str, tuple[tuple[float, float], str, str | None, str]]:
    """Named points (output CRS) -> (x, y), the render they are checked in, the label of the region drawn
    over the point (None: none) and the label of the tile under it."""
    tiles = pyogrio.read_dataframe(ran.gpkg, layer="tiles")
    regions = pyogrio.read_dataframe(ran.gpkg, layer="regions")
    x0, y0, x1, y1 = tiles.total_bounds
    # only what is in view matters: clipping keeps the geometry work small (municipalities are big)
    regions = regions.set_geometry(shapely.clip_by_rect(regions.geometry.values, x0, y0, x1, y1))
    regions = regions[~regions.geometry.is_empty]
    px = max(x1 - x0, y1 - y0) * 1.04 / WIDTH  # map units per rendered pixel, at most (the view may be wider)
    out: dict[str, tuple[tuple[float, float], str, str, str]] = {}
    safe = homogeneous(tiles)
    rng = np.random.default_rng(0)
    pick = pd.concat([g.iloc[rng.choice(len(g), size=min(3, len(g)), replace=False)]
                      for _, g in safe.groupby("label")])  # a few of every label that has a safe tile
    for i, (c, label) in enumerate(zip(shapely.centroid(pick.geometry.values), pick["label"], strict=True)):
        out[f"tile{i}"] = ((c.x, c.y), "tiles", None, label)
    # off the coast: tiles clear of every region and east of them (for Olinda the Atlantic); the label
    # expected there is the commonest label of those tiles, i.e. the sea's cluster
    union = shapely.union_all(regions.geometry.values)
    cx = shapely.centroid(tiles.geometry.values)
    clear = ~shapely.intersects(shapely.buffer(tiles.geometry.values, 4 * px), union)
    east = clear & (shapely.get_x(cx) > shapely.get_x(shapely.centroid(union)))
    sea_label = tiles.loc[east, "label"].value_counts().idxmax() if east.sum() >= 10 else None
    cand = tiles[east & (tiles["label"] == sea_label).to_numpy() & tiles.index.isin(safe.index)]
    if len(cand):
        mid_y = shapely.get_y(shapely.centroid(union))
        c = shapely.centroid(cand.geometry.values)[int(np.argmin(np.abs(shapely.get_y(
            shapely.centroid(cand.geometry.values)) - mid_y)))]
        out["east_of_regions"] = ((shapely.get_x(c), shapely.get_y(c)), "project", None, sea_label)
    # inside the largest regions, at tile centres clear of every region outline (a tile is 15+ px wide: its
    # centre is far from its edges): the regions are outlines, so the tile keeps its own colour
    geoms = regions.geometry.values
    area = np.where(regions["dominant_label"].notna().to_numpy(), shapely.area(geoms), -1.0)
    tree = shapely.STRtree(geoms)
    centres = shapely.centroid(tiles.geometry.values)
    labels = tiles["label"].to_numpy()
    found = 0
    for pos in np.argsort(-area)[:80]:  # the largest regions first: a tile of another label, and one of its own
        if area[pos] <= 0 or found >= 8:
            break
        others = shapely.union_all([geoms[j] for j in tree.query(geoms[pos], predicate="intersects") if j != pos])
        inner = geoms[pos].buffer(-4 * px).difference(others.buffer(4 * px))  # clear of overlapping regions
        inside = np.flatnonzero(shapely.contains(inner, centres))
        dominant = regions["dominant_label"].iloc[pos]
        for chosen in (inside[labels[inside] != dominant], inside[labels[inside] == dominant]):
            if len(chosen):
                t = chosen[len(chosen) // 2]
                out[f"region{found}"] = ((centres[t].x, centres[t].y), "project", dominant, labels[t])
                found += 1
    return out


def _copy_outputs(ran: Ran, dest: Path) -> Path:
    """The output folder moved elsewhere: the project must still find everything (relative paths)."""
    src = ran.gpkg.parent
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix in (".gpkg", ".tif", ".qml", ".qgz", ".xml", ".vrt"):
            shutil.copy2(f, dest / f.name)
    return dest


@pytest.fixture(scope="module", params=SCENES)
def probed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    ran: Ran = request.getfixturevalue(request.param)
    moved = _copy_outputs(ran, tmp_path_factory.mktemp(f"moved_{request.param}") / "elsewhere")
    name = ran.cfg.name
    pts = places(ran)
    regions = pyogrio.read_dataframe(ran.gpkg, layer="regions", read_geometry=False)
    mapped = regions[regions["mapped_km2"] > 0]
    tips = [mapped.nsmallest(1, "mapped_km2")["region_id"].iloc[0], mapped.nlargest(1, "area_km2")["region_id"].iloc[0]]
    spec = {"gpkg": str(ran.gpkg), "raster": str(ran.report.outputs["cluster_map"]),
            "project": str(moved / f"{name}.qgz"), "png": str(moved / "render.png"), "width": WIDTH,
            "points": {k: list(v[0]) for k, v in pts.items()}, "points_crs": ran.cfg.output.crs,
            "zoom": list(pyogrio.read_info(ran.gpkg, layer="tiles", force_total_bounds=True)["total_bounds"]),
            "map_tips": tips, "in_place": str(ran.gpkg.with_suffix(".qgz"))}
    spec_path = moved / "spec.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([SYSTEM_PYTHON, str(PROBE), str(spec_path)], capture_output=True, text=True,
                          env=qgis_environment(), timeout=HANG_GUARD)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"ran": ran, "report": report, "places": pts, "moved": moved, "palette": palette_of(ran.gpkg),
            "map_tips": regions[regions["region_id"].isin(tips)].set_index("region_id")}


def expected_colour(probed: dict, over: str | None, under: str) -> str:
    """The tile's label colour, whatever region is drawn over it: regions are outlines, never fills."""
    assert all(c[3] == 0 for c in probed["report"]["regions"]["categories"])  # no fill in any category
    return probed["palette"][under]


def _close(rgb: list[int] | None, colour: str, tol: int = 3) -> bool:
    want = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
    return rgb is not None and max(abs(a - b) for a, b in zip(rgb, want, strict=True)) <= tol


def test_layers_are_valid_with_expected_feature_counts(probed: dict) -> None:
    rep, ran = probed["report"], probed["ran"]
    n_regions = len(pd.read_parquet(ran.work / "regions.parquet", columns=["region"]))
    assert rep["tiles"]["valid"] and rep["regions"]["valid"]
    assert rep["tiles"]["features"] == ran.report.embedding["tiles_kept"]
    assert rep["regions"]["features"] == n_regions


@pytest.mark.parametrize(("layer", "field"), [("tiles", "label"), ("regions", "dominant_label")])
def test_default_style_is_categorized_one_category_per_label_in_palette_colours(probed: dict, layer: str,
                                                                               field: str) -> None:
    facts = probed["report"][layer]
    assert facts["renderer"] == "categorizedSymbol" and facts["attribute"] == field
    named = {c[0]: c[2] for c in facts["categories"] if c[0] is not None}
    assert named == probed["palette"]
    assert [c[0] for c in facts["categories"] if c[0] is not None] == list(probed["palette"])  # palette order
    others = [c for c in facts["categories"] if c[0] is None]
    if layer == "regions":  # regions without imagery: outline only
        assert len(others) == 1 and others[0][1] == "no data" and others[0][3] == 0
    else:
        assert others == []


def test_styles_come_from_the_geopackage_with_a_label_mix_pie(probed: dict) -> None:
    regions = probed["report"]["regions"]["database_styles"]
    assert set(regions["names"]) == {"settlements dominant label", "settlements label mix"}
    mix = regions["styles"]["settlements label mix"]
    assert mix["loaded"], mix["error"]
    assert mix["diagram"]["type"] == "Pie"
    pal = probed["palette"]
    assert mix["diagram"]["labels"] == list(pal) and mix["diagram"]["colours"] == list(pal.values())
    fields = set(probed["report"]["regions"]["aliases"])
    assert all(a.strip('"') in fields for a in mix["diagram"]["attributes"])
    tiles = probed["report"]["tiles"]["database_styles"]
    assert tiles["names"] == ["settlements labels"] and tiles["styles"]["settlements labels"]["loaded"]


def test_fields_have_readable_aliases_and_regions_a_label_mix_map_tip(probed: dict) -> None:
    rep = probed["report"]
    for layer in ("tiles", "regions"):
        aliases = rep[layer]["aliases"]
        missing = [f for f, a in aliases.items() if f != "fid" and not a]
        assert missing == [], (layer, missing)
        assert rep[layer]["map_tip"]
    tip = rep["regions"]["map_tip"]
    for label in probed["palette"]:
        assert label in tip
    assert rep["regions"]["aliases"]["dominant_label"] == "Dominant label"


def test_raster_opens_paletted_with_class_names(probed: dict) -> None:
    rast = probed["report"]["raster"]
    pal = probed["palette"]
    assert rast["valid"] and rast["renderer"] == "paletted"
    assert [c[1] for c in rast["classes"]] == list(pal)
    assert {c[1]: c[2] for c in rast["classes"]} == pal
    for value, label, colour in rast["classes"]:  # the GDAL colour table agrees with the sidecar
        assert rast["colour_table"][str(int(value))] == colour, label
    assert rast["nodata"] == 0


def test_project_opens_from_a_moved_folder_with_all_layers_valid(probed: dict) -> None:
    proj = probed["report"]["project"]
    moved = str(probed["moved"])
    imagery = f"imagery: {probed['ran'].cfg.rasters[0].path.name}"
    assert proj["read"]
    assert proj["order"] == ["examples", "negatives", "regions: label mix", "regions", "tiles", "cluster map", imagery]
    assert set(proj["checked"]) == {"examples", "negatives", "regions", "tiles", "cluster map", imagery}
    for name, layer in proj["layers"].items():
        if name == imagery:  # the inputs stayed where they were: only a tree moved as a whole keeps them
            continue
        assert layer["valid"], name
        assert layer["source"].startswith(moved), (name, layer["source"])
    assert proj["layers"]["tiles"]["features"] == probed["report"]["tiles"]["features"]
    assert proj["crs_geographic"] is False  # see test_project_is_projected_...


def test_the_project_opens_the_source_imagery_under_the_tiles_by_a_relative_path(probed: dict) -> None:
    """Where the run wrote it, the project opens the input raster (RGB, stretched as the CNN saw it) at the
    bottom, valid; its datasource in the project file is relative, from the output folder to the raster."""
    import zipfile

    ran = probed["ran"]
    raster = ran.cfg.rasters[0].path
    name = f"imagery: {raster.name}"
    here = probed["report"]["in_place"]
    assert here["read"] and here["order"][-1] == name
    layer = here["layers"][name]
    assert layer["valid"] and layer["renderer"] == "multibandcolor"
    assert Path(layer["source"]).resolve() == raster.resolve()
    with zipfile.ZipFile(ran.gpkg.with_suffix(".qgz")) as zf:
        xml = zf.read(zf.namelist()[0]).decode()
    sources = [s for s in xml.split("<datasource>")[1:] if raster.name in s.split("</datasource>")[0]]
    assert len(sources) == 1 and sources[0].startswith("../"), sources


def test_rendered_places_have_their_class_colours(probed: dict) -> None:
    pixels = probed["report"]["pixels"]
    checked = 0
    for name, (_, render, over, under) in probed["places"].items():
        colour = expected_colour(probed, over, under)
        renders = ["tiles", "cluster map"] if render == "tiles" else ["project"]
        for r in renders:
            assert _close(pixels[r][name], colour, tol=4), (name, r, over, under, pixels[r][name], colour)
            checked += 1
    assert checked >= 10
    assert len({under for _, render, _, under in probed["places"].values() if render == "tiles"}) >= 3


def test_tiles_keep_their_colours_inside_the_regions(probed: dict) -> None:
    """Regions were opaque fills above the tiles, then translucent ones that shifted every tile's colour (a red
    class read brown); now they are outlines, and a tile inside a region of another dominant label is drawn in
    its own label's colour, exactly."""
    pixels, pal = probed["report"]["pixels"]["project"], probed["palette"]
    inside = {n: p for n, p in probed["places"].items() if n.startswith("region")}
    assert len(inside) >= 2
    differs = 0
    for name, (_, _, dominant, label) in inside.items():
        assert _close(pixels[name], pal[label], tol=4), (name, dominant, label, pixels[name], pal[label])
        differs += label != dominant
    assert differs >= 1


@pytest.mark.parametrize("probed", ["olinda"], indirect=True)
def test_olinda_atlantic_is_drawn_in_the_sea_label_colour(probed: dict) -> None:
    assert "east_of_regions" in probed["places"]
    _, _, _, label = probed["places"]["east_of_regions"]
    colour = probed["palette"][label]
    for render in ("project", "cluster map"):
        assert _close(probed["report"]["pixels"][render]["east_of_regions"], colour), render


def test_project_is_projected_and_opens_on_the_tiles_and_the_regions_they_meet(probed: dict) -> None:
    """With output.crs EPSG:4326 the project was in lon/lat (shapes stretched 1/cos(latitude)) and opened
    on the tiles alone, cutting off the regions that reach past them."""
    from pyproj import CRS, Transformer

    proj, ran = probed["report"]["project"], probed["ran"]
    assert CRS.from_user_input(ran.cfg.output.crs).is_geographic
    assert not proj["crs_geographic"]
    crs = CRS.from_wkt(proj["crs_wkt"])
    tiles = pyogrio.read_dataframe(ran.gpkg, layer="tiles")
    regions = pyogrio.read_dataframe(ran.gpkg, layer="regions")
    met = regions[(regions["n_tiles"] + regions["n_skipped"]) > 0]
    lon, lat = Transformer.from_crs(tiles.crs, 4326, always_xy=True).transform(
        *shapely.box(*np.r_[np.minimum(tiles.total_bounds[:2], met.total_bounds[:2]),
                            np.maximum(tiles.total_bounds[2:], met.total_bounds[2:])]).centroid.coords[0])
    zone = int((lon + 180) // 6) + 1
    assert proj["crs"] == f"EPSG:{(32700 if lat < 0 else 32600) + zone}"  # the UTM zone of the view's centre
    tb, mb = tiles.total_bounds, met.total_bounds
    assert mb[0] < tb[0] or mb[1] < tb[1] or mb[2] > tb[2] or mb[3] > tb[3]  # regions reach past the tiles
    x0, y0, x1, y1 = probed["report"]["render"]["extent"]
    for frame in (tiles, met):
        b = Transformer.from_crs(frame.crs, crs, always_xy=True).transform_bounds(*frame.total_bounds, densify_pts=21)
        assert x0 <= b[0] and y0 <= b[1] and b[2] <= x1 and b[3] <= y1, (b, (x0, y0, x1, y1))
    # cells are drawn in their ground proportions (a lon/lat map stretched them by 1/cos(latitude))
    cells = tiles.to_crs(crs).geometry.bounds
    ratio = ((cells["maxx"] - cells["minx"]) / (cells["maxy"] - cells["miny"])).median()
    assert ratio == pytest.approx(_ground_ratio(tiles), rel=0.01)


def _ground_ratio(tiles: gpd.GeoDataFrame) -> float:
    """Median width / height of the tiles on the ground (geodesic, along their middle)."""
    from pyproj import Geod, Transformer

    geod = Geod(ellps="WGS84")
    b = tiles.geometry.bounds
    mx, my = (b["minx"] + b["maxx"]) / 2, (b["miny"] + b["maxy"]) / 2
    tr = Transformer.from_crs(tiles.crs, 4326, always_xy=True)
    lon0, lat0 = tr.transform(b["minx"], my)
    lon1, lat1 = tr.transform(b["maxx"], my)
    lon2, lat2 = tr.transform(mx, b["miny"])
    lon3, lat3 = tr.transform(mx, b["maxy"])
    w = geod.inv(lon0, lat0, lon1, lat1)[2]
    h = geod.inv(lon2, lat2, lon3, lat3)[2]
    return float(np.median(np.asarray(w) / np.asarray(h)))


def test_map_tips_read_areas_in_square_metres_hectares_or_km2(probed: dict) -> None:
    """QGIS fills the regions' map tip in: the smallest mapped tract said 'mapped 0.004 of 0.070 km²'."""
    from settlements.regions import format_area

    tips, table = probed["report"]["regions"]["map_tips"], probed["map_tips"]
    assert set(tips) == set(table.index)
    for rid, text in tips.items():
        mapped, area = table.loc[rid, "mapped_km2"], table.loc[rid, "area_km2"]
        assert f"mapped {format_area(mapped)} of {format_area(area)}" in text, text
    assert any(format_area(v).endswith(("m²", "ha")) for v in table["mapped_km2"])


def test_many_files_open_as_one_mosaic_from_a_tree_moved_as_a_whole(tmp_path: Path, monkeypatch, capsys) -> None:
    """Six drone chips (a glob; ``init``, then ``run``): the project shows them as one VRT mosaic beside it, and
    the tree (inputs, pipeline, outputs) moved elsewhere as a whole opens in QGIS with the mosaic valid."""
    from settlements.export.qgis_render import render_folder

    from ..conftest import run_cli, scene

    tree = tmp_path / "tree"
    (tree / "data").mkdir(parents=True)
    for chip in sorted(scene("kampala_oam").glob("OAM-*-19.tif")):
        shutil.copy(chip, tree / "data" / chip.name)
    config = tree / "pipelines" / "chips.yaml"
    assert run_cli(monkeypatch, capsys, "init", str(tree / "data" / "OAM-*-19.tif"), "-o", str(config))[0] == 0
    with config.open("a") as f:
        f.write("embedding: {input_size: 32, num_workers: 0}\n")
    code, _, err = run_cli(monkeypatch, capsys, "run", str(config))
    assert code == 0, err
    vrt = (tree / "outputs" / "chips" / "chips_imagery.vrt").read_text()
    assert vrt.count('<SourceFilename relativeToVRT="1">../../data/OAM-') == 6 * 3  # 6 files, 3 bands
    moved = tmp_path / "elsewhere" / "tree"
    shutil.move(tree, moved)
    report = render_folder(moved / "outputs" / "chips", tmp_path / "render.png", width=400)
    assert report["layers"] == {**report["layers"], "imagery: 6 files": True}
    assert all(report["layers"].values()), report["layers"]
