"""Fast inference path and streaming assembly, checked against plain references on real tiles."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import torch
from rasterio.windows import Window

from settlements import executors
from settlements.config import RasterInput, load_config
from settlements.embedding.assemble import embedded_table, write_embeddings
from settlements.embedding.backbones import build_backbone
from settlements.embedding.cache import EmbeddingCache, NpyRows
from settlements.embedding.infer import (
    BLOCK_OVERREAD,
    BatchRing,
    InferenceSettings,
    ModelInput,
    TileBatch,
    TileBlocks,
    TilePart,
    TileStream,
    block_runs,
    embed_batch,
    iter_batches,
    iter_embeddings,
    keep_freed_memory,
    prepare_model,
    to_model_input,
    wire_dtype,
)
from settlements.pipeline import stage_embed, stage_tile
from settlements.rasters import RasterInfo, compute_scaling, inspect_raster, read_tile, scale_pixels
from settlements.store import workspace
from settlements.tiling import WINDOW_COLUMNS

from .conftest import scene, write_pipeline


@pytest.fixture(scope="module")
def mobilenet():
    return build_backbone("mobilenet_v2", allow_download=False)


def test_block_reads_give_the_same_pixels_as_one_read_per_tile(swellendam_tiles) -> None:
    info, tiles = swellendam_tiles
    ds = TileBlocks(info, tiles, tiles, 64, batch_size=40)
    got = torch.cat([ds.inputs(ds[i]) for i in range(len(ds))])
    with rasterio.open(info.path) as src:
        ref = torch.stack([to_model_input(read_tile(src, info, Window(*map(int, t)))[0], 64) for t in tiles])
    ds.close()
    assert got.shape == (len(tiles), 3, 64, 64)
    assert torch.equal(got, ref)  # the block path computes exactly what the per-tile path does


@pytest.fixture(scope="module")
def fp32_reference(swellendam_tiles, mobilenet) -> np.ndarray:
    """The plain path: one read per tile, fp32 forward in the default memory format."""
    info, tiles = swellendam_tiles
    model = mobilenet.model.to(memory_format=torch.contiguous_format)
    with rasterio.open(info.path) as src, torch.inference_mode():
        x = torch.stack([to_model_input(read_tile(src, info, Window(*map(int, t)))[0], 96) for t in tiles])
        return model(x).numpy()


@pytest.mark.parametrize("precision", ["fp16", "auto"])
def test_fast_path_is_faithful_to_fp32(swellendam_tiles, mobilenet, fp32_reference, precision: str) -> None:
    info, tiles = swellendam_tiles
    settings = InferenceSettings("cpu", precision, batch_size=32, num_workers=1)
    ds = TileBlocks(info, tiles, tiles, 96, settings.batch_size)
    fast = np.concatenate([c.embeddings for c in iter_embeddings(mobilenet.model, ds, settings, 0.0)])
    ref = fp32_reference
    cos = (fast * ref).sum(1) / np.linalg.norm(fast, axis=1) / np.linalg.norm(ref, axis=1)
    print(f"{precision}: cosine to fp32 min {cos.min():.5f} mean {cos.mean():.5f}")
    assert cos.min() >= 0.999
    assert np.abs(fast - ref).max() > 0 or settings.precision_name(torch.device("cpu")) == "fp32"


def _in_memory(tiles: pd.DataFrame, keys: list[str], cache: EmbeddingCache, dim: int, min_valid: float) -> np.ndarray:
    """The reference: every shard loaded whole, merged by window, concatenated."""
    parts = []
    for r, key in enumerate(keys):
        cached, emb = cache.load(key, dim)
        cached = cached.assign(_row=np.arange(len(cached)))
        merged = tiles[tiles["raster"] == r][WINDOW_COLUMNS].merge(cached, on=WINDOW_COLUMNS, how="left")
        vec = emb[merged["_row"].to_numpy()]
        parts.append(vec[(merged["valid_tile"].to_numpy() >= min_valid - 1e-9) & ~np.isnan(vec[:, 0])])
    return np.concatenate(parts)


def test_streaming_assembly_equals_the_in_memory_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scene("kampala_oam")
    cfg = load_config(write_pipeline(tmp_path, "kampala", "kampala",
                                     embedding={"input_size": 32, "batch_size": 8, "num_workers": 0}))
    monkeypatch.setattr(executors, "CHUNK_TILES", 20)  # many small chunks per raster
    stage_tile(cfg)
    stage_embed(cfg)
    ws = workspace(cfg)
    meta_json = __import__("json").loads(ws.embed_meta.read_text())
    keys, dim = meta_json["keys"], meta_json["dim"]  # 160: MobileNetV2's default cut, features.15
    # drop the first chunk of the first raster: the rerun re-embeds its tiles into a newer chunk, so rows
    # now come from chunks out of tile order
    first = sorted(EmbeddingCache(ws.cache).shard(keys[0]).glob("chunk-*.npz"))[0]
    first.unlink()
    counts = stage_embed(cfg)
    assert 0 < counts["tiles_embedded"] <= 24
    tiles = pd.read_parquet(ws.tiles)
    cache = EmbeddingCache(ws.cache)
    min_valid = 1 - cfg.tiling.max_invalid_fraction
    ref = _in_memory(tiles, keys, cache, dim, min_valid)
    assert np.array_equal(np.load(ws.embeddings), ref)
    meta, source = embedded_table(tiles, keys, cache, min_valid)
    out = tmp_path / "small-blocks.npy"
    write_embeddings(out, source, keys, cache, dim, block_rows=37, open_chunks=1)
    assert np.array_equal(np.load(out), ref)
    rows = NpyRows(out)
    pick = np.array([5, 3, 4, 100, len(ref) - 1])
    assert np.array_equal(rows[pick], ref[pick]) and np.array_equal(rows[10:50], ref[10:50])


# --------------------------------------------------------------------------- the input pipeline

def test_block_runs_bound_the_overread_and_cover_every_tile() -> None:
    # a batch of 14 across two tile rows of a 40-tile-wide raster: the wrap starts a new run
    cols, rows = np.meshgrid(np.arange(40) * 32, np.arange(2) * 32)
    tiles = np.stack([cols.ravel(), rows.ravel(), np.full(80, 32), np.full(80, 32)], axis=1)[35:49]
    runs = block_runs(tiles)
    assert runs == [(0, 5), (5, 14)]
    c10, r10 = np.meshgrid(np.arange(10) * 32, np.arange(2) * 32)
    narrow = np.stack([c10.ravel(), r10.ravel(), np.full(20, 32), np.full(20, 32)], axis=1)[3:17]
    assert block_runs(narrow) == [(0, 14)]  # on a narrow raster two rows are one window: 20 tile areas for 14
    for s, e in runs:
        run = tiles[s:e]
        box = ((run[:, 0] + run[:, 2]).max() - run[:, 0].min()) * ((run[:, 1] + run[:, 3]).max() - run[:, 1].min())
        assert box <= BLOCK_OVERREAD * (run[:, 2] * run[:, 3]).sum()
    # scattered tiles are read one by one
    assert block_runs(np.array([[0, 0, 8, 8], [500, 0, 8, 8], [0, 500, 8, 8]])) == [(0, 1), (1, 2), (2, 3)]


def _info(low: list[float], high: list[float], dtype: str) -> RasterInfo:
    return RasterInfo(path=Path("x.tif"), crs_wkt="", transform=(1, 0, 0, 0, -1, 0), width=64, height=64,
                      dtype=dtype, bands=tuple(range(1, len(low) + 1)), nodata=None, pixel_w_m=1, pixel_h_m=1,
                      fingerprint="", scale_low=tuple(low), scale_high=tuple(high))


@pytest.mark.parametrize(("dtype", "low", "high"), [
    ("uint8", [0, 0, 0], [255, 255, 255]),
    ("uint8", [12.5, 3, 40], [200, 180.25, 240]),  # percentile stretch: values clip at both ends
    ("uint16", [100, 200, 300], [4000, 3500, 3000]),
    ("int16", [-500, -400, -300], [3000, 2000, 1000]),
    ("float32", [0.01, 0.02, 0.03], [0.3, 0.25, 0.2]),
    ("uint8", [10], [220]),  # greyscale: repeated to three channels
])
@pytest.mark.parametrize("size", [24, 48, 16])
def test_model_input_equals_the_per_tile_path(dtype: str, low: list[float], high: list[float], size: int) -> None:
    """Raw tiles finished in one batch (and on the way a GPU takes) give exactly read_tile + to_model_input."""
    rng = np.random.default_rng(0)
    info = _info(low, high, dtype)
    kind = np.dtype(dtype)
    if kind.kind == "f":
        raw = rng.uniform(-0.1, 0.4, (5, len(low), 24, 24)).astype(kind)
    else:
        lim = np.iinfo(kind)
        raw = rng.integers(max(lim.min, -1000), min(lim.max, 5000), (5, len(low), 24, 24)).astype(kind)
    valid = rng.random((5, 24, 24)) > 0.1
    valid[0] = True
    ref = torch.stack([to_model_input(scale_pixels(r, v, info), size) for r, v in zip(raw, valid, strict=True)])
    model_input = ModelInput.of(info, size)
    got = model_input(raw, torch.from_numpy(~valid))
    assert got.shape == (5, 3, size, size) and got.is_contiguous(memory_format=torch.channels_last)
    wire = torch.from_numpy(wire_dtype(raw))  # what a worker sends for the model's device to finish
    if model_input.fused(wire):  # 8-bit at the input size: one affine pass, equal within float rounding
        torch.testing.assert_close(got, ref, rtol=0, atol=2e-6)
        torch.testing.assert_close(model_input(raw[:1], None), ref[:1], rtol=0, atol=2e-6)
        # tiles stored pixel by pixel (a pixel-interleaved file) give the same
        nhwc = torch.from_numpy(np.ascontiguousarray(raw.transpose(0, 2, 3, 1))).permute(0, 3, 1, 2)
        assert torch.equal(model_input(nhwc, torch.from_numpy(~valid)), got)
        return
    assert torch.equal(got, ref)  # step by step: the very same float operations
    assert torch.equal(model_input(wire, torch.from_numpy(~valid)), ref)
    assert torch.equal(model_input(raw[:1], None), ref[:1])  # an all-valid batch sends no mask


def test_workers_hand_over_raw_pixels_in_shared_memory(swellendam_tiles) -> None:
    """Workers leave raw 8-bit tiles in the run's shared ring, each worker its own range of batches."""
    info, tiles = swellendam_tiles
    ds = TileBlocks(info, tiles, tiles, 64, batch_size=8)
    ref = {int(b.index[0]): ds.inputs(b) for b in (ds[i] for i in range(len(ds)))}
    for workers in (1, 2):
        got, firsts = {}, []
        for b in iter_batches(ds, workers):  # a batch lies in the ring until later ones take its slot
            [part] = b.parts
            assert part.pixels.dtype == torch.uint8 and part.pixels.is_shared() and part.invalid is None
            firsts.append(int(b.index[0]))
            got[firsts[-1]] = ds.inputs(b)
        # two workers: the first reads batches 0-3, the second 4-7, handed on alternately
        assert firsts == ([0, 32, 8, 40, 16, 48, 24, 56] if workers == 2 else list(range(0, 64, 8)))
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def _tiles(info: RasterInfo, size: int, n: int, row: int = 0) -> np.ndarray:
    """``n`` neighbouring ``size`` px tiles along pixel row ``row`` (the last may run past the edge)."""
    cols = np.arange(n) * size
    return np.stack([cols, np.full(n, row), np.full(n, size), np.full(n, size)], axis=1)


def test_a_batch_across_rasters_of_every_kind_equals_the_per_tile_path() -> None:
    """One stream over four rasters of different dtypes, band counts, scalings, nodata and tile sizes:
    batches span them, each raster's tiles are finished by its own scaling, and every tile's model
    input equals the per-tile path exactly, whether read here or by two workers."""
    specs = [(scene("swellendam_za", "3420B_2010_328_RGB_LATLNG.tif"), [1, 2, 3], {"method": "dtype"}, 32, 5),
             (scene("olinda_brazil", "L7_ETMs.tif"), [3, 2, 1], {"method": "percentile", "low": 2, "high": 98}, 8, 7),
             (scene("bangalore_s2", "section_2_sentinel.tif"), [3, 2, 1], {"method": "percentile"}, 16, 10),
             (scene("olinda_brazil", "L7_ETMs.tif"), [4], {"method": "range", "min": 10, "max": 200}, 12, 3)]
    infos, tiles = [], []
    for path, bands, scaling, size, n in specs:
        spec = RasterInput(path=path, bands=bands, scaling=scaling)
        infos.append(compute_scaling(inspect_raster(path, spec), spec))
        tiles.append(_tiles(infos[-1], size, n, row=size * 3))
    tiles[2][-1, 0] = infos[2].width - 6  # a tile past the right edge: partly invalid
    raster = np.repeat(np.arange(len(specs)), [len(t) for t in tiles])
    windows = np.concatenate(tiles)
    stream = TileStream(infos, raster, windows, windows, 24, batch_size=8)
    assert len(stream) == 4  # 25 tiles in batches of 8, across files
    ref = []
    for info, t in zip(infos, tiles, strict=True):
        with rasterio.open(info.path) as src:
            for c, r, w, h in t:
                px, valid = read_tile(src, info, Window(c, r, w, h))
                ref.append((to_model_input(px, 24), valid.mean()))
    for workers, channels_last in ((0, True), (2, True), (2, False)):  # as stored, and band by band (GPU)
        got = {}
        for b in iter_batches(stream, workers, channels_last=channels_last):
            x = stream.inputs(b)
            assert x.shape == (len(b.index), 3, 24, 24)
            got.update({int(i): (x[k], float(b.valid_tile[k])) for k, i in enumerate(b.index)})
        assert sorted(got) == list(range(len(windows)))
        for i, (x, vt) in enumerate(ref):
            assert torch.equal(got[i][0], x), i
            assert got[i][1] == pytest.approx(vt)
    assert min(v for _, v in ref) < 1  # the edge tile is partly outside: finished with its invalid pixels


def test_a_ring_slot_written_again_before_use_is_an_error_not_other_pixels() -> None:
    ring = BatchRing(slots=2, slot_bytes=1024)
    part = TilePart(torch.zeros(0), None, ModelInput((0.0,), (1.0,), 8))
    for position in (0, 1, 2):  # position 2 takes slot 0 again
        writer = ring.writer(position)
        pixels = writer.tensor((1, 1, 4, 4), torch.uint8)
        pixels.fill_(position)
        view = writer.view(pixels)
        writer.seal()
    batch = TileBatch(np.arange(1), (part._replace(pixels=view),), np.ones(1), np.ones(1))
    assert int(ring.take(batch, 2).parts[0].pixels.sum()) == 2 * 16
    with pytest.raises(RuntimeError, match="slot 0 holds batch 2, expected 0"):
        ring.take(batch, 0)


def test_worker_count_auto() -> None:
    auto = InferenceSettings(num_workers="auto")
    cores = len(os.sched_getaffinity(0))
    assert auto.workers_for(torch.device("cpu")) == 1  # the model needs the other cores
    assert auto.workers_for(torch.device("cuda")) == max(1, min(16, cores - 1))
    assert InferenceSettings(num_workers=3).workers_for(torch.device("cpu")) == 3
    assert InferenceSettings(num_workers=3).workers_for(torch.device("cuda")) == 3


def test_batch_norms_fold_in_fp32_only(swellendam_tiles, mobilenet, fp32_reference) -> None:
    info, tiles = swellendam_tiles
    ds = TileBlocks(info, tiles, tiles, 96, len(tiles))
    x = ds.inputs(ds[0])
    cpu = torch.device("cpu")
    folded = prepare_model(mobilenet.model, cpu, None)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in mobilenet.model.modules())  # the original is kept
    assert prepare_model(mobilenet.model, cpu, None) is folded  # folded once per model
    out = embed_batch(folded, x, cpu, None)
    cos = (out * fp32_reference).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(fp32_reference, axis=1)
    assert cos.min() > 0.99999
    half = prepare_model(mobilenet.model, cpu, torch.float16)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in half.modules())  # fp16 keeps them: more faithful


def test_malloc_keeps_freed_memory_on_glibc() -> None:
    import platform

    assert keep_freed_memory() is (platform.libc_ver()[0] == "glibc")
