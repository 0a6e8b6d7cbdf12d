"""``settlements similar`` and ``export-embeddings`` on the real Mumbai patches with their hand-made masks.

One run per module: the 64 patches of mumbai_train in 50 m tiles (2,304 tiles; 354 informal by the
masks) at a small CNN input (64 px, MobileNetV2 up to features.15), so it takes seconds. Examples are
informal tiles drawn as polygons, as an analyst would in QGIS; the reference is the masks.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pyogrio
import pytest
import shapely

from settlements.palette import DRAWN_COLOURS, score_colours
from settlements.rasters import load_infos
from settlements.search import search_space
from settlements.similar import Neighbours
from settlements.similar_examples import select_tiles
from settlements.store import workspace
from settlements.tile_tables import kept_tiles

from .conftest import HANG_GUARD, Ran, run_cli, said, scene, write_pipeline
from .mumbai import all_ranked, colour_space, example_draws, informal_share, precision

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@dataclass
class Mumbai:
    ran: Ran
    tiles: pd.DataFrame  # kept tiles in embedding order
    informal: np.ndarray  # per embedding row
    tmp: Path

    @property
    def infos(self) -> list:
        return load_infos(workspace(self.ran.cfg))


@pytest.fixture(scope="module")
def mumbai(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Mumbai:
    patches = scene("mumbai_train", "patches")
    tmp = tmp_path_factory.mktemp("similar")
    config = write_pipeline(tmp, "msim", rasters=[{"path": str(patches / "*_image.tif"), "bands": [1, 2, 3],
                                                  "scaling": {"method": "dtype"}}],
                            regions={"path": str(patches.parent / "patches.gpkg"), "id_field": "patch",
                                     "name_field": "patch"},
                            tiling={"tile_size": "50m"}, clustering={"k": 6, "seed": 0},
                            embedding={"input_size": 64, "layer": "features.15", "num_workers": 0, "batch_size": 64},
                            output={"crs": "EPSG:32643"})
    ran = Ran(config)
    ws = workspace(ran.cfg)
    tiles = kept_tiles(ws)
    share = informal_share(load_infos(ws), tiles)
    return Mumbai(ran, tiles, share >= 0.5, tmp)


def draw(tiles: pd.DataFrame, rows: np.ndarray, path: Path, layer: str = "examples", crs: str = "EPSG:4326") -> Path:
    """Polygons an analyst might draw over these tiles: each cell shrunk by a fifth, in another CRS."""
    t = tiles.set_index("emb_row").loc[rows]
    cells = shapely.box(*(t[c].to_numpy() for c in ("minx", "miny", "maxx", "maxy")))  # arrays: no index
    shrunk = shapely.buffer(cells, -0.1 * (t["maxx"] - t["minx"]).to_numpy())
    gpd.GeoDataFrame({"note": [f"tile {i}" for i in t["tile_id"]]}, geometry=shrunk, crs="EPSG:32643").to_crs(
        crs).to_file(path, layer=layer, driver="GPKG")
    return path


def layer(gpkg: Path, name: str) -> gpd.GeoDataFrame:
    return pyogrio.read_dataframe(gpkg, layer=name)


def styles(gpkg: Path) -> dict[str, str]:
    con = sqlite3.connect(gpkg)
    try:
        return dict(con.execute("SELECT f_table_name, styleQML FROM layer_styles WHERE useAsDefault"))
    finally:
        con.close()


# ---------------------------------------------------------------------------------- the search

def test_examples_drawn_as_polygons_find_informal_settlements(mumbai: Mumbai, monkeypatch, capsys) -> None:
    """Five informal tiles drawn in EPSG:4326: the 100 likest tiles are mostly informal by the masks, far
    more than by colour statistics; the layer holds them ranked, with the examples, on their cells."""
    informal_rows = np.flatnonzero(mumbai.informal)
    ex = example_draws(informal_rows, [0])[0]
    drawn = draw(mumbai.tiles, ex, mumbai.tmp / "drawn.gpkg")
    code, out, err = run_cli(monkeypatch, capsys, "similar", str(mumbai.ran.config_path), "--examples", str(drawn))
    assert code == 0, err
    assert out.startswith("msim: 100 tile(s) like 5 example(s) (cosine, neighbours 0.3, exact, every tile scored; "
                          "lowest matching score "), out
    got = layer(mumbai.ran.gpkg, "similar_examples")
    assert got.crs == "EPSG:32643" and len(got) == 105
    examples, matches = got[got["is_example"] == 1], got[got["is_example"] == 0]
    by_row = mumbai.tiles.set_index("tile_id")["emb_row"]
    assert sorted(by_row.loc[examples["tile_id"]]) == sorted(ex.tolist()) and (examples["rank"] == 0).all()
    assert matches["rank"].tolist() == list(range(1, 101))
    assert (np.diff(matches["score"].to_numpy()) <= 1e-9).all()
    p100 = float(mumbai.informal[by_row.loc[matches["tile_id"]].to_numpy()].mean())
    colour = all_ranked(colour_space(load_infos(workspace(mumbai.ran.cfg)), mumbai.tiles, mumbai.tmp / "c"), ex,
                        neighbours=Neighbours.of(mumbai.tiles, len(mumbai.tiles), mumbai.infos))
    p100_colour = precision(colour.rows, mumbai.informal, 100)
    assert p100 >= 0.8 and p100 >= p100_colour + 0.2, (p100, p100_colour)
    # each feature is its tile's cell, as in the tiles layer
    tiles = layer(mumbai.ran.gpkg, "tiles").set_index("tile_id").loc[got["tile_id"]]
    assert shapely.equals_exact(got.geometry.values, tiles.geometry.values, tolerance=1e-6).all()
    assert (got["label"].to_numpy() == tiles["label"].to_numpy()).all()


def test_region_summary_counts_similar_tiles_as_the_histograms_count_labels(mumbai: Mumbai) -> None:
    """similar_examples_regions: per patch, the similar tiles (examples included) and their area."""
    got = layer(mumbai.ran.gpkg, "similar_examples")
    summary = layer(mumbai.ran.gpkg, "similar_examples_regions")
    assert len(summary) == 64 and summary.crs == "EPSG:32643"
    per_region = got.groupby("region_id").size()
    n = summary.set_index("region_id")["n_similar"]
    assert n.sum() == 105 and (n.loc[per_region.index] == per_region).all()
    # each tile's cell area in its patch (equal-area metres; every pixel valid), summed; 50 m cells, 36 a patch
    shares = pd.read_parquet(workspace(mumbai.ran.cfg).shares).merge(
        pd.read_parquet(workspace(mumbai.ran.cfg).regions, columns=["region", "region_id"]), on="region")
    mine = shares[shares["tile_id"].isin(got["tile_id"])].groupby("region_id")["area_m2"].sum() / 1e6
    km2 = summary.set_index("region_id")["km2_similar"]
    np.testing.assert_allclose(km2.loc[mine.index], mine, rtol=1e-9)
    assert km2.drop(mine.index).eq(0).all()
    np.testing.assert_allclose(summary["km2_similar"], summary["n_similar"] * 0.0025, rtol=2e-3)
    np.testing.assert_allclose(summary["frac_similar"], summary["km2_similar"] / summary["mapped_km2"], rtol=1e-9)
    np.testing.assert_allclose(summary["frac_similar"], summary["n_similar"] / 36, atol=1e-4)


def test_similar_layers_are_styled_from_the_palette(mumbai: Mumbai) -> None:
    qml = styles(mumbai.ran.gpkg)
    tiles = qml["similar_examples"]
    assert 'type="graduatedSymbol" attr="score"' in tiles
    for colour in score_colours(5):
        r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
        assert f'value="{r},{g},{b},255"' in tiles
    assert 'attr="frac_similar"' in qml["similar_examples_regions"]


def test_tile_ids_threshold_and_negatives(mumbai: Mumbai, monkeypatch, capsys) -> None:
    """Examples as tile ids with --threshold; with negatives a linear model gives probabilities."""
    informal_rows = np.flatnonzero(mumbai.informal)
    ex = example_draws(informal_rows, [1])[0]
    ids = mumbai.tiles.set_index("emb_row").loc[ex, "tile_id"].tolist()
    cfg = str(mumbai.ran.config_path)
    code, out, err = run_cli(monkeypatch, capsys, "similar", cfg, "--examples", ",".join(map(str, ids)),
                             "--threshold", "0.3", "--name", "byid", "--context", "0")
    assert code == 0, err
    got = layer(mumbai.ran.gpkg, "similar_byid")
    matches = got[got["is_example"] == 0]
    assert len(matches) and (matches["score"] >= 0.3).all()
    np.testing.assert_allclose(got["score"], got["similarity"])  # no neighbours: the tile's own similarity
    space = search_space(workspace(mumbai.ran.cfg))
    every = all_ranked(space, ex, context=0)
    assert len(matches) == int((every.scores >= 0.3).sum())  # every tile scoring at least D, no other
    # negatives: tiles that are clearly not informal
    rng = np.random.default_rng(3)
    neg = np.sort(rng.choice(np.flatnonzero(~mumbai.informal), 50, replace=False))
    neg_ids = mumbai.tiles.set_index("emb_row").loc[neg, "tile_id"].tolist()
    code, out, err = run_cli(monkeypatch, capsys, "similar", cfg, "--examples", ",".join(map(str, ids)),
                             "--negatives", ",".join(map(str, neg_ids)), "--name", "linear")
    assert code == 0, err
    assert "and unlike 50 negative(s) (logistic regression, neighbours 0.3, exact" in out, out
    got = layer(mumbai.ran.gpkg, "similar_linear")
    assert got["score"].between(0, 1).all()
    by_row = mumbai.tiles.set_index("tile_id")["emb_row"]
    p100 = float(mumbai.informal[by_row.loc[got[got["is_example"] == 0]["tile_id"]].to_numpy()].mean())
    assert p100 >= 0.8, p100
    assert "similar_byid" in pyogrio.list_layers(mumbai.ran.gpkg)[:, 0]  # earlier results stay


def test_the_ivf_index_is_built_once_and_finds_what_exact_search_finds(mumbai: Mumbai) -> None:
    from settlements.config import SimilarOptions
    from settlements.search import Index
    from settlements.similar import rank

    space = search_space(workspace(mumbai.ran.cfg))
    ex = example_draws(np.flatnonzero(mumbai.informal), [2])[0]
    none = np.empty(0, np.int64)
    near = Neighbours.of(mumbai.tiles, len(space.rows), mumbai.infos)
    for context in (0.0, 0.3):
        exact = rank(space, ex, none, SimilarOptions(100, None, "exact", 32, None, context), near)
        approx = rank(space, ex, none, SimilarOptions(100, None, "ivf", 32, None, context), near)
        assert not approx.exact and len(approx.rows) == 100
        assert len(np.intersect1d(exact.rows, approx.rows)) >= 90, context  # recall@100
        np.testing.assert_allclose(approx.scores, np.sort(approx.scores)[::-1])  # best first
        same = np.isin(approx.rows, exact.rows)  # exact scores of the tiles both found
        np.testing.assert_allclose(approx.scores[same], pd.Series(exact.scores, exact.rows).loc[approx.rows[same]],
                                   rtol=1e-5)
    index_file = space.folder / "index.faiss"
    before = index_file.stat().st_mtime_ns
    assert not Index(space, 32).built and index_file.stat().st_mtime_ns == before  # cached
    # other embeddings (here: a raster's cache key changed, as a new scene or scaling would) rebuild it
    import shutil

    from settlements.store import Workspace

    copy = mumbai.tmp / "work_copy"
    shutil.copytree(workspace(mumbai.ran.cfg).root, copy, ignore=shutil.ignore_patterns("cache"))
    meta = json.loads((copy / "embedding.json").read_text())
    meta["keys"][0] = "0" * 24
    (copy / "embedding.json").write_text(json.dumps(meta))
    other = search_space(Workspace(copy))
    assert other.identity != space.identity and Index(other, 32).built
    assert json.loads((copy / "search" / "index.json").read_text())["identity"] == other.identity


# ---------------------------------------------------------------------- QGIS workflow, safety

def test_the_run_makes_empty_styled_layers_to_draw_in_and_keeps_what_was_drawn(mumbai: Mumbai, monkeypatch,
                                                                                 capsys) -> None:
    """Draw in the run's own `examples` layer (as QGIS saves it), run the command on the GeoPackage; a
    later run keeps the drawings."""
    gpkg = mumbai.ran.gpkg
    qml = styles(gpkg)
    for name in ("examples", "negatives"):
        assert name in pyogrio.list_layers(gpkg)[:, 0]
        r, g, b = (int(DRAWN_COLOURS[name][i:i + 2], 16) for i in (1, 3, 5))
        assert f'name="outline_color" value="{r},{g},{b},255"' in qml[name]
    ex = example_draws(np.flatnonzero(mumbai.informal), [4])[0]
    drawn = draw(mumbai.tiles, ex, mumbai.tmp / "qgis.gpkg", crs="EPSG:32643")
    pyogrio.write_dataframe(layer(drawn, "examples"), gpkg, layer="examples", append=True)
    code, out, err = run_cli(monkeypatch, capsys, "similar", str(mumbai.ran.config_path), "--examples", str(gpkg),
                             "--name", "drawn")
    assert code == 0, err
    assert "100 tile(s) like 5 example(s)" in out
    code, out, err = run_cli(monkeypatch, capsys, "run", str(mumbai.ran.config_path))
    assert code == 0, err  # the GeoPackage was edited: a real run, which keeps the drawings
    kept = layer(gpkg, "examples")
    assert len(kept) == 5 and sorted(kept["note"]) == sorted(layer(drawn, "examples")["note"])
    assert "similar_drawn" in pyogrio.list_layers(gpkg)[:, 0]  # and the analyst's results


def test_a_query_after_an_unchanged_run_leaves_the_scheduler_nothing_to_do(mumbai: Mumbai, monkeypatch,
                                                                           capsys) -> None:
    cfg = str(mumbai.ran.config_path)
    code, _, err = run_cli(monkeypatch, capsys, "run", cfg)
    assert code in (0, 3), err
    ids = mumbai.tiles["tile_id"].iloc[:2].astype(str).tolist()
    code, _, err = run_cli(monkeypatch, capsys, "similar", cfg, "--examples", ",".join(ids), "--name", "sched")
    assert code == 0, err
    code, out, err = run_cli(monkeypatch, capsys, "run", cfg)
    assert code == 3, out + err
    assert "similar_sched" in pyogrio.list_layers(mumbai.ran.gpkg)[:, 0]


@pytest.mark.parametrize(("args", "message"), [
    (["--examples", "EMPTY"], "layer 'examples' holds no geometry; draw polygons in it"),
    (["--examples", "999999"], "--examples: tile(s) 999999 are not kept tiles of this run"),
    (["--examples", "1", "--top", "5", "--threshold", "0.5"], "--top, --threshold: give one of them"),
    (["--examples", "MISSING"], "--examples: file not found"),
    (["--examples", "1", "--negatives", "1"], "--negatives: tile(s) 1 are also examples"),
    (["--examples", "1", "--name", "Bad Name"], "--name: expected 1 to 40 characters"),
    (["--examples", "FAR"], "no kept tile under its 1 geometry"),
    (["--examples", "1", "--context", "1"], "--context: expected a weight from 0 (a tile alone) to below 1, got 1"),
    (["--examples", "1", "--layer", "examples"], "--layer: only for a vector file, not for tile ids (1)"),
    (["--examples", "TWO"], "2 layers and none named 'examples'; choose one with --layer (layers: a, b)"),
])
def test_bad_examples_are_one_line_and_change_nothing(mumbai: Mumbai, monkeypatch, capsys, args: list[str],
                                                      message: str) -> None:
    gpkg = mumbai.ran.gpkg
    empty = mumbai.tmp / "empty.gpkg"
    if not empty.exists():
        gpd.GeoDataFrame({"note": []}, geometry=gpd.GeoSeries([], crs="EPSG:32643")).to_file(
            empty, layer="examples", driver="GPKG")
        gpd.GeoDataFrame({"note": ["sea"]}, geometry=[shapely.box(0, 0, 10, 10)], crs="EPSG:32643").to_file(
            mumbai.tmp / "far.gpkg", layer="examples", driver="GPKG")
        for name in ("a", "b"):
            gpd.GeoDataFrame(geometry=[shapely.box(0, 0, 10, 10)], crs="EPSG:32643").to_file(
                mumbai.tmp / "two.gpkg", layer=name, driver="GPKG")
    args = [{"EMPTY": str(empty), "MISSING": str(mumbai.tmp / "nope.gpkg"), "FAR": str(mumbai.tmp / "far.gpkg"),
             "TWO": str(mumbai.tmp / "two.gpkg")}.get(a, a) for a in args]
    before = gpkg.read_bytes()
    code, out, err = run_cli(monkeypatch, capsys, "similar", str(mumbai.ran.config_path), *args)
    assert code == 2 and said(err)[0].startswith("error: ") and len(said(err)) == 1, err
    assert message in err, err
    assert gpkg.read_bytes() == before


# ---------------------------------------------------------------------------- export-embeddings

def test_geoparquet_round_trips_through_geopandas_pyarrow_and_duckdb(mumbai: Mumbai, monkeypatch, capsys) -> None:
    from settlements.export import embeddings as export

    monkeypatch.setattr(export, "ROW_GROUP_ROWS", 500)
    reads: list[int] = []
    original = export.NpyRows.__getitem__

    def counted(self, item):  # noqa: ANN001, ANN202
        out = original(self, item)
        reads.append(len(out))
        return out

    monkeypatch.setattr(export.NpyRows, "__getitem__", counted)
    target = mumbai.tmp / "emb.parquet"
    code, out, err = run_cli(monkeypatch, capsys, "export-embeddings", str(mumbai.ran.config_path),
                             "--output", str(target))
    assert code == 0, err
    vectors = np.load(workspace(mumbai.ran.cfg).embeddings)
    meta = pq.read_metadata(target)
    assert meta.num_rows == len(vectors) == 2304 and meta.num_row_groups == 5
    assert sum(reads) == 2304 and max(reads) == 500  # the vectors read a row group at a time
    schema = pq.read_schema(target)
    assert str(schema.field("embedding").type) == f"fixed_size_list<element: float>[{vectors.shape[1]}]"
    geo = json.loads(schema.metadata[b"geo"])
    assert geo["version"] == "1.1.0" and geo["columns"]["geometry"]["covering"]["bbox"]["xmin"] == ["bbox", "xmin"]
    table = pq.read_table(target)
    np.testing.assert_array_equal(table.column("embedding").combine_chunks().flatten().to_numpy()
                                  .reshape(vectors.shape), vectors)
    frame = gpd.read_parquet(target)
    assert frame.crs == "EPSG:32643"
    np.testing.assert_array_equal(np.stack(frame["embedding"].to_numpy()), vectors)
    tiles = layer(mumbai.ran.gpkg, "tiles").set_index("tile_id").loc[frame["tile_id"]]
    assert shapely.equals_exact(frame.geometry.values, tiles.geometry.values, tolerance=1e-6).all()
    for column in ("cluster", "label", "raster", "row", "col"):
        assert (frame[column].to_numpy() == tiles[column].to_numpy()).all(), column
    # the bbox covering answers a spatial filter without reading geometries
    box = frame.geometry.iloc[0].bounds
    near = gpd.read_parquet(target, bbox=box)
    assert set(near["tile_id"]) == set(frame[frame.intersects(shapely.box(*box))]["tile_id"])
    duckdb = pytest.importorskip("duckdb")
    con = duckdb.connect()
    rows = con.execute(f"SELECT tile_id, embedding FROM read_parquet('{target}') ORDER BY tile_id").fetchall()
    order = np.argsort(frame["tile_id"].to_numpy())
    np.testing.assert_array_equal(np.asarray([r[1] for r in rows], dtype=np.float32), vectors[order])
    n = con.execute(f"SELECT count(*) FROM read_parquet('{target}') WHERE bbox.xmax >= {box[0]} AND "
                    f"bbox.xmin <= {box[2]} AND bbox.ymax >= {box[1]} AND bbox.ymin <= {box[3]}").fetchone()[0]
    assert n == len(near)


def test_npy_export_is_the_vectors_beside_a_table_of_the_same_rows(mumbai: Mumbai, monkeypatch, capsys) -> None:
    target = mumbai.tmp / "npy" / "tiles.npy"
    code, out, err = run_cli(monkeypatch, capsys, "export-embeddings", str(mumbai.ran.config_path),
                             "--format", "npy", "--output", str(target))
    assert code == 0, err
    vectors = np.load(target)
    target = target.with_name("tiles_table.parquet")
    np.testing.assert_array_equal(vectors, np.load(workspace(mumbai.ran.cfg).embeddings))
    frame = gpd.read_parquet(target)
    assert "embedding" not in frame.columns and len(frame) == len(vectors)
    assert (frame["tile_id"].to_numpy() == mumbai.tiles["tile_id"].to_numpy()).all()
    code, out, err = run_cli(monkeypatch, capsys, "export-embeddings", str(mumbai.ran.config_path),
                             "--format", "csv")
    assert code == 2 and "--format: expected one of geoparquet, npy, got 'csv'" in err


# ------------------------------------------------------------------------------------ real QGIS

def _qgis(*args: str) -> dict:
    import subprocess

    from settlements.export.qgis_render import SYSTEM_PYTHON, qgis_environment

    probe = Path(__file__).parent / "qgis" / "probe_similar.py"
    proc = subprocess.run([SYSTEM_PYTHON, str(probe), *args], capture_output=True, text=True,
                          env=qgis_environment(), timeout=HANG_GUARD)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.qgis
def test_drawn_in_qgis_found_and_opened_styled_in_qgis(mumbai: Mumbai, monkeypatch, capsys) -> None:
    """Polygons drawn and saved in QGIS's `examples` layer are the examples; QGIS opens the result layers
    with their graduated styles in the palette's colours."""
    from settlements.export.qgis_render import qgis_available

    why = qgis_available()
    if why is not None:
        pytest.skip(f"real QGIS needed: {why}")
    gpkg = mumbai.ran.gpkg
    ex = example_draws(np.flatnonzero(mumbai.informal), [5])[0]
    t = mumbai.tiles.set_index("emb_row").loc[ex]
    wkts = [shapely.box(a + 5, b + 5, c - 5, d - 5).wkt for a, b, c, d in t[["minx", "miny", "maxx", "maxy"]]
            .itertuples(index=False)]
    drawn = _qgis("draw", str(gpkg), *wkts)
    assert drawn["valid"] and drawn["committed"], drawn
    assert drawn["after"] == drawn["before"] + 5 and drawn["crs"] == "EPSG:32643"
    code, out, err = run_cli(monkeypatch, capsys, "similar", str(mumbai.ran.config_path), "--examples", str(gpkg),
                             "--name", "qgis")
    assert code == 0, err
    under, _ = select_tiles(str(gpkg), None, "examples", "--examples", load_infos(workspace(mumbai.ran.cfg)),
                            mumbai.tiles)
    assert set(ex) <= set(mumbai.tiles.set_index("tile_id").loc[under, "emb_row"])
    assert f"like {len(under)} example(s)" in out, out
    report = _qgis("open", str(gpkg), "similar_qgis", "similar_qgis_regions", "examples")
    tiles = report["similar_qgis"]
    assert tiles["valid"] and tiles["features"] == 100 + len(under)
    assert tiles["renderer"] == "graduatedSymbol" and tiles["attribute"] == "score"
    assert [r[2] for r in tiles["ranges"]] == score_colours(len(tiles["ranges"]))
    got = layer(gpkg, "similar_qgis")
    assert tiles["ranges"][0][0] == pytest.approx(got["score"].min()) and \
        tiles["ranges"][-1][1] == pytest.approx(got["score"].max())
    assert tiles["aliases"]["rank"] == "Rank (0 = example)"
    regions = report["similar_qgis_regions"]
    assert regions["valid"] and regions["features"] == 64 and regions["attribute"] == "frac_similar"
    examples = report["examples"]
    assert examples["renderer"] == "singleSymbol" and examples["outline"] == DRAWN_COLOURS["examples"]
    assert examples["fill_alpha"] == 0


def test_a_query_killed_while_committing_leaves_the_geopackage_whole(mumbai: Mumbai) -> None:
    """SIGKILL before the commit journal: the GeoPackage is byte for byte what it was. After the journal: the
    next command that takes the pipeline's lock completes the commit, and the new layer is there."""
    import os
    import subprocess
    import sys

    from settlements.config import load_config
    from settlements.reprocess import pipeline_lock

    gpkg = mumbai.ran.gpkg
    ids = ",".join(mumbai.tiles["tile_id"].iloc[5:8].astype(str))
    for step, name in (("commit:staged", "killed1"), ("commit:journal", "killed2")):
        before = gpkg.read_bytes()
        proc = subprocess.run([sys.executable, "-m", "settlements.cli", "similar", str(mumbai.ran.config_path),
                               "--examples", ids, "--name", name], capture_output=True, text=True,
                              env={**os.environ, "SETTLEMENTS_CRASH_AT": step})  # settlements.store.CRASH_ENV
        assert proc.returncode == -9, proc.stderr[-2000:]
        if step == "commit:staged":
            assert gpkg.read_bytes() == before
        else:
            with pipeline_lock(load_config(mumbai.ran.config_path)):
                pass  # completes the commit the kill left half done
            assert f"similar_{name}" in pyogrio.list_layers(gpkg)[:, 0]
            assert "similar_killed1" not in pyogrio.list_layers(gpkg)[:, 0]
