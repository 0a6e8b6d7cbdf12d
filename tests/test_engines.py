"""Inference engines: the exported network and its cache, the fidelity gate, auto's choice, torch unchanged.

Real MobileNetV2 weights (the weights package ``make venv`` installs), real tiles of Olinda (16 px Landsat
tiles at 96 px: 484 tiles) and Swellendam. Timings are never asserted: which engine ``auto`` takes
depends on the machine; that it took the fastest one the gate passed does not.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from settlements.config import GATE_ARI, GATE_COSINE, Clustering, Embedding, load_config
from settlements.embedding import choice, engines
from settlements.embedding.backbones import build_backbone, resolve_weights
from settlements.embedding.fidelity import cosines, judge
from settlements.embedding.infer import InferenceSettings, TileBlocks, TileStream, iter_embeddings
from settlements.errors import ConfigError
from settlements.export.previous import read_runs
from settlements.pipeline import run, stage_embed, stage_tile
from settlements.rasters import load_infos
from settlements.stages.embed import cache_keys, embedding_key, engine_chooser, inference_settings
from settlements.store import read_table, workspace
from settlements.tiling import WINDOW_COLUMNS

from .conftest import scene, write_pipeline

pytestmark = pytest.mark.skipif(not (engines.installed("onnxruntime") and engines.installed("openvino")),
                                reason="onnxruntime and openvino not installed (make venv installs them)")


def olinda_16px(tmp: Path, name: str, **embedding: object) -> Path:
    scene("olinda_brazil", "L7_ETMs.tif")
    return write_pipeline(tmp, name, "olinda", tiling={"tile_size": "16px"}, embedding=embedding)


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory: pytest.TempPathFactory):
    """Olinda, 16 px tiles, ``engine: torch``."""
    cfg = load_config(olinda_16px(tmp_path_factory.mktemp("torch"), "oltorch", engine="torch"))
    return cfg, run(cfg)


@pytest.fixture(scope="module")
def swellendam_inputs(swellendam_tiles) -> torch.Tensor:
    """Model inputs (96 px) of test_infer's 64 real Swellendam tiles, town and fields."""
    info, tiles = swellendam_tiles
    ds = TileBlocks(info, tiles, tiles, 96, len(tiles))
    x = ds.inputs(ds[0])
    ds.close()
    return x


def test_a_run_with_engine_torch_embeds_as_before(torch_run) -> None:
    """``engine: torch`` is the path of earlier versions: the same cache keys, and embeddings.npy byte for
    byte what the torch network computes on the same tiles through the same stream."""
    cfg, _ = torch_run
    ws = workspace(cfg)
    meta = json.loads(ws.embed_meta.read_text())
    assert (meta["engine"], meta["precision"], meta["engine_gate"], meta["engine_warning"]) == \
        ("torch", "fp32", None, None)
    infos = load_infos(ws)
    backbone = build_backbone("mobilenet_v2", allow_download=False)
    assert meta["keys"] == [embedding_key(i, cfg, backbone.weights.sha256, backbone.layer) for i in infos]
    # the torch fp32 key is the one earlier versions wrote: no engine or precision in it
    assert embedding_key(infos[0], cfg, backbone.weights.sha256, backbone.layer) == \
        embedding_key(infos[0], cfg, backbone.weights.sha256, backbone.layer, "fp32", "torch", None)
    tiles = read_table(ws.tiles, "tile")
    w = tiles[WINDOW_COLUMNS].to_numpy()
    stream = TileStream(infos, tiles["raster"].to_numpy(), w[:, :4], w[:, 4:], 96, cfg.embedding.batch_size)
    settings = InferenceSettings("cpu", "fp32", cfg.embedding.batch_size, 0)
    direct = np.concatenate([c.embeddings for c in iter_embeddings(backbone.model, stream, settings, 0.5)])
    stored = np.load(ws.embeddings)
    assert stored.shape == direct.shape == (484, 160)
    assert stored.tobytes() == direct.tobytes()
    runs = read_runs(cfg.output_dir / "oltorch.gpkg")
    assert runs is not None and runs.iloc[-1]["engine"] == "torch" and runs.iloc[-1]["precision"] == "fp32"
    assert np.isnan(runs.iloc[-1]["engine_cosine_p01"])  # the reference is not gated


def test_the_gate_refuses_int8_on_olinda_and_the_run_falls_back_to_torch_fp32(
        torch_run, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """MobileNetV2 in int8 is far from fp32 on Olinda's upsampled 28.5 m pixels (cosine near 0.8): a real
    int8 network, calibrated on the run's tiles, is refused in one warning line, and the run embeds with
    torch fp32, the same bytes as a torch run."""
    cfg = load_config(olinda_16px(tmp_path, "olint8", engine="onnxruntime", precision="int8"))
    with caplog.at_level(logging.WARNING):
        run(cfg)
    warned = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING and "fidelity gate" in r.getMessage()]
    assert len(warned) == 1 and "\n" not in warned[0]
    assert "refused onnxruntime int8" in warned[0] and "embedding with torch fp32" in warned[0]
    ws = workspace(cfg)
    meta = json.loads(ws.embed_meta.read_text())
    assert (meta["engine"], meta["precision"], meta["engine_requested"]) == ("torch", "fp32", "onnxruntime int8")
    [refused] = meta["engine_refused"]
    assert refused["passed"] is False and refused["cosine_p01"] < GATE_COSINE
    # refused on its first batch: more of its 32 tiles miss the cosine than 1 % of the 256 may
    assert refused["tiles"] == 32 and refused["cosine_share"] < 1 - 3 / 32 and np.isnan(refused["ari"])
    calibration = json.loads(next(ws.engines.glob("*/int8.json")).read_text())
    assert calibration["calibration_tiles"] == 128  # other tiles of the run than the gate's 256
    torch_cfg, _ = torch_run
    assert np.load(ws.embeddings).tobytes() == np.load(workspace(torch_cfg).embeddings).tobytes()
    runs = read_runs(cfg.output_dir / "olint8.gpkg")
    assert runs is not None
    row = runs.iloc[-1]
    assert row["engine"] == "torch" and row["precision"] == "fp32"
    # strict JSON (readers other than Python's refuse NaN): the ARI not compared is null
    gate = json.loads(row["engine_gate"], parse_constant=lambda c: pytest.fail(f"{c} in the runs table's JSON"))
    assert gate["engine_requested"] == "onnxruntime int8" and gate["engine_refused"][0]["cosine_p01"] < GATE_COSINE
    assert gate["engine_refused"][0]["ari"] is None
    assert any("fidelity gate refused" in w for w in json.loads(row["warnings"]))


def test_auto_takes_the_fastest_engine_the_gate_passes_and_remembers_the_speeds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    memory = tmp_path / "machine-cache"
    monkeypatch.setenv("SETTLEMENTS_CACHE_DIR", str(memory))
    monkeypatch.setattr(choice, "load_per_core", lambda: 0.5)  # one load throughout: nothing measured again
    cfg = load_config(olinda_16px(tmp_path, "olauto", engine="auto", engine_min_tiles=0))
    run(cfg)
    ws = workspace(cfg)
    meta = json.loads(ws.embed_meta.read_text())
    rates = meta["engine_rates"]
    assert {"torch fp32", "onnxruntime fp32", "onnxruntime int8", "openvino fp32", "openvino int8"} <= set(rates)
    chosen = f"{meta['engine']} {meta['precision']}"
    refused = {f"{r['engine']} {r['precision']}" for r in meta["engine_refused"]}
    assert all(not r["passed"] for r in meta["engine_refused"])
    # every candidate measured faster than the chosen one was refused by the gate
    assert {name for name, rate in rates.items() if rate > rates[chosen]} == refused
    if chosen != "torch fp32":
        gate = meta["engine_gate"]
        assert gate["passed"] and gate["cosine_share"] >= 0.99 and gate["ari"] >= GATE_ARI
        assert meta["keys"][0] != embedding_key(load_infos(ws)[0], cfg, meta["weights_sha256"], meta["layer"])
        assert meta["keys"] == [embedding_key(i, cfg, meta["weights_sha256"], meta["layer"], meta["precision"],
                                              meta["engine"], meta["engine_model_sha256"]) for i in load_infos(ws)]
        assert set(meta["keys"]) <= cache_keys(cfg)  # `settlements cache prune` keeps what the run used
    remembered = json.loads((memory / "engines.json").read_text())
    [entry] = remembered.values()
    assert entry["model"] == {"backbone": "mobilenet_v2", "weights_sha256": meta["weights_sha256"],
                              "layer": "features.15", "input_size": 96, "batch_size": 32}
    assert entry["machine"]["cores"] >= 1 and set(rates) <= set(entry["rates"])
    # a second pipeline on this machine and model reads the speeds, measures nothing, chooses the same
    runs = read_runs(cfg.output_dir / "olauto.gpkg")
    assert runs is not None and runs.iloc[-1]["engine"] == meta["engine"]
    if chosen != "torch fp32":
        assert runs.iloc[-1]["engine_cosine_p01"] >= 0.99 and runs.iloc[-1]["engine_ari"] >= GATE_ARI
    other = load_config(olinda_16px(tmp_path, "olauto2", engine="auto", engine_min_tiles=0))
    stage_tile(other)
    stage_embed(other)
    again = json.loads(workspace(other).embed_meta.read_text())
    assert json.loads((memory / "engines.json").read_text()) == remembered
    assert (again["engine"], again["precision"], again["engine_rates"]) == (meta["engine"], meta["precision"], rates)


def test_auto_keeps_torch_below_engine_min_tiles(torch_run, tmp_path: Path) -> None:
    cfg = load_config(olinda_16px(tmp_path, "olsmall"))  # the default: auto, 20,000 tiles
    assert cfg.embedding.engine == "auto"
    stage_tile(cfg)
    stage_embed(cfg)
    ws = workspace(cfg)
    meta = json.loads(ws.embed_meta.read_text())
    assert (meta["engine"], meta["precision"]) == ("torch", "fp32") and "engine_min_tiles" in meta["engine_reason"]
    assert not ws.engines.exists()  # nothing exported, nothing measured
    torch_cfg, _ = torch_run
    assert np.load(ws.embeddings).tobytes() == np.load(workspace(torch_cfg).embeddings).tobytes()


def test_the_export_is_rebuilt_when_the_layer_weights_or_input_size_change(tmp_path: Path, swellendam_inputs) -> None:
    root = tmp_path / "engines"
    root.mkdir()
    backbone = build_backbone("mobilenet_v2", allow_download=False)
    first = engines.export_onnx(backbone, 96, root)
    made = first.path.stat().st_mtime_ns
    assert engines.export_onnx(backbone, 96, root) == first and first.path.stat().st_mtime_ns == made  # reused
    manifest = json.loads((first.path.parent / "export.json").read_text())
    assert manifest["layer"] == "features.15" and manifest["weights_sha256"] == backbone.weights.sha256
    # what the export computes is what torch fp32 computes
    ort32 = engines.make_runner("onnxruntime", "fp32", torch.device("cpu"), path=first.path)
    ref = engines.make_runner("torch", "fp32", torch.device("cpu"), model=backbone.model)(swellendam_inputs).numpy()
    assert cosines(ref, ort32(swellendam_inputs).numpy()).min() > 0.99999

    # another layer: a new export, the old one removed
    layer13 = build_backbone("mobilenet_v2", "features.13", allow_download=False)
    second = engines.export_onnx(layer13, 96, root)
    assert second.path.parent != first.path.parent and not first.path.exists()
    assert json.loads((second.path.parent / "export.json").read_text())["layer"] == "features.13"
    assert engines.make_runner("openvino", "fp32", torch.device("cpu"), path=second.path)(swellendam_inputs).shape \
        == (len(swellendam_inputs), 96)

    # other weights (the real ones, one convolution changed): a new export computing the new network
    state = torch.load(resolve_weights("mobilenet_v2", allow_download=False).path, weights_only=True)
    state["features.14.conv.0.0.weight"] = state["features.14.conv.0.0.weight"] * 1.5
    torch.save(state, tmp_path / "tuned.pth")
    tuned = build_backbone("mobilenet_v2", weights=tmp_path / "tuned.pth", allow_download=False)
    third = engines.export_onnx(tuned, 96, root)
    assert third.path.parent not in (first.path.parent, second.path.parent) and third.sha256 != first.sha256
    tuned_ref = engines.make_runner("torch", "fp32", torch.device("cpu"), model=tuned.model)(swellendam_inputs).numpy()
    tuned_ort = engines.make_runner("onnxruntime", "fp32", torch.device("cpu"), path=third.path)(swellendam_inputs)
    assert cosines(tuned_ref, tuned_ort.numpy()).min() > 0.99999 and cosines(ref, tuned_ref).min() < 0.9999

    # another input size: a new export
    assert engines.export_onnx(tuned, 64, root).path.parent != third.path.parent

    # a damaged export (its bytes no longer those the manifest hashed) is rebuilt, never run
    again = engines.export_onnx(tuned, 96, root)
    data = bytearray(again.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    again.path.write_bytes(bytes(data))
    rebuilt = engines.export_onnx(tuned, 96, root)
    assert rebuilt.sha256 == engines.sha256_file(rebuilt.path) and rebuilt.path.read_bytes() != bytes(data)


def test_the_gate_judges_real_embeddings(torch_run) -> None:
    cfg, _ = torch_run
    ref = np.load(workspace(cfg).embeddings)
    clustering = Clustering()
    same = judge("onnxruntime", "fp32", ref, ref.copy(), clustering)
    assert same.passed and same.cosine_p01 == pytest.approx(1.0) and same.ari == 1.0
    rng = np.random.default_rng(0)
    noisy = ref + rng.normal(0, 1, ref.shape).astype(np.float32) * np.linalg.norm(ref, axis=1, keepdims=True) * 0.05
    refused = judge("onnxruntime", "int8", ref, noisy, clustering)
    assert not refused.passed and refused.cosine_p01 < GATE_COSINE
    broken = ref.copy()
    broken[3] = np.nan
    assert not judge("openvino", "int8", ref, broken, clustering).passed


def test_precision_must_be_one_the_engine_offers(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"precision: torch offers fp32, fp16, bf16 \(or auto\), got 'int8'"):
        load_config(olinda_16px(tmp_path, "bad", engine="torch", precision="int8"))
    with pytest.raises(ConfigError, match="embedding.engine"):
        load_config(olinda_16px(tmp_path, "bad2", engine="tensorflow"))
    assert Embedding(engine="openvino", precision="bf16").precision == "bf16"
    assert os.environ.get("SETTLEMENTS_CACHE_DIR")  # the suite never writes the user's own cache


def test_a_damaged_memory_of_speeds_is_measured_over(torch_run, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine's memory is a cache, not instructions: a file that is not JSON, or an entry of the wrong
    shape, is measured over (and written back whole), never a crash or a speed taken on trust."""
    monkeypatch.setenv("SETTLEMENTS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(choice, "load_per_core", lambda: 0.5)  # one load throughout
    memory = tmp_path / "engines.json"
    memory.write_text('{"x": [1, 2], ')
    cfg, _ = torch_run
    ws = workspace(cfg)
    backbone = build_backbone("mobilenet_v2", allow_download=False)
    chooser = engine_chooser(cfg, ws, backbone, load_infos(ws), read_table(ws.tiles, "tile"), inference_settings(cfg))
    pairs = [("torch", "fp32"), ("onnxruntime", "fp32")]
    rates = chooser.rates(pairs)
    assert set(rates) == {"torch fp32", "onnxruntime fp32"} and min(rates.values()) > 0
    remembered = json.loads(memory.read_text())
    [key] = remembered
    assert chooser.rates(pairs) == pytest.approx({k: remembered[key]["rates"][k] for k in rates})  # read back
    remembered[key]["rates"] = {"torch fp32": "fast", "onnxruntime fp32": -1}
    memory.write_text(json.dumps(remembered))
    again = chooser.rates(pairs)
    assert min(again.values()) > 0 and json.loads(memory.read_text())[key]["rates"]["torch fp32"] == again["torch fp32"]


def test_openvino_leaves_the_threads_signal_stack_as_it_was(tmp_path: Path, swellendam_inputs) -> None:
    """OpenVINO swaps the main thread's alternate signal stack for one of its own that it may free: the next
    signal handled there (SIGCHLD of a DataLoader worker) then killed the whole run with SIGSEGV."""
    import ctypes

    libc = ctypes.CDLL(None)

    def signal_stack() -> tuple[int, int]:
        now = engines._SignalStack()
        assert libc.sigaltstack(None, ctypes.byref(now)) == 0
        return now.ss_sp or 0, now.ss_size

    exported = engines.export_onnx(build_backbone("mobilenet_v2", allow_download=False), 96, tmp_path)
    before = signal_stack()
    runner = engines.make_runner("openvino", "fp32", torch.device("cpu"), path=exported.path)
    runner(swellendam_inputs)
    assert signal_stack() == before


def test_speeds_remembered_from_a_busy_machine_are_measured_again_once_it_is_quieter(
        torch_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiles/s taken under load rank engines by how they share the cores: such a memory is measured over when
    the machine is quieter than it was then, and kept while it is as busy."""
    monkeypatch.setenv("SETTLEMENTS_CACHE_DIR", str(tmp_path))
    memory = tmp_path / "engines.json"
    cfg, _ = torch_run
    ws = workspace(cfg)
    backbone = build_backbone("mobilenet_v2", allow_download=False)
    chooser = engine_chooser(cfg, ws, backbone, load_infos(ws), read_table(ws.tiles, "tile"), inference_settings(cfg))
    pairs = [("torch", "fp32"), ("onnxruntime", "fp32")]
    monkeypatch.setattr(choice, "load_per_core", lambda: 4.0)
    chooser.rates(pairs)
    remembered = json.loads(memory.read_text())
    [key] = remembered
    assert remembered[key]["load_per_core"] == 4.0
    planted = {"torch fp32": 1.0, "onnxruntime fp32": 2.0}
    remembered[key]["rates"] = planted
    memory.write_text(json.dumps(remembered))
    monkeypatch.setattr(choice, "load_per_core", lambda: 5.0)  # as busy as then, or busier: kept
    assert chooser.rates(pairs) == planted
    monkeypatch.setattr(choice, "load_per_core", lambda: 0.3)  # quieter: measured again, remembered at 0.3
    again = chooser.rates(pairs)
    assert again != planted and min(again.values()) > 0
    entry = json.loads(memory.read_text())[key]
    assert entry["load_per_core"] == 0.3 and entry["rates"] == pytest.approx(again)
    del entry["load_per_core"]  # a memory from before loads were recorded: measured again
    entry["rates"] = planted
    memory.write_text(json.dumps({key: entry}))
    assert chooser.rates(pairs) != planted
    assert json.loads(memory.read_text())[key]["load_per_core"] == 0.3
