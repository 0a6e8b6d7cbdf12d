"""Commands that share a pipeline's files never clobber each other or an analyst's work.

One small real run (Olinda, 64-pixel tiles, k=2) is copied into each test's folder: locks held
while every writing command is tried, two pipelines pointed at one folder, user files beside the
artifacts, outputs deleted or replaced between runs, hand-edited ``clusters`` tables, library
warnings, and files that travel between people (a crafted GeoPackage, a crafted model file).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from settlements.config import load_config
from settlements.pipeline import run, stage_export
from settlements.reprocess import pipeline_lock

from .conftest import HANG_GUARD, ROOT, run_cli, said, scene, write_pipeline
from .reprocess_helpers import layer, leftovers, snapshot

pytestmark = pytest.mark.slow

SMALL = {"tiling": {"tile_size": "64px"}, "embedding": {"input_size": 32, "num_workers": 0},
         "clustering": {"k": 2}}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished small run; tests work on copies of its folder."""
    scene("olinda_brazil", "L7_ETMs.tif")
    folder = tmp_path_factory.mktemp("base")
    run(load_config(write_pipeline(folder, "small", "olinda", **SMALL)))
    return folder


def copy_of(base: Path, dst: Path, export: bool = False, **overrides: object) -> Path:
    """The base run's folder (work, outputs, labels) copied to ``dst``, with its config rewritten there.

    With ``export``, the copy's outputs are exported again, so its GeoPackage names the copy's config.
    """
    for name in ("work", "outputs"):
        shutil.copytree(base / name, dst / name, symlinks=True)
    shutil.copy(base / "small.labels.yaml", dst / "small.labels.yaml")
    config = write_pipeline(dst, "small", "olinda", **{**SMALL, **overrides})
    if export:
        stage_export(load_config(config))
    return config


def one_error_line(code: int, err: str, pattern: str) -> str:
    lines = said(err)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def everything(folder: Path) -> dict[str, str]:
    """Every visible file of the pipeline: outputs, work artifacts and the labels file."""
    return {**{f"outputs/{k}": v for k, v in snapshot(folder / "outputs" / "small").items()},
            **{f"work/{k}": v for k, v in snapshot(folder / "work" / "small").items()},
            "labels": (folder / "small.labels.yaml").read_text()}


# ------------------------------------------------------------------------------------------ locks

WRITERS = [
    ["labels", "pull", "{gpkg}"], ["labels-template", "{config}", "--force"], ["labels", "template", "{config}"],
    ["run", "{config}", "--force"], ["tile", "{config}"], ["embed", "{config}"], ["cluster", "{config}"],
    ["export", "{config}"], ["cache", "prune", "{config}"], ["train", "{config}"], ["predict", "{config}"],
    ["similar", "{config}", "--examples", "1"], ["export-embeddings", "{config}"], ["model", "export", "{config}"],
]


def test_every_writing_command_takes_the_pipeline_lock(base: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    config = copy_of(base, tmp_path, export=True, training={"labels": {"source": "spectral"}})
    cfg = load_config(config)
    gpkg = cfg.output_dir / "small.gpkg"
    with sqlite3.connect(gpkg) as con:  # an edit in QGIS, waiting to be pulled
        con.execute("UPDATE clusters SET label = 'water' WHERE cluster = 0")
    before = everything(tmp_path)
    with pipeline_lock(cfg):  # a run in progress
        for args in WRITERS:
            argv = [a.format(gpkg=gpkg, config=config) for a in args]
            code, _, err = run_cli(monkeypatch, capsys, *argv)
            one_error_line(code, err, r"another run of pipeline 'small' is in progress")
        for args in WRITERS:  # each waits, when asked
            argv = [a.format(gpkg=gpkg, config=config) for a in args]
            code, _, err = run_cli(monkeypatch, capsys, *argv, "--wait", "0.3")
            one_error_line(code, err, r"in progress .* after waiting 0\.3 s")
    assert everything(tmp_path) == before
    # once the lock is free, the pull goes through
    code, out, err = run_cli(monkeypatch, capsys, "labels", "pull", str(gpkg))
    assert code == 0, err
    assert "cluster 0: name" in out and yaml.safe_load(cfg.labels_path.read_text())["clusters"][0]["name"] == "water"


@pytest.mark.parametrize("args", [["run", "{config}", "--wait", "-1"], ["labels", "pull", "{gpkg}", "--wait", "-1"],
                                  ["cache", "prune", "{config}", "--wait=-0.5"]])
def test_negative_wait_is_refused(base: Path, tmp_path: Path, monkeypatch, capsys, args: list[str]) -> None:
    config = copy_of(base, tmp_path)
    before = everything(tmp_path)
    argv = [a.format(gpkg=tmp_path / "outputs" / "small" / "small.gpkg", config=config) for a in args]
    code, _, err = run_cli(monkeypatch, capsys, *argv)
    one_error_line(code, err, r"--wait.*-(1|0\.5)")
    assert everything(tmp_path) == before


# ------------------------------------------------------------------------------- shared folders

@pytest.mark.parametrize("shared", ["work_dir", "dir"])
@pytest.mark.parametrize("other", ["another name", "same name, another config"])
def test_a_second_pipeline_cannot_take_over_a_folder(base: Path, tmp_path: Path, monkeypatch, capsys,
                                                     shared: str, other: str) -> None:
    copy_of(base, tmp_path)
    before = everything(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    name = "other" if other == "another name" else "small"
    folder = tmp_path / ("work" if shared == "work_dir" else "outputs") / "small"
    config = write_pipeline(elsewhere, name, "olinda", **SMALL)
    data = yaml.safe_load(config.read_text())
    data["output"][shared] = str(folder)
    config.write_text(yaml.safe_dump(data))
    code, _, err = run_cli(monkeypatch, capsys, "run", str(config))
    one_error_line(code, err, rf"output\.{shared}: {re.escape(str(folder))} belongs to pipeline 'small' "
                              rf"\({re.escape(str(tmp_path / 'small.yaml'))}\); give pipeline '{name}' a folder")
    assert everything(tmp_path) == before
    assert not (elsewhere / "outputs").exists() or not any((elsewhere / "outputs").rglob("*.gpkg"))


def test_a_moved_pipeline_keeps_its_folders(base: Path, tmp_path: Path) -> None:
    """The marker names the config relative to the folder: a tree moved as a whole stays owned."""
    moved = tmp_path / "moved"
    config = copy_of(base, moved)
    report = run(load_config(config), skip_unchanged=True)
    assert report.run_id is not None


# ---------------------------------------------------------------------------------- user files

def test_only_the_projects_own_temporary_files_are_removed(base: Path, tmp_path: Path) -> None:
    config = copy_of(base, tmp_path)
    cfg = load_config(config)
    mine = [cfg.work_dir / ".env.settings.json", cfg.work_dir / "notes" / ".draft.chapter1.md",
            cfg.output_dir / ".qgis.settings.qml", tmp_path / ".small.labels.yaml.bak12345.yaml"]
    for path in mine:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("the analyst's own file\n")
    stale = [cfg.work_dir / ".settlements-tmp-1234-abcd.tiles.parquet",
             cfg.work_dir / "cache" / ".settlements-tmp-x1y2z3.chunk-000001-1-abc.npz",
             tmp_path / ".settlements-tmp-1234-abcd.small.labels.yaml"]
    for path in stale:
        path.write_bytes(b"left by a killed run")
    (cfg.output_dir / ".settlements-tmp-1234-abcd").mkdir()
    (cfg.output_dir / ".settlements-tmp-1234-abcd" / "atlas.png").write_bytes(b"half a picture")
    run(cfg)
    for path in mine:
        assert path.read_text() == "the analyst's own file\n", path
    assert not [p for p in stale if p.exists()] and not leftovers(cfg.work_dir, cfg.output_dir)


# ------------------------------------------------------------------------------------ up to date

def test_nothing_to_do_only_when_every_output_is_there_unchanged(base: Path, tmp_path: Path) -> None:
    config = copy_of(base, tmp_path)
    cfg = load_config(config)
    assert not run(cfg, skip_unchanged=True).nothing_to_do  # the config moved: another state
    assert run(cfg, skip_unchanged=True).nothing_to_do
    out = cfg.output_dir
    gone = [out / "small_labels.tif", out / "small_labels.qml", out / "small.qgz"]
    for path in gone:
        path.unlink()
    assert not run(cfg, skip_unchanged=True).nothing_to_do
    assert all(p.is_file() for p in gone)
    # another picture of the same size in its place (what a second pipeline in the folder did)
    atlas = out / "atlas.png"
    data = atlas.read_bytes()
    atlas.write_bytes(data[:100] + bytes(255 - b for b in data[100:200]) + data[200:])
    assert not run(cfg, skip_unchanged=True).nothing_to_do
    assert atlas.read_bytes() == data
    os.utime(atlas)  # touched, or copied back: same content, nothing to do
    shutil.copy(out / "map.png", tmp_path / "map.png")
    shutil.copy(tmp_path / "map.png", out / "map.png")
    assert run(cfg, skip_unchanged=True).nothing_to_do


# ------------------------------------------------------------------------- edited clusters tables

@pytest.mark.parametrize(("sql", "pattern"), [
    ("UPDATE clusters SET cluster = NULL WHERE cluster = 1",
     r"clusters row \d: cluster: expected a cluster id \(0 or more\), got None"),
    ("UPDATE clusters SET cluster = 'one' WHERE cluster = 1", r"clusters row \d: cluster: .*got 'one'"),
    ("UPDATE clusters SET size = 'many' WHERE cluster = 1", r"clusters\.1\.size: expected a number of tiles, "
                                                            r"got 'many'"),
    ("UPDATE clusters SET cluster = 0 WHERE cluster = 1", r"clusters\.0: the cluster appears twice"),
    ("UPDATE runs SET labels = '[1, 2' WHERE fid = (SELECT MAX(fid) FROM runs)", r"runs\.labels: not the labels"),
])
def test_labels_pull_of_an_odd_clusters_table_is_one_error_line(base: Path, tmp_path: Path, monkeypatch, capsys,
                                                                sql: str, pattern: str) -> None:
    copy_of(base, tmp_path / "pipeline", export=True)
    gpkg = tmp_path / "pipeline" / "outputs" / "small" / "small.gpkg"
    with sqlite3.connect(gpkg) as con:
        con.execute(sql)
    before = everything(tmp_path / "pipeline")
    code, _, err = run_cli(monkeypatch, capsys, "labels", "pull", str(gpkg))
    one_error_line(code, err, re.escape(str(gpkg)) + ": " + pattern)
    assert everything(tmp_path / "pipeline") == before


# ------------------------------------------------------------------------------------ warnings

def test_library_warnings_and_repeated_warnings_are_one_line_each(base: Path, tmp_path: Path) -> None:
    """Names matplotlib's font has no glyphs for (a warning per glyph, per picture) and a cluster id
    beyond k (warned each time the labels file is read) still give one line per distinct message."""
    config = copy_of(base, tmp_path)
    labels = tmp_path / "small.labels.yaml"
    data = yaml.safe_load(labels.read_text())
    data["clusters"][0]["name"] = "集落"
    data["clusters"][7] = {"name": "gone"}
    labels.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "settlements.cli", "export", str(config)], capture_output=True,
                          text=True, timeout=HANG_GUARD,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"})
    assert proc.returncode == 0, proc.stderr
    lines = said(proc.stderr)
    assert lines and all(line.startswith("WARNING ") for line in lines), lines
    assert len(set(lines)) == len(lines), lines
    assert any("cluster 7 is not among the 2 clusters" in line for line in lines), lines
    assert any(line.startswith("WARNING py.warnings: UserWarning: Glyph") for line in lines), lines


# ------------------------------------------------------------------------- files from elsewhere

def crafted(gpkg: Path, tmp: Path, config_path: str) -> None:
    """A GeoPackage whose runs row points the labels file elsewhere (as a stranger could)."""
    with sqlite3.connect(gpkg) as con:
        (config,) = con.execute("SELECT config FROM runs ORDER BY fid DESC LIMIT 1").fetchone()
        stored = json.loads(config)
        stored["labels"] = str(tmp / "planted" / "evil.labels.yaml")
        con.execute("UPDATE runs SET config = ?, config_path = ?, labels_path = ?",
                    (json.dumps(stored), config_path, stored["labels"]))
        con.execute("UPDATE clusters SET label = 'planted' WHERE cluster = 0")


def test_a_geopackage_from_elsewhere_names_no_path_that_labels_pull_uses(base: Path, tmp_path: Path, monkeypatch,
                                                                          capsys) -> None:
    config = copy_of(base, tmp_path / "pipeline")
    cfg = load_config(config)
    shared = tmp_path / "received"
    shared.mkdir()
    gpkg = shared / "small.gpkg"
    shutil.copy(cfg.output_dir / "small.gpkg", gpkg)
    before = everything(tmp_path / "pipeline")
    planted = [tmp_path / "planted"]
    # its stored config is not on this machine
    crafted(gpkg, tmp_path, str(tmp_path / "nowhere" / "small.yaml"))
    code, _, err = run_cli(monkeypatch, capsys, "labels", "pull", str(gpkg))
    one_error_line(code, err, r"the pipeline config that wrote it \(\S*nowhere/small\.yaml\) is not on this machine; "
                              r"pass --config")
    # it names a real config, whose labels file and work folder are not the ones it records
    crafted(gpkg, tmp_path, str(config))
    code, _, err = run_cli(monkeypatch, capsys, "labels", "pull", str(gpkg))
    one_error_line(code, err, r"no longer names the labels file and work folder the GeoPackage records")
    assert everything(tmp_path / "pipeline") == before and not any(p.exists() for p in planted)
    assert sorted(p.name for p in shared.iterdir()) == ["small.gpkg"]
    # the analyst says which pipeline it is: its own labels file takes the edit, nothing else is touched
    code, out, err = run_cli(monkeypatch, capsys, "labels", "pull", str(gpkg), "--config", str(config))
    assert code == 0, err
    assert yaml.safe_load(cfg.labels_path.read_text())["clusters"][0]["name"] == "planted"
    assert not any(p.exists() for p in planted)
    assert layer(gpkg, "clusters")["label"].iloc[0] == "planted" and (shared / "small.qgz").is_file()


class _Payload:
    """Pickles as a call to open(MARKER, 'w'): unpickling it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def test_a_model_file_from_elsewhere_is_refused_and_runs_nothing(base: Path, tmp_path: Path, monkeypatch,
                                                                 capsys) -> None:
    config = copy_of(base, tmp_path, training={"labels": {"source": "clusters"}})
    cfg = load_config(config)
    models = cfg.work_dir / "supervised"
    models.mkdir()
    marker = tmp_path / "code-ran"
    for name, args in (("top_model.pt", []), ("fine_tuned.pt", ["--model", "fine_tuned"])):
        torch.save({"params": _Payload(marker), "classes": ["a", "b"]}, models / name)
        code, _, err = run_cli(monkeypatch, capsys, "predict", str(config), *args)
        one_error_line(code, err, rf"{name}: not a model file of tensors and plain data \(.*\); train again")
        assert not marker.exists()
    from settlements.errors import ModelFileError
    from settlements.supervised.top_model import load_state

    checkpoint = models / "finetune_checkpoint.pt"
    torch.save([_Payload(marker)], checkpoint)
    with pytest.raises(ModelFileError, match="finetune_checkpoint.pt: not a model file"):
        load_state(checkpoint)
    assert not marker.exists()
    assert not (cfg.output_dir / "small_supervised.gpkg").exists()
