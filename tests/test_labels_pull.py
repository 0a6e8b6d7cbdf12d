"""Labelling inside QGIS: edits to the GeoPackage's clusters table come back into the labels YAML."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import yaml
from PIL import Image

from settlements.config import load_config
from settlements.labels import ClusterLabels, exported_snapshot, merge_table_edits, read_labels
from settlements.pipeline import stage_export

from .conftest import HANG_GUARD, ROOT, Ran, said, write_pipeline

NEW_NAME = "sea or river"
NEW_COLOUR = "#ff00ff"


def test_table_edits_merge_onto_the_yaml_keeping_yaml_edits_made_since_the_export() -> None:
    exported = ClusterLabels({0: "water", 1: "forest", 2: "cluster 2", 3: "forest"}, {0: None, 1: None, 2: None,
                                                                                     3: "#00aa00"})
    snapshot = exported_snapshot(exported)
    yaml_now = ClusterLabels({0: "water", 1: "forest", 2: "fields", 3: "forest"}, dict(exported.colours))
    table = {c: (name, colour, 10) for c, (name, colour) in ((int(k), v) for k, v in snapshot.items())}
    table[0] = ("lake", table[0][1], 10)  # renamed in QGIS
    table[1] = ("forest", "#112233", 10)  # recoloured in QGIS: every 'forest' cluster takes the colour
    merged, changes = merge_table_edits(Path("x.gpkg"), yaml_now, table, snapshot)
    assert merged.names == {0: "lake", 1: "forest", 2: "fields", 3: "forest"}
    assert merged.colours == {0: None, 1: "#112233", 2: None, 3: "#112233"}
    assert merged.legend().colour("forest") == "#112233"
    assert len(changes) == 2
    again, none = merge_table_edits(Path("x.gpkg"), yaml_now, {c: (n, col, 1) for c, (n, col) in
                                                                 ((int(k), v) for k, v in snapshot.items())}, snapshot)
    assert none == [] and again == yaml_now


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", "from settlements.cli import main; main()", *args],
                          capture_output=True, text=True, env=env, timeout=HANG_GUARD)


def _magenta_pixels(path: Path) -> int:
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB")).reshape(-1, 3)
    return int((arr == [255, 0, 255]).all(axis=1).sum())


@pytest.fixture(scope="module")
def exported(olinda: Ran, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The Olinda run's work folder copied under a pipeline config of its own, exported there, with its
    own labels YAML (the session's stays put)."""
    tmp = tmp_path_factory.mktemp("pull")
    config = write_pipeline(tmp, "olinda", "olinda")
    cfg = load_config(config)
    shutil.copytree(olinda.work, cfg.work_dir)
    outputs = stage_export(cfg)
    return outputs["gpkg"], cfg.labels_path


@pytest.mark.slow
def test_names_and_colours_edited_in_the_clusters_table_reach_yaml_styles_raster_and_plots(
        exported: tuple[Path, Path]) -> None:
    gpkg, labels_path = exported
    out = gpkg.parent
    before_yaml = yaml.safe_load(labels_path.read_text())["clusters"]
    assert _magenta_pixels(out / "map.png") == 0
    con = sqlite3.connect(gpkg)
    with con:
        old_name = con.execute("SELECT label FROM clusters WHERE cluster = 0").fetchone()[0]
        recoloured = con.execute("SELECT label FROM clusters WHERE cluster = 1").fetchone()[0]
        con.execute("UPDATE clusters SET label = ? WHERE cluster = 0", (NEW_NAME,))
        con.execute("UPDATE clusters SET colour = ? WHERE cluster = 1", (NEW_COLOUR,))
    con.close()

    proc = _cli("labels", "pull", str(gpkg))
    assert proc.returncode == 0, proc.stderr
    # a pull that succeeds says what it did on stdout, and nothing on stderr: no WARNING, no temporary name
    assert said(proc.stderr) == [], proc.stderr
    assert ".settlements-tmp" not in proc.stdout + proc.stderr
    assert f"cluster 0: name {old_name!r} -> {NEW_NAME!r}" in proc.stdout
    assert "cluster 1: colour" in proc.stdout and NEW_COLOUR in proc.stdout

    # the YAML: the two edits, everything else as it was (sizes, null colours)
    after_yaml = yaml.safe_load(labels_path.read_text())["clusters"]
    assert after_yaml[0] == {**before_yaml[0], "name": NEW_NAME}
    assert after_yaml[1] == {**before_yaml[1], "colour": NEW_COLOUR}
    assert {c: e for c, e in after_yaml.items() if c > 1} == {c: e for c, e in before_yaml.items() if c > 1}
    labels = read_labels(labels_path, len(after_yaml))
    code = labels.legend().code(recoloured)

    clusters = pyogrio.read_dataframe(gpkg, layer="clusters")
    assert clusters.loc[0, "label"] == NEW_NAME and clusters.loc[1, "colour"] == NEW_COLOUR
    con = sqlite3.connect(gpkg)
    styles = dict(con.execute("SELECT styleName, styleQML FROM layer_styles "  # the layers drawn in have no labels
                              "WHERE f_table_name NOT IN ('examples', 'negatives')").fetchall())
    con.close()
    for qml in styles.values():
        assert f'label="{NEW_NAME}"' in qml and f'label="{old_name}"' not in qml
        assert "255,0,255,255" in qml or NEW_COLOUR in qml
    with rasterio.open(out / "olinda_labels.tif") as src:
        assert src.colormap(1)[code] == (255, 0, 255, 255)
    assert NEW_NAME in (out / "olinda_labels.tif.aux.xml").read_text()
    qml = (out / "olinda_labels.qml").read_text()
    assert f'color="{NEW_COLOUR}"' in qml and f'label="{NEW_NAME}"' in qml
    with zipfile.ZipFile(out / "olinda.qgz") as zf:
        project = zf.read("olinda.qgs").decode()
    assert NEW_NAME in project and "255,0,255,255" in project
    for picture in ("map.png", "histograms.png"):
        assert _magenta_pixels(out / picture) > 50, picture

    # pulling again finds nothing to do and leaves the YAML byte for byte
    text = labels_path.read_text()
    again = _cli("labels", "pull", str(gpkg))
    assert again.returncode == 0 and "no edits" in again.stdout
    assert labels_path.read_text() == text


@pytest.mark.slow
def test_a_bad_colour_in_the_table_is_one_error_line_and_changes_nothing(exported: tuple[Path, Path],
                                                                        tmp_path: Path) -> None:
    gpkg, labels_path = exported
    bad = tmp_path / gpkg.name
    bad.write_bytes(gpkg.read_bytes())
    con = sqlite3.connect(bad)
    with con:
        con.execute("UPDATE clusters SET colour = 'blue' WHERE cluster = 2")
    con.close()
    yaml_before, gpkg_before = labels_path.read_bytes(), bad.read_bytes()
    proc = _cli("labels", "pull", str(bad))
    assert proc.returncode == 2
    lines = said(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "clusters.2.colour" in lines[0]
    assert str(bad) in lines[0]
    assert labels_path.read_bytes() == yaml_before and bad.read_bytes() == gpkg_before
    assert sorted(p.name for p in tmp_path.iterdir()) == [bad.name]
