"""Every command that writes is as safe as ``run``, and every product shares one legend and keeps the analyst's work.

One small real pipeline (Olinda, 64-pixel tiles, k=2: 30 kept tiles) is run, its clusters named (one with the
analyst's own colour), trained on those names, predicted, queried with ``similar`` and exported; each
test works on a copy of its folder. ``train``, ``predict``, ``similar``, ``export-embeddings`` and ``model export``
are killed (SIGKILL) at each step of their commit and stopped by SIGINT and SIGTERM, as ``run`` is in
``test_crash_safety.py``; two first runs of two pipelines race for one output folder;
``export-embeddings`` is aimed at the pipeline's own files; the colours of a name are read back from
every output; and the analyst's layers are looked for after later runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import geopandas as gpd
import matplotlib.image
import numpy as np
import pandas as pd
import pyogrio
import pytest
import rasterio
import yaml

from settlements.config import check_similar_options, load_config
from settlements.palette import MIN_COLOUR_DISTANCE, build_legend, colour_distance, hex_to_rgb
from settlements.pipeline import door, export_embeddings, predict, run, similar, train

from .conftest import HANG_GUARD, ROOT, run_cli, said, scene, write_pipeline
from .reprocess_helpers import leftovers, session_processes
from .test_safe_commands import SMALL, one_error_line

pytestmark = pytest.mark.slow

TRAINING = {"labels": {"source": "clusters"}, "evaluation": {"folds": 2, "block_tiles": 2},
            "top_model": {"neighbours": False}}
#: What the analyst calls the two clusters: one with a colour of her own, one with the palette's.
NAMES = {0: ("dense city", "#b30000"), 1: ("forest", None)}


def name_clusters(labels: Path) -> None:
    data = yaml.safe_load(labels.read_text())
    for cid, (name, colour) in NAMES.items():
        data["clusters"][cid].update(name=name, colour=colour)
    labels.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every product of a small pipeline, once: run, named, trained, predicted, queried, exported."""
    scene("olinda_brazil", "L7_ETMs.tif")
    folder = tmp_path_factory.mktemp("done")
    cfg = load_config(write_pipeline(folder, "small", "olinda", **SMALL, training=TRAINING))
    run(cfg)
    name_clusters(cfg.labels_path)
    run(cfg, skip_unchanged=True)
    train(cfg)
    predict(cfg, "auto")
    similar(cfg, tile_ids(cfg, 2), None, None, None, check_similar_options(5, None, "auto", 8, "first"))
    export_embeddings(cfg, "geoparquet")
    return folder


def tile_ids(cfg, n: int, start: int = 0) -> str:  # noqa: ANN001
    tiles = pyogrio.read_dataframe(cfg.output_dir / "small.gpkg", layer="tiles", columns=["tile_id"])
    return ",".join(str(t) for t in sorted(tiles["tile_id"])[start:start + n])


def copy_of(done: Path, dst: Path, **overrides: object) -> Path:
    """The finished pipeline's folder (work, outputs, labels) copied to ``dst``, with its config written there."""
    for name in ("work", "outputs"):
        shutil.copytree(done / name, dst / name, symlinks=True)
    shutil.copy(done / "small.labels.yaml", dst / "small.labels.yaml")
    return write_pipeline(dst, "small", "olinda", **{**SMALL, "training": TRAINING, **overrides})


#: Work state a command may change without changing a product: the embedding cache, the search index,
#: the fine tuning's checkpoint (none here), the lock.
WORK_STATE = ("cache", "search")


def state(folder: Path) -> dict[str, str]:
    """SHA-256 of every product and model file of the pipeline (hidden files, staging folders, work state aside)."""
    out = {}
    for top in (folder / "outputs" / "small", folder / "work" / "small"):
        for p in sorted(top.rglob("*")):
            rel = p.relative_to(folder)
            if p.is_file() and not any(part.startswith(".") or part in WORK_STATE for part in rel.parts):
                out[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest()
    out["labels"] = hashlib.sha256((folder / "small.labels.yaml").read_bytes()).hexdigest()
    return out


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "settlements.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


COMMANDS: dict[str, Callable[[Path], list[str]]] = {
    "train": lambda config: ["train", str(config)],
    "predict": lambda config: ["predict", str(config)],
    "similar": lambda config: ["similar", str(config), "--examples", tile_ids(load_config(config), 3, 10),
                               "--name", "again"],
    "export-embeddings": lambda config: ["export-embeddings", str(config)],
    "model export": lambda config: ["model", "export", str(config)],
}


def journal_of(folder: Path) -> Path:
    return folder / "work" / "small" / ".settlements-commit.json"


def killed_at(done: Path, folder: Path, command: str, step: str) -> tuple[dict[str, str], list[tuple[Path, Path]]]:
    """Run ``command`` on a fresh copy in ``folder``, SIGKILLed at ``step`` of its commit; the state before,
    and the journal's renames (absolute) where it left one."""
    config = copy_of(done, folder)
    before = state(folder)
    proc = start(*COMMANDS[command](config), env={"SETTLEMENTS_CRASH_AT": step})  # settlements.store.CRASH_ENV
    out, err = proc.communicate(timeout=HANG_GUARD)
    assert proc.returncode == -signal.SIGKILL, (command, step, out, err)
    journal = journal_of(folder)
    renames = []
    if journal.exists():
        renames = [(journal.parent / s, journal.parent / t) for s, t in json.loads(journal.read_text())["renames"]]
    return before, renames


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_kill_at_each_step_of_a_commands_commit_leaves_old_or_completes_new(done: Path, tmp_path: Path,
                                                                              command: str) -> None:
    """SIGKILL when all is staged (no journal yet): every earlier output and model byte for byte as it was.
    After the journal, and after the first and the last of its renames: the next command that takes the
    pipeline's lock completes the commit, every file the journal names holding what was staged."""
    results = {"commit:journal": killed_at(done, tmp_path / "commit-journal", command, "commit:journal")}
    n = len(results["commit:journal"][1])
    assert n, "the command committed nothing"
    steps = list(dict.fromkeys(["commit:staged", "commit:rename:1", f"commit:rename:{n}"]))  # one, for one file
    with ThreadPoolExecutor(2) as pool:  # independent copies: two at a time
        results |= dict(zip(steps, pool.map(
            lambda step: killed_at(done, tmp_path / step.replace(":", "-"), command, step), steps), strict=True))
    for step, (before, renames) in results.items():
        folder = tmp_path / step.replace(":", "-")
        cfg = load_config(folder / "small.yaml")
        if step == "commit:staged":
            assert state(folder) == before and not renames, step
        else:
            done_renames = 0 if step == "commit:journal" else int(step.rsplit(":", 1)[1])
            for i, (staged, _) in enumerate(renames):
                assert staged.exists() == (i >= done_renames), (step, staged)
            new = {final: sha(final if i < done_renames else staged) for i, (staged, final) in enumerate(renames)}
            if step == "commit:journal":
                assert state(folder) == before, step
            with door(cfg):
                pass  # the next command: completes the renames the kill left
            assert {final: sha(final) for final in new} == new, step
            assert not journal_of(folder).exists()
        with door(cfg):
            pass  # and removes what a kill before the commit point left
        assert not leftovers(cfg.output_dir, cfg.work_dir), step


@pytest.mark.parametrize("command", list(COMMANDS))
def test_sigint_and_sigterm_change_nothing_and_say_so(done: Path, tmp_path: Path, command: str) -> None:
    """Ctrl-C while the command works (train: evaluating; predict: writing the map) or at the last moment before
    its commit point (similar, export-embeddings), and a service manager's SIGTERM there: exit 128 + the
    signal, one line, every earlier output and model byte for byte, nothing left behind."""
    cases = [(signal.SIGINT, None), (signal.SIGTERM, "commit:staged=SIGTERM")]
    if command in ("similar", "export-embeddings", "model export"):
        cases[0] = (signal.SIGINT, "commit:staged=SIGINT")
    for sig, at in cases:
        root = tmp_path / sig.name
        config = copy_of(done, root)
        cfg = load_config(config)
        before = state(root)
        proc = start(*COMMANDS[command](config), env={"SETTLEMENTS_CRASH_AT": at} if at else None)
        if at is None:  # from outside, once the command has staged its first file
            folder, pattern = {"train": (cfg.work_dir / "supervised", ".settlements-tmp-*top_model.pt"),
                               "predict": (cfg.output_dir, ".settlements-tmp-*/small_supervised.gpkg")}[command]
            end = time.monotonic() + 300
            while not list(folder.glob(pattern)):
                assert proc.poll() is None and time.monotonic() < end, proc.communicate()
                time.sleep(0.002)
            os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=HANG_GUARD)
        assert proc.returncode == 128 + sig, (command, sig.name, proc.returncode, out, err)
        assert said(err) == [f"error: interrupted by {sig.name}; the outputs are those of the last completed "
                                    "run"], err
        assert session_processes(proc.pid) == []
        assert state(root) == before, (command, sig.name)
        assert not leftovers(cfg.output_dir, cfg.work_dir) and not journal_of(root).exists()


# ------------------------------------------------------------------------------ a failed training

def test_a_training_that_fails_its_evaluation_replaces_no_model(done: Path, tmp_path: Path, monkeypatch,
                                                                 capsys) -> None:
    """A few spatial blocks cannot make 20 folds: exit 2 after the top model was fitted, and the last good model,
    its record and its evaluation are what `predict` still finds."""
    config = copy_of(done, tmp_path, training={**TRAINING, "evaluation": {"folds": 20, "block_tiles": 2}})
    before = state(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, "train", str(config))
    one_error_line(code, err, r"training\.evaluation: only \d+ spatial blocks for 20 folds")
    assert state(tmp_path) == before
    cfg = load_config(config)
    assert not leftovers(cfg.output_dir, cfg.work_dir)


# ---------------------------------------------------------------------- two pipelines, one folder

def test_two_first_runs_into_one_output_folder_the_second_is_told_whose_it_is(tmp_path: Path) -> None:
    """Two new pipelines (own work folders) with the same output.dir, started at the same moment: one runs,
    the other stops at once with one line naming the first, and leaves nothing of its own behind."""
    shared = tmp_path / "shared-outputs"
    configs = {}
    for name in ("east", "west"):
        configs[name] = write_pipeline(tmp_path, name, "olinda", **SMALL)
        data = yaml.safe_load(configs[name].read_text())
        data["output"]["dir"] = str(shared)
        configs[name].write_text(yaml.safe_dump(data))
    procs = {name: start("run", str(config)) for name, config in configs.items()}
    results = {name: (p.wait(timeout=HANG_GUARD), *p.communicate()) for name, p in procs.items()}
    codes = sorted(r[0] for r in results.values())
    assert codes == [0, 2], results
    winner = next(n for n, r in results.items() if r[0] == 0)
    loser = next(n for n, r in results.items() if r[0] == 2)
    line = one_error_line(2, results[loser][2], rf"output\.dir: {re.escape(str(shared))} belongs to pipeline "
                                                rf"'{winner}' \({re.escape(str(configs[winner]))}\); give pipeline "
                                                rf"'{loser}' a folder of its own")
    assert line
    assert sorted(p.name for p in shared.glob("*.gpkg")) == [f"{winner}.gpkg"]
    assert json.loads((shared / ".settlements-pipeline.json").read_text())["pipeline"] == winner
    assert not (tmp_path / "work" / loser / ".settlements-pipeline.json").exists()  # its claim, released


# -------------------------------------------------------------------- export-embeddings' own files

@pytest.mark.parametrize(("target", "what"), [
    ("outputs/small/small.gpkg", "the pipeline's GeoPackage"),
    ("small.labels.yaml", "the pipeline's labels file"),
    ("small.yaml", "the pipeline's config"),
    ("work/small/supervised/top_model.pt", "a model file of the pipeline"),
    ("outputs/small/small_supervised.gpkg", "an output of the pipeline"),
    ("work/small/embeddings.npy", "in the pipeline's work folder"),
])
@pytest.mark.parametrize("fmt", ["geoparquet", "npy"])
def test_export_embeddings_never_writes_over_the_pipelines_files(done: Path, tmp_path: Path, monkeypatch, capsys,
                                                                 target: str, what: str, fmt: str) -> None:
    config = copy_of(done, tmp_path)
    before = state(tmp_path)
    aimed = tmp_path / target
    code, _, err = run_cli(monkeypatch, capsys, "export-embeddings", str(config), "--format", fmt,
                           "--output", str(aimed))
    if aimed.suffix != {"geoparquet": ".parquet", "npy": ".npy"}[fmt]:  # the wrong kind of file for the format
        one_error_line(code, err, rf"--output: {re.escape(str(aimed))}: (a GeoParquet export is a \.parquet file|"
                                  r"the npy format's vectors are a \.npy file)")
    else:
        one_error_line(code, err, rf"{re.escape(str(aimed))}: {what}; export-embeddings writes only files of its own")
    # the same, named with the right ending, through a link
    link = tmp_path / ("link.parquet" if fmt == "geoparquet" else "link.npy")
    link.symlink_to(aimed)
    code, _, err = run_cli(monkeypatch, capsys, "export-embeddings", str(config), "--format", fmt, "--output",
                           str(link))
    one_error_line(code, err, rf"{re.escape(str(link))}: {what}; export-embeddings writes only files of its own")
    assert state(tmp_path) == before


def test_each_format_writes_files_of_its_own_and_only_over_its_own(done: Path, tmp_path: Path, monkeypatch,
                                                                    capsys) -> None:
    config = copy_of(done, tmp_path)
    out = tmp_path / "outputs" / "small"
    geoparquet = out / "small_embeddings.parquet"
    first = geoparquet.read_bytes()
    code, stdout, err = run_cli(monkeypatch, capsys, "export-embeddings", str(config), "--format", "npy")
    assert code == 0, err
    assert geoparquet.read_bytes() == first  # the GeoParquet export is untouched
    table = gpd.read_parquet(out / "small_embeddings_table.parquet")
    kept = len(pyogrio.read_dataframe(out / "small.gpkg", layer="tiles", read_geometry=False))
    assert "embedding" not in table.columns and len(table) == len(np.load(out / "small_embeddings.npy")) == kept
    # its own files again: both formats may rewrite what they wrote
    for fmt in ("geoparquet", "npy"):
        code, _, err = run_cli(monkeypatch, capsys, "export-embeddings", str(config), "--format", fmt)
        assert code == 0, err
    # a table of the npy format where the GeoParquet export lies: refused, the file kept
    theirs = tmp_path / "mine.parquet"
    code, _, err = run_cli(monkeypatch, capsys, "export-embeddings", str(config), "--output",
                           str(tmp_path / "x_table.parquet"))
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, "export-embeddings", str(config), "--format", "npy", "--output",
                           str(tmp_path / "x.npy"))
    one_error_line(code, err, r"x_table\.parquet: an earlier export's GeoParquet file; the npy table goes in a file "
                              r"of its own")
    # a file of someone else's, and one changed since the export wrote it
    theirs.write_bytes(b"the analyst's own table")
    code, _, err = run_cli(monkeypatch, capsys, "export-embeddings", str(config), "--output", str(theirs))
    one_error_line(code, err, r"mine\.parquet: exists and is no file export-embeddings wrote for pipeline 'small'")
    assert theirs.read_bytes() == b"the analyst's own table"
    with geoparquet.open("ab") as f:
        f.write(b"\0")
    code, _, err = run_cli(monkeypatch, capsys, "export-embeddings", str(config))
    one_error_line(code, err, r"small_embeddings\.parquet: changed since export-embeddings wrote it")


# ----------------------------------------------------------------------------------- one legend

def category_colours(qml: str) -> dict[str, str]:
    """Label -> fill colour (#rrggbb) of a categorized QGIS style."""
    root = ET.fromstring(qml)
    symbols = {s.get("name"): s for s in root.iter("symbol")}
    out = {}
    for cat in root.iter("category"):
        if not cat.get("value"):
            continue
        colour = next(o.get("value") for o in symbols[cat.get("symbol")].iter("Option") if o.get("name") == "color")
        r, g, b = (int(v) for v in colour.split(",")[:3])
        out[cat.get("value")] = f"#{r:02x}{g:02x}{b:02x}"
    return out


def default_style(gpkg: Path, table: str) -> str:
    con = sqlite3.connect(gpkg)
    try:
        return con.execute("SELECT styleQML FROM layer_styles WHERE f_table_name = ? AND useAsDefault = 1",
                           (table,)).fetchone()[0]
    finally:
        con.close()


def cog_colour(path: Path, label: str) -> tuple[int, tuple[int, ...]]:
    """The code of ``label`` in a COG's attribute table, and that code's colour in its colour table."""
    rat = ET.parse(f"{path}.aux.xml").getroot().find(".//GDALRasterAttributeTable")
    code = next(int(r.findall("F")[0].text) for r in rat.findall("Row") if r.findall("F")[1].text == label)
    with rasterio.open(path) as src:
        return code, tuple(src.colormap(1)[code])


def has_pixels(png: Path, colour: str) -> int:
    rgb = (matplotlib.image.imread(png)[..., :3] * 255).round().astype(int)
    return int((rgb == np.asarray(hex_to_rgb(colour))).all(axis=-1).sum())


def test_a_name_has_one_colour_and_code_in_the_cluster_and_the_supervised_outputs(done: Path) -> None:
    """'dense city' in the analyst's #b30000, 'forest' in the palette's green: the same in every layer style,
    both COGs' colour tables (with the same code), both map pictures and the QGIS project."""
    out = done / "outputs" / "small"
    expected = {"dense city": "#b30000", "forest": "#006d2c"}
    assert category_colours(default_style(out / "small.gpkg", "tiles")) == expected
    assert category_colours(default_style(out / "small.gpkg", "regions")) == expected
    assert category_colours(default_style(out / "small_supervised.gpkg", "predicted_tiles")) == expected
    assert category_colours(default_style(out / "small_supervised.gpkg", "predicted_regions")) == expected
    for name, colour in expected.items():
        cluster_code, cluster_rgba = cog_colour(out / "small_labels.tif", name)
        predicted_code, predicted_rgba = cog_colour(out / "small_predicted.tif", name)
        assert cluster_code == predicted_code and cluster_rgba == predicted_rgba == (*hex_to_rgb(colour), 255)
        assert has_pixels(out / "map.png", colour) > 100 and has_pixels(out / "supervised_map.png", colour) > 100
    with zipfile.ZipFile(out / "small.qgz") as z:
        project = z.read("small.qgs").decode()
    assert "179,0,0,255" in project and "0,109,44,255" in project


def test_no_two_labels_of_a_legend_look_alike() -> None:
    """Palette colours: every automatic colour (the first 24 and the hue walk after them) and every known one
    at least MIN_COLOUR_DISTANCE apart; a model's classes appended after the clusters' keep to it too, and
    never move a cluster's colour or code."""
    names = {i: f"cluster {i}" for i in range(40)} | {3: "beach", 7: "farmland", 12: "water"}
    legend = build_legend(names, {}, extra=["built-up", "informal settlement", "sand", "cloud", "dense city"])
    colours = list(legend.colours)
    near = [(a, b) for i, a in enumerate(legend.labels) for b in legend.labels[i + 1:]
            if colour_distance(legend.colour(a), legend.colour(b)) < MIN_COLOUR_DISTANCE]
    assert near == [] and len(set(colours)) == len(colours)
    clusters_only = build_legend(names, {})
    assert legend.only(list(clusters_only.labels)) == clusters_only
    # what today's palette gave cluster 1 next to a beach: all but the same pale yellow
    assert colour_distance(build_legend({0: "beach", 1: "cluster 1"}, {}).colour("cluster 1"), "#fff7bc") >= 15


# ------------------------------------------------------------------------ the analyst's layers

def layers_of(gpkg: Path) -> set[str]:
    return set(pyogrio.list_layers(gpkg)[:, 0])


def project_layers(qgz: Path) -> set[str]:
    with zipfile.ZipFile(qgz) as z:
        text = z.read(z.namelist()[0]).decode()
    return set(re.findall(r"layername=(\w+)", text))


@pytest.mark.parametrize("later", ["labels pull", "a changed setting", "refit"])
def test_drawn_examples_and_similar_results_survive_every_later_run(done: Path, tmp_path: Path, monkeypatch, capsys,
                                                                     later: str) -> None:
    config = copy_of(done, tmp_path, **({"output": {"atlas_tiles": 4}} if later == "a changed setting" else {}))
    cfg = load_config(config)
    gpkg = cfg.output_dir / "small.gpkg"
    result = pyogrio.read_dataframe(gpkg, layer="similar_first")
    assert len(result) == 7  # 2 examples, 5 matches
    tiles = pyogrio.read_dataframe(gpkg, layer="tiles")
    drawn = tiles.iloc[:1][["geometry"]].assign(note="a place I know")
    pyogrio.write_dataframe(drawn, gpkg, layer="examples", append=True)  # as QGIS saves a drawn polygon
    if later == "labels pull":
        with sqlite3.connect(gpkg) as con:
            con.execute("UPDATE clusters SET label = 'trees' WHERE cluster = 1")
        code, _, err = run_cli(monkeypatch, capsys, "labels", "pull", str(gpkg), "--config", str(config))
    else:
        code, _, err = run_cli(monkeypatch, capsys, "run", str(config), *(["--refit"] if later == "refit" else []))
    assert code == 0, err
    assert {"examples", "negatives", "similar_first", "similar_first_regions"} <= layers_of(gpkg)
    kept = pyogrio.read_dataframe(gpkg, layer="similar_first")
    assert sorted(kept["tile_id"]) == sorted(result["tile_id"]) and np.allclose(kept["score"], result["score"])
    assert list(pyogrio.read_dataframe(gpkg, layer="examples")["note"]) == ["a place I know"]
    assert 'attr="score"' in default_style(gpkg, "similar_first")
    assert {"examples", "negatives", "similar_first", "similar_first_regions", "tiles"} <= project_layers(
        cfg.output_dir / "small.qgz")
    if later == "labels pull":
        assert "trees" in set(pyogrio.read_dataframe(gpkg, layer="clusters")["label"])


def test_similar_adds_its_result_to_the_qgis_project(done: Path) -> None:
    assert {"similar_first", "similar_first_regions"} <= project_layers(done / "outputs" / "small" / "small.qgz")


def layer_names(qgz: Path) -> list[str]:
    """The project's layers, top of the legend first."""
    with zipfile.ZipFile(qgz) as z:
        tree = ET.fromstring(z.read(z.namelist()[0]))
    return [node.get("name") for node in tree.iter("layer-tree-layer")]


def test_the_project_shows_every_product_that_exists_and_the_imagery(done: Path, tmp_path: Path, monkeypatch,
                                                                     capsys) -> None:
    """After run, predict and similar: the project holds the similar result, the cluster map, the supervised map
    (switched off) and the source imagery at the bottom; a later predict and a later run keep them all, and a
    run still has nothing to do after predict rewrote the project."""
    qgz = done / "outputs" / "small" / "small.qgz"
    names = layer_names(qgz)
    assert names[-1] == "imagery: L7_ETMs.tif"
    assert {"similar_first", "cluster map", "predicted tiles", "predicted regions", "predicted map"} <= set(names)
    assert names.index("cluster map") < names.index("predicted tiles") < names.index("imagery: L7_ETMs.tif")
    config = copy_of(done, tmp_path)
    copied = tmp_path / "outputs" / "small" / "small.qgz"
    assert run_cli(monkeypatch, capsys, "run", str(config))[0] == 0  # its own first run (another config)
    assert layer_names(copied) == names
    assert run_cli(monkeypatch, capsys, "predict", str(config))[0] == 0
    assert layer_names(copied) == names
    assert run_cli(monkeypatch, capsys, "run", str(config))[0] == 3  # predict's project is recorded as the run's


def test_scores_against_the_training_labels_themselves_say_so_everywhere(done: Path, tmp_path: Path, monkeypatch,
                                                                         capsys) -> None:
    """Trained on the named clusters with no independent reference: every output that shows a score says it is
    measured against the training labels themselves (k-means scores its own clusters), and ``train`` prints
    rounded figures, not raw floats or dicts."""
    from PIL import Image

    out = done / "outputs" / "small"
    against = "training labels (clusters)"
    for name in ("evaluation.csv", "cluster_quality.csv", "confusion.csv"):
        assert set(pd.read_csv(out / name)["against"]) == {against}, name
    with Image.open(out / "confusion.png") as png:
        assert "against the training labels themselves (clusters), not an independent reference" in png.text["Title"]
    config = copy_of(done, tmp_path)
    code, printed, err = run_cli(monkeypatch, capsys, "train", str(config))
    assert code == 0, err
    lines = printed.splitlines()
    assert lines[0].startswith("small: top model on ") and "labelled tiles of 2 classes (" in lines[0]
    scores = next(line for line in lines if "macro F1" in line)
    assert re.fullmatch(r"  blocked 2-fold macro F1 against the training labels themselves \(clusters\), not an "
                        r"independent reference: kmeans \d\.\d{3}, top_model \d\.\d{3}", scores), scores
    assert not re.search(r"\d\.\d{4}|[{}]", printed), printed  # no raw floats, no dicts
