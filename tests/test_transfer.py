"""Train once, map anywhere: a model exported from one pipeline, applied by another, with one legend.

On real imagery, small: two pipelines of four hand-labelled Mumbai patches each (100 m tiles, a 32 px CNN
input, k=3: 36 tiles each). The first's clusters are named by their majority mask class (the script in
:func:`tests.mumbai.name_by_majority`), a top model and a fine-tuned network trained on its masks, and its
model exported; the second takes the model's clusters (``clustering: {model: FILE}``) and its network
(``training: {model: FILE}``). Then: the same columns, colours and codes in both; the runs table's record
of the model; a model applied twice; a changed model file; every mismatch; crafted model files; and
``compare``.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import shutil
import sqlite3
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pyogrio
import pytest
import rasterio
import torch
import yaml
from rasterio.enums import Resampling

from settlements.config import load_config
from settlements.embedding.backbones import resolve_weights
from settlements.model_file import read_model_file, write_model_file
from settlements.pipeline import export_model, predict, run, train
from settlements.reprocess import up_to_date
from settlements.store import workspace

from .conftest import run_cli, scene
from .mumbai import name_by_majority, reference_labels
from .test_safe_commands import one_error_line
from .test_safe_products import category_colours, default_style

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

FIRST = ["tile_1.0", "tile_1.26", "tile_1.11", "tile_1.3"]
SECOND = ["tile_5.5", "tile_1.27", "tile_1.12", "tile_4.26"]


def pipeline(folder: Path, name: str, patches: list[str], **sections: object) -> Path:
    """A pipeline over ``patches`` of mumbai_train (their polygons as regions), 100 m tiles, 32 px CNN input."""
    data = scene("mumbai_train")
    raster = {"bands": [1, 2, 3], **sections.pop("raster", {})}  # type: ignore[dict-item]
    embedding = {"input_size": 32, "num_workers": 0, **sections.pop("embedding", {})}  # type: ignore[dict-item]
    config = {
        "name": name, "rasters": [{**raster, "path": str(data / "patches" / f"{p}_image.tif")} for p in patches],
        "regions": {"path": str(data / "patches.gpkg"), "id_field": "patch",
                    "where": "patch IN (" + ", ".join(f"'{p}'" for p in patches) + ")"},
        "tiling": {"tile_size": "100m"}, "embedding": embedding,
        "output": {"dir": str(folder / "outputs" / name), "work_dir": str(folder / "work" / name)}, **sections}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class Transfer:
    folder: Path
    first: Path  # its config
    second: Path
    model: Path
    names: dict[int, str]


@pytest.fixture(scope="module")
def transfer(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Transfer:
    """The first pipeline run, named by its masks, trained (top model, one epoch of fine tuning), exported; the
    second run on the model's clusters and predicted with its fine-tuned network."""
    folder = tmp_path_factory.mktemp("transfer")
    reference = reference_labels(scene("mumbai_train", "patches"))
    first = pipeline(folder, "first", FIRST, clustering={"k": 3},
                     training={"labels": reference, "finetune": {"enabled": True, "epochs": 1, "patience": 1},
                               "evaluation": {"enabled": False, "block_tiles": 1}})
    cfg = load_config(first)
    run(cfg)
    names = name_by_majority(cfg, reference)
    run(cfg)
    train(cfg)
    predict(cfg, "auto")
    model = folder / "shared" / "mumbai.model.npz"
    export_model(cfg, model)
    second = pipeline(folder, "second", SECOND, clustering={"model": str(model)}, training={"model": str(model)})
    run(load_config(second))
    predict(load_config(second), "auto")
    return Transfer(folder, first, second, model, names)


def gpkg(config: Path, supervised: bool = False) -> Path:
    cfg = load_config(config)
    return cfg.output_dir / f"{cfg.name}{'_supervised' if supervised else ''}.gpkg"


def table(config: Path, layer: str, supervised: bool = False) -> pd.DataFrame:
    return pyogrio.read_dataframe(gpkg(config, supervised), layer=layer)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def last_run(config: Path) -> pd.Series:
    return table(config, "runs").iloc[-1]


# ------------------------------------------------------------------------------ the model travels

def test_the_second_pipeline_takes_the_models_clusters_names_and_colours_without_fitting(transfer: Transfer,
                                                                                     monkeypatch, capsys) -> None:
    first, second = load_config(transfer.first), load_config(transfer.second)
    assert set(transfer.names.values()) >= {"informal", "not built up"}  # named by the masks
    assert second.clustering.k == 3 and second.clustering.neighbour_weight == first.clustering.neighbour_weight
    meta = json.loads(workspace(second).cluster_meta.read_text())
    assert meta["fit_key"] is None and meta["restarts"] is None  # no k-means fit
    assert meta["model"]["sha256"] == sha(transfer.model)
    with np.load(workspace(second).clusters) as z, np.load(workspace(first).clusters) as y:
        assert np.array_equal(z["cluster_centers"], y["cluster_centers"])
    a, b = table(transfer.first, "clusters"), table(transfer.second, "clusters")
    assert a["label"].tolist() == b["label"].tolist() == [transfer.names[i] for i in range(3)]
    assert a["colour"].tolist() == b["colour"].tolist()
    labels = yaml.safe_load(second.labels_path.read_text())["clusters"]  # starts from the model's, colours too
    assert [(e["name"], e["colour"]) for e in labels.values()] == list(zip(a["label"], a["colour"], strict=True))
    code, out, err = run_cli(monkeypatch, capsys, "validate", str(transfer.second))
    assert code == 0 and f"model: {transfer.model}: SHA-256 {sha(transfer.model)[:12]}..., made from" in out, err
    code, out, err = run_cli(monkeypatch, capsys, "model", "show", str(transfer.model))
    assert code == 0 and "mobilenet_v2 cut at features.15 (160-d), input 32 px" in out
    assert "top model: classes formal, informal, not built up" in out and "fine tuned" in out


def test_both_pipelines_write_one_legend_columns_colours_and_codes(transfer: Transfer) -> None:
    """regions, histogram, predicted_regions and changes: the same label columns in the same order; the same
    colours in every style and the same codes and colours in both COGs; the layers concatenate as they are."""
    for layer, supervised in (("regions", False), ("changes", False), ("predicted_regions", True)):
        a, b = table(transfer.first, layer, supervised), table(transfer.second, layer, supervised)
        assert list(a.columns) == list(b.columns), layer
        both = pd.concat([a, b], ignore_index=True)
        assert list(both.columns) == list(a.columns) and len(both) == len(a) + len(b), layer
        numbers = [c for c in a.columns if c.startswith(("n_", "frac_", "km2_", "dfrac_", "dkm2_"))]
        assert numbers and all(pd.api.types.is_numeric_dtype(both[c]) for c in numbers), layer
    hist = [table(c, "histogram") for c in (transfer.first, transfer.second)]
    labels = [h[h["kind"] == "label"].drop_duplicates("class")["class"].tolist() for h in hist]
    assert labels[0] == labels[1] and set(transfer.names.values()) <= set(labels[0])
    for layer, supervised in (("regions", False), ("tiles", False), ("predicted_regions", True),
                              ("predicted_tiles", True)):
        styles = [default_style(gpkg(c, supervised), layer) for c in (transfer.first, transfer.second)]
        assert category_colours(styles[0]) == category_colours(styles[1]) != {}, layer
    for suffix in ("_labels.tif", "_predicted.tif"):
        tables = []
        for config in (transfer.first, transfer.second):
            cfg = load_config(config)
            path = cfg.output_dir / f"{cfg.name}{suffix}"
            rat = ET.parse(f"{path}.aux.xml").getroot().find(".//GDALRasterAttributeTable")
            with rasterio.open(path) as src:
                colours = src.colormap(1)
            tables.append({int(r.findall("F")[0].text): (r.findall("F")[1].text, colours[int(r.findall("F")[0].text)])
                           for r in rat.findall("Row")})
        assert tables[0] == tables[1] and len(tables[0]) >= 2, suffix


def test_the_runs_table_records_the_model_file_by_sha256(transfer: Transfer) -> None:
    row = last_run(transfer.second)
    assert row["model_sha256"] == sha(transfer.model) and row["model_file"] == str(transfer.model)
    assert last_run(transfer.first)["model_sha256"] == ""
    prediction = table(transfer.second, "prediction", supervised=True).iloc[0]
    assert prediction["model"] == "fine_tuned" and prediction["model_sha256"] == sha(transfer.model)


def test_a_model_applied_twice_gives_identical_outputs(transfer: Transfer, tmp_path: Path) -> None:
    again = pipeline(tmp_path, "second", SECOND, clustering={"model": str(transfer.model)},
                     training={"model": str(transfer.model)})
    run(load_config(again))
    predict(load_config(again), "auto")
    for layer, supervised in (("tiles", False), ("regions", False), ("histogram", False), ("clusters", False),
                              ("predicted_tiles", True), ("predicted_regions", True)):
        a, b = table(transfer.second, layer, supervised), table(again, layer, supervised)
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=layer)
    for suffix in ("_labels.tif", "_predicted.tif"):
        with rasterio.open(load_config(transfer.second).output_dir / f"second{suffix}") as x, \
                rasterio.open(load_config(again).output_dir / f"second{suffix}") as y:
            assert np.array_equal(x.read(), y.read())


def model_renamed(source: Path, target: Path, cluster: int, name: str) -> None:
    """What the first pipeline's analyst does: rename a cluster and export the model again."""
    m = read_model_file(source)
    header = {k: v for k, v in m.header.items() if k not in ("format", "format_version")}
    header["clusters"]["items"][cluster]["name"] = name
    write_model_file(target, header, m.arrays)


def test_the_labels_stay_editable_and_a_changed_model_file_is_reprocessed(transfer: Transfer, tmp_path: Path,
                                                                          monkeypatch, capsys) -> None:
    model = tmp_path / "model.npz"
    shutil.copy(transfer.model, model)
    config = pipeline(tmp_path, "third", SECOND, clustering={"model": str(model)})
    cfg = load_config(config)
    run(cfg)
    assert up_to_date(cfg)
    labels = yaml.safe_load(cfg.labels_path.read_text())
    labels["clusters"][0]["name"] = "my own name"  # the analyst's edit
    cfg.labels_path.write_text(yaml.safe_dump(labels, sort_keys=False))
    run(cfg)
    assert table(config, "clusters")["label"][0] == "my own name"
    model_renamed(transfer.model, model, 1, "renamed at the source")  # a new model file, same clusters
    assert not up_to_date(cfg)
    code, _, err = run_cli(monkeypatch, capsys, "run", str(config))
    assert code == 0, err
    names = table(config, "clusters")["label"].tolist()
    assert names == ["my own name", "renamed at the source", transfer.names[2]]  # the edit stays, the rename travels
    assert last_run(config)["model_sha256"] == sha(model)
    # its legend is its own now: compare refuses, saying which labels differ
    code, _, err = run_cli(monkeypatch, capsys, "compare", str(transfer.first), str(config), "-o",
                           str(tmp_path / "both.gpkg"))
    one_error_line(code, err, r"pipelines first and third have different legends: labels only in first: .*; labels "
                              r"only in third: 'my own name', 'renamed at the source'")
    assert not (tmp_path / "both.gpkg").exists()


# ------------------------------------------------------------------------------------ mismatches

def perturbed_weights(target: Path) -> Path:
    state = torch.load(resolve_weights("mobilenet_v2", allow_download=False).path, map_location="cpu",
                       weights_only=True)
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key] + 1e-3
    torch.save(state, target)
    return target


MISMATCHES = {
    "backbone": ({"embedding": {"backbone": "resnet18"}}, r"embedding\.backbone: resnet18 here, mobilenet_v2 in the "
                                                         r"model"),
    "layer": ({"embedding": {"layer": "features.14"}}, r"embedding\.layer: features\.14 here, features\.15 in the "
                                                       r"model"),
    "input size": ({"embedding": {"input_size": 48}}, r"embedding\.input_size: 48 here, 32 in the model"),
    "band count": ({"raster": {"bands": [2]}}, r"rasters\.bands: 1 band\(s\) here, 3 in the model"),
    "weights file": ({"embedding": {"weights": "perturbed.pth"}},
                     r"embedding\.weights: SHA-256 [0-9a-f]{12}\.\.\. here, [0-9a-f]{12}\.\.\. in the model"),
    "k beside the model": ({"clustering": {"k": 5}}, r"clustering\.k: 5 here, 3 in the model"),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_a_model_made_from_other_embeddings_is_one_error_naming_both_values(transfer: Transfer, tmp_path: Path,
                                                                            monkeypatch, capsys, case: str) -> None:
    sections, pattern = MISMATCHES[case]
    sections = json.loads(json.dumps(sections))
    if case == "weights file":
        sections["embedding"]["weights"] = str(perturbed_weights(tmp_path / "perturbed.pth"))
    sections["clustering"] = {"model": str(transfer.model), **sections.get("clustering", {})}
    config = pipeline(tmp_path, "other", SECOND[:1], **sections)
    code, _, err = run_cli(monkeypatch, capsys, "validate", str(config))
    one_error_line(code, err, pattern)
    code, _, err = run_cli(monkeypatch, capsys, "run", str(config))
    one_error_line(code, err, pattern)
    assert not (tmp_path / "outputs" / "other" / "other.gpkg").exists()
    assert not list((tmp_path / "work" / "other").glob("*.npy"))  # stopped before any CNN work


@pytest.fixture(scope="module")
def own_clusters(transfer: Transfer) -> Path:
    """A pipeline that fits and names nothing of the model: its own k-means, at another CNN input size."""
    config = pipeline(transfer.folder, "own", SECOND[:2], clustering={"k": 2}, embedding={"input_size": 48})
    run(load_config(config))
    return config


def test_predicting_with_a_model_of_other_embeddings_is_one_error(transfer: Transfer, own_clusters: Path,
                                                                  monkeypatch, capsys) -> None:
    code, _, err = run_cli(monkeypatch, capsys, "predict", str(own_clusters), "--model", str(transfer.model))
    one_error_line(code, err, r"embedding\.input_size: 48 here, 32 in the model")
    assert not gpkg(own_clusters, supervised=True).exists()
    code, _, err = run_cli(monkeypatch, capsys, "predict", str(own_clusters), "--model", "top-model")
    one_error_line(code, err, r"--model: expected auto, top_model, fine_tuned or a model file, got 'top-model'")
    code, _, err = run_cli(monkeypatch, capsys, "train", str(transfer.second))
    one_error_line(code, err, r"training\.model: the supervised model comes from .*nothing to train here")


def coarser_patch(source: Path, target: Path) -> Path:
    """The patch at 1 m pixels (averaged), in a file of its own: imagery the model was not made on."""
    with rasterio.open(source) as src:
        profile = {k: v for k, v in src.profile.items() if k not in ("blockxsize", "blockysize", "tiled")}
        data = src.read(out_shape=(src.count, src.height // 2, src.width // 2), resampling=Resampling.average)
        profile.update(width=src.width // 2, height=src.height // 2, transform=src.transform @ src.transform.scale(2))
    with rasterio.open(target, "w", **profile) as dst:
        dst.write(data)
    return target


def test_another_pixel_size_or_scaling_is_one_warning_line_recorded_in_the_runs_table(transfer: Transfer,
                                                                                      tmp_path: Path, monkeypatch,
                                                                                      capsys, caplog) -> None:
    coarse = coarser_patch(scene("mumbai_train", "patches", f"{SECOND[0]}_image.tif"), tmp_path / "coarse.tif")
    config = pipeline(tmp_path, "coarse", SECOND[:1], clustering={"model": str(transfer.model)},
                      raster={"scaling": {"method": "dtype"}})
    data = yaml.safe_load(config.read_text())
    data["rasters"][0]["path"] = str(coarse)
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    code, out, err = run_cli(monkeypatch, capsys, "validate", str(config))
    assert code == 0 and re.search(r"warning: .*pixels of (1|0\.99\d*) m here, 0\.5 m in the model", out), (out, err)
    code, _, err = run_cli(monkeypatch, capsys, "run", str(config))
    assert code == 0, err
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "in the model" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    pixels = r"pixels of (1|0\.99\d*) m here, 0\.5 m in the model"
    assert re.search(pixels, lines[0]) and "scaling dtype here, percentile 2-98 in the model" in lines[0]
    assert "tiles of" not in lines[0]  # 100 m tiles in both
    recorded = json.loads(last_run(config)["model_warnings"])
    assert any(re.search(pixels, w) for w in recorded)


# ------------------------------------------------------------------------------ files from elsewhere

class _Payload:
    """Unpickled, it creates ``marker``: what a crafted file would do to whoever loads it with pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def crafted_files(folder: Path, model: Path, marker: Path) -> dict[str, Path]:
    folder.mkdir()
    files = {"pickle": folder / "pickle.npz", "torch checkpoint": folder / "checkpoint.npz",
             "object array": folder / "object_array.npz", "header of other types": folder / "header.npz"}
    files["pickle"].write_bytes(pickle.dumps(_Payload(marker)))
    torch.save({"clusters": _Payload(marker)}, files["torch checkpoint"])
    # a real model whose centroids are swapped for a pickled object
    with zipfile.ZipFile(model) as src, zipfile.ZipFile(files["object array"], "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "clusters.centroids.npy":
                buf = io.BytesIO()
                np.save(buf, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
                data = buf.getvalue()
            dst.writestr(info, data)
    real = read_model_file(model)  # arrays as they are, a header field of another type
    header = {k: v for k, v in real.header.items() if k not in ("format", "format_version")}
    header["imagery"]["pixel_size_m"] = "half a metre"
    write_model_file(files["header of other types"], header, real.arrays)
    return files


def test_a_crafted_model_file_is_refused_with_one_line_and_runs_nothing(transfer: Transfer, tmp_path: Path,
                                                                        monkeypatch, capsys) -> None:
    marker = tmp_path / "code-ran"
    control = tmp_path / "control-ran"
    pickle.loads(pickle.dumps(_Payload(control)))  # the payload is real: unpickled, it makes its file
    assert control.exists()
    before = {p: sha(p) for p in gpkg(transfer.second).parent.iterdir() if p.is_file()}
    for kind, path in crafted_files(tmp_path / "crafted", transfer.model, marker).items():
        why = {"pickle": "a Python pickle, which is never unpickled",
               "torch checkpoint": r"member '.*data.pkl' is neither model.json nor an array",
               "object array": r"array 'clusters.centroids': Object arrays cannot be loaded",
               "header of other types": r"imagery.pixel_size_m: Input should be a valid number"}[kind]
        pattern = rf"{path.name}: not a settlements model file \({why}.*\); nothing in it was used"
        code, _, err = run_cli(monkeypatch, capsys, "model", "show", str(path))
        one_error_line(code, err, pattern)
        code, _, err = run_cli(monkeypatch, capsys, "predict", str(transfer.second), "--model", str(path))
        one_error_line(code, err, pattern)
        config = pipeline(tmp_path, f"crafted_{kind.replace(' ', '_')}", SECOND[:1], clustering={"model": str(path)})
        code, _, err = run_cli(monkeypatch, capsys, "run", str(config))
        one_error_line(code, err, pattern)
        assert not marker.exists(), kind
    assert {p: sha(p) for p in gpkg(transfer.second).parent.iterdir() if p.is_file()} == before


def test_model_export_writes_only_model_files(transfer: Transfer, tmp_path: Path, monkeypatch, capsys) -> None:
    notes = tmp_path / "notes.npz"
    notes.write_text("an analyst's file")
    for target, pattern in ((notes, "exists and is not a settlements model file; nothing was replaced"),
                            (gpkg(transfer.first), "the pipeline's GeoPackage"),
                            (transfer.first, "the pipeline's config")):
        before = sha(target)
        code, _, err = run_cli(monkeypatch, capsys, "model", "export", str(transfer.first), "-o", str(target))
        one_error_line(code, err, pattern)
        assert sha(target) == before
    code, out, err = run_cli(monkeypatch, capsys, "model", "export", str(transfer.first), "-o", str(transfer.model))
    assert code == 0, err
    assert sha(transfer.model) in out and "k=3 clusters (3 named)" in out  # the same model makes the same bytes


# ----------------------------------------------------------------------------------------- compare

def test_compare_writes_every_pipelines_regions_and_their_shares_side_by_side(transfer: Transfer, tmp_path: Path,
                                                                               monkeypatch, capsys) -> None:
    target = tmp_path / "cities.gpkg"
    code, out, err = run_cli(monkeypatch, capsys, "compare", str(transfer.first), str(transfer.second), "-o",
                             str(target))
    assert code == 0, err
    regions = pyogrio.read_dataframe(target, layer="regions")
    a, b = table(transfer.first, "regions"), table(transfer.second, "regions")
    assert list(regions.columns) == ["pipeline", *a.columns]
    assert regions["pipeline"].tolist() == ["first"] * len(a) + ["second"] * len(b)
    assert sorted(regions["region_id"]) == sorted(FIRST + SECOND)
    shares = pyogrio.read_dataframe(target, layer="pipelines")
    fracs = shares[[c for c in shares.columns if c.startswith("frac_")]]
    assert np.allclose(fracs.sum(axis=1), 1.0) and shares["model_sha256"].tolist() == ["", sha(transfer.model)]
    assert category_colours(default_style(target, "regions")) == category_colours(default_style(gpkg(transfer.first),
                                                                                               "regions"))
    picture = matplotlib.image.imread(tmp_path / "cities_shares.png")
    assert picture.shape[0] > 300 and picture.shape[1] > 400
    assert f"{len(a) + len(b)} regions of first, second" in out


def test_compare_refuses_pipelines_of_different_legends(transfer: Transfer, own_clusters: Path, tmp_path: Path,
                                                        monkeypatch, capsys) -> None:
    target = tmp_path / "cities.gpkg"
    code, _, err = run_cli(monkeypatch, capsys, "compare", str(transfer.first), str(own_clusters), "-o", str(target))
    one_error_line(code, err, r"pipelines first and own have different legends: labels only in first: .*'informal'.*"
                              r"labels only in own: 'cluster 0', 'cluster 1'")
    assert not target.exists() and not (tmp_path / "cities_shares.png").exists()
    with sqlite3.connect(tmp_path / "other.gpkg") as con:  # a GeoPackage of someone else's is never replaced
        con.execute("CREATE TABLE notes (x)")
    code, _, err = run_cli(monkeypatch, capsys, "compare", str(transfer.first), str(transfer.second), "-o",
                           str(tmp_path / "other.gpkg"))
    one_error_line(code, err, "exists and is not a GeoPackage `settlements compare` wrote")
