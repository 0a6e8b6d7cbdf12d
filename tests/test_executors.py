"""The Dask executor gives the same results as the single-process run, on a real scene."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyogrio
import pytest

from settlements import executors, pipeline
from settlements.config import load_config
from settlements.embedding import engines
from settlements.executors import EmbedJob, split_jobs
from settlements.pipeline import run

from .conftest import run_cli, scene, write_pipeline

pytest.importorskip("distributed")


def _layer(gpkg: Path, name: str) -> pd.DataFrame:
    df = pyogrio.read_dataframe(gpkg, layer=name)
    return df.drop(columns=[c for c in ("fid",) if c in df.columns])


def test_blocks_span_rasters_in_whole_batches_and_keep_every_tile() -> None:
    jobs = [EmbedJob(f"k{i}", None, np.arange(n * 8).reshape(n, 8) + 10_000 * i, 64, 0.5)  # type: ignore[arg-type]
            for i, n in enumerate((1000, 7, 30, 0, 55))]
    blocks = split_jobs(jobs, block_tiles=100, batch_size=32)
    sizes = [sum(len(j.windows) for j in b) for b in blocks]
    assert sizes[:-1] == [128] * (len(blocks) - 1) and sum(sizes) == 1092  # whole batches, across files
    # tiles 896..1023: the end of k0, all of k1, the start of k2; then the rest of k2 and k4
    assert [(j.key, len(j.windows)) for j in blocks[7]] == [("k0", 104), ("k1", 7), ("k2", 17)]
    assert [(j.key, len(j.windows)) for j in blocks[8]] == [("k2", 13), ("k4", 55)]
    for key in ("k0", "k1", "k2", "k4"):
        got = np.concatenate([j.windows for b in blocks for j in b if j.key == key])
        assert np.array_equal(got, next(j.windows for j in jobs if j.key == key))


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["torch", "openvino"])
def test_dask_local_cluster_matches_single_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   engine: str) -> None:
    """Dask blocks of 96 tiles (64 a raster) that span rasters embed the batches the local stream embeds: the
    same embeddings bit for bit, and the same outputs; with another engine, each worker runs the network the
    run exported and the gate passed (from the shared work folder)."""
    scene("kampala_oam")
    if engine != "torch" and not engines.installed(engine):
        pytest.skip(f"{engine} not installed")
    over = {"embedding": {"input_size": 32, "engine": engine, "precision": "fp32"}}
    single = load_config(write_pipeline(tmp_path, "single", "kampala", **over))
    dask = load_config(write_pipeline(tmp_path, "dask", "kampala", **over))
    a = run(single)
    monkeypatch.setattr(pipeline, "make_executor", functools.partial(executors.make_executor, block_tiles=90))
    b = run(dask, executor="dask", n_workers=2)
    assert b.tiles["rasters"] == 6 and a.tiles["tiles"] == 6 * 64
    assert b.embedding["tiles_embedded"] == a.embedding["tiles_embedded"] == a.tiles["tiles"]
    ea = np.load(single.work_dir / "embeddings.npy")
    eb = np.load(dask.work_dir / "embeddings.npy")
    assert ea.shape == eb.shape
    for cfg in (single, dask):
        meta = json.loads((cfg.work_dir / "embedding.json").read_text())
        assert (meta["engine"], meta["precision"]) == (engine, "fp32")
    assert np.array_equal(eb, ea)
    for name in ("tiles", "regions", "clusters", "histogram"):
        ta, tb = _layer(a.outputs["gpkg"], name), _layer(b.outputs["gpkg"], name)
        assert list(ta.columns) == list(tb.columns)
        pd.testing.assert_frame_equal(ta, tb, check_exact=False, rtol=1e-5)


@pytest.mark.parametrize(("args", "pattern"), [
    (["--executor", "spark"], r"^error: --executor: unknown executor 'spark' \(choose from: local, dask\)$"),
    (["--scheduler", "tcp://127.0.0.1:1"], r"^error: --scheduler: only used with --executor dask$"),
])
def test_bad_executor_options_are_one_line_errors(tmp_path: Path, monkeypatch, capsys, args, pattern) -> None:
    scene("olinda_brazil", "L7_ETMs.tif")
    cfg = write_pipeline(tmp_path, "ex", "olinda")
    code, _, err = run_cli(monkeypatch, capsys, "run", str(cfg), *args)
    assert code == 2
    assert __import__("re").match(pattern, err.strip()), err
    assert not (tmp_path / "work" / "ex").exists()

