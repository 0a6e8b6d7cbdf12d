"""The Dask executor gives the same results as the single-process run, on a real scene."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyogrio
import pytest

from settlements.config import load_config
from settlements.executors import EmbedJob, split_job
from settlements.pipeline import run

from .conftest import scene, write_pipeline
from .test_cli_errors import cli

pytest.importorskip("distributed")


def _layer(gpkg: Path, name: str) -> pd.DataFrame:
    df = pyogrio.read_dataframe(gpkg, layer=name)
    return df.drop(columns=[c for c in ("fid",) if c in df.columns])


def test_split_job_keeps_whole_batches_and_every_tile() -> None:
    windows = np.arange(1000 * 8).reshape(1000, 8)
    job = EmbedJob("k", None, windows, 64, 0.5)  # type: ignore[arg-type]
    blocks = split_job(job, block_tiles=100, batch_size=32)
    assert all(len(b.windows) % 32 == 0 for b in blocks[:-1])
    assert np.array_equal(np.concatenate([b.windows for b in blocks]), windows)


@pytest.mark.slow
def test_dask_local_cluster_matches_single_process(tmp_path: Path) -> None:
    scene("kampala_oam")
    over = {"embedding": {"input_size": 32}}
    single = load_config(write_pipeline(tmp_path, "single", "kampala", **over))
    dask = load_config(write_pipeline(tmp_path, "dask", "kampala", **over))
    a = run(single)
    b = run(dask, executor="dask", n_workers=2)
    assert b.tiles["rasters"] == 6  # six rasters: six blocks spread over the two workers
    assert b.embedding["tiles_embedded"] == a.embedding["tiles_embedded"] == a.tiles["tiles"]
    ea = np.load(single.work_dir / "embeddings.npy")
    eb = np.load(dask.work_dir / "embeddings.npy")
    assert ea.shape == eb.shape
    np.testing.assert_allclose(eb, ea, rtol=0, atol=1e-5 * np.abs(ea).max())
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
    code, err = cli(monkeypatch, capsys, "run", str(cfg), *args)
    assert code == 2
    assert __import__("re").match(pattern, err.strip()), err
    assert not (tmp_path / "work" / "ex").exists()

