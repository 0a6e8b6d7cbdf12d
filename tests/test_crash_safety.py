"""SIGKILL at several points of a run, and two runs at once: previous outputs survive, reruns finish.

Each killed run is compared with a twin work folder that ran the same steps without interruption.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from settlements.config import load_config
from settlements.pipeline import run

from .reprocess_helpers import assert_same_content, integrity_ok, kampala_chips, layer, snapshot

pytestmark = pytest.mark.slow


def start(config: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.Popen([sys.executable, "-m", "settlements.cli", "run", str(config), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def kill_when(proc: subprocess.Popen, marker: Callable[[], object], timeout: float = 240) -> object:
    """SIGKILL the run's process group as soon as ``marker()`` is truthy; return what it saw."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        seen = marker()
        if seen:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return seen
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (exit {proc.returncode}) before the kill point: {out}{err}")
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("kill point never reached")


def shard_chunks(work: Path) -> list[Path]:
    return sorted((work / "cache").glob("*/chunk-*.npz"))


def staged_gpkg(out: Path) -> list[Path]:
    return sorted(out.glob(".staging-*/*.gpkg"))


def twin(src: Path, dst: Path, n_chips: int) -> Path:
    """Copy a finished pipeline folder (work, outputs, labels) and point a config at the copy."""
    shutil.copytree(src / "work", dst / "work")
    shutil.copytree(src / "outputs", dst / "outputs")
    shutil.copy(src / "ka.labels.yaml", dst / "ka.labels.yaml")
    return kampala_chips(dst, n_chips)


def test_sigkill_during_embedding_and_during_geopackage_write(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    run(load_config(kampala_chips(a, 2)))
    config_b = twin(a, b, 5)
    config_a = kampala_chips(a, 5)  # three more chips arrive
    cfg = load_config(config_a)
    before = snapshot(cfg.output_dir)

    # 1. killed while embedding the new chips: once the first new shard is on disk, before the last
    proc = start(config_a)
    seen = kill_when(proc, lambda: len(shard_chunks(cfg.work_dir)) > 2 and shard_chunks(cfg.work_dir))
    assert 2 < len(seen) < 5, "the kill came after embedding had finished"
    assert snapshot(cfg.output_dir) == before
    resumed = run(load_config(config_a))
    assert resumed.embedding["tiles_reused"] > layer(cfg.output_dir / "ka.gpkg", "runs")["tiles_total"].iloc[0]
    assert resumed.embedding["tiles_embedded"] + resumed.embedding["tiles_reused"] == resumed.tiles["tiles"]
    run(load_config(config_b))  # the same step, uninterrupted
    assert_same_content(cfg.output_dir, load_config(config_b).output_dir)
    assert not list(cfg.output_dir.glob(".*")), "temporary files were left behind"

    # 2. killed while the GeoPackage is written (after the analyst renamed a cluster)
    for folder in (a, b):
        data = yaml.safe_load((folder / "ka.labels.yaml").read_text())
        data["clusters"][0]["name"] = "dense roofs"
        (folder / "ka.labels.yaml").write_text(yaml.safe_dump(data))
    before = snapshot(cfg.output_dir)
    proc = start(config_a)
    kill_when(proc, lambda: staged_gpkg(cfg.output_dir) or list(cfg.output_dir.glob(".staging-*/.ka.gpkg.*")))
    assert snapshot(cfg.output_dir) == before
    run(load_config(config_a))
    run(load_config(config_b))
    assert_same_content(cfg.output_dir, load_config(config_b).output_dir)
    assert "dense roofs" in set(layer(cfg.output_dir / "ka.gpkg", "clusters")["label"])
    assert not list(cfg.output_dir.glob(".*"))
    assert len(layer(cfg.output_dir / "ka.gpkg", "runs")) == 3  # killed runs leave no row


def test_runs_at_once_one_works_the_others_fail_clearly_or_wait(tmp_path: Path) -> None:
    config = kampala_chips(tmp_path, 2)
    cfg = load_config(config)
    procs = [start(config), start(config), start(config, "--wait", "300")]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = [r[0] for r in results]
    assert codes.count(0) == 1, results  # exactly one run did the work
    assert codes[2] in (0, 3), results  # the waiting one either ran, or ran after it and found nothing to do
    failed = [r for r in results[:2] if r[0] == 2]
    assert failed, results  # of two runs that do not wait, at most one can hold the lock
    for _, _, err in failed:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ")
        assert "another run of pipeline 'ka' is in progress" in lines[0]
    if codes[2] == 3:
        assert "nothing to do" in results[2][1]
    gpkg = cfg.output_dir / "ka.gpkg"
    assert integrity_ok(gpkg) and len(layer(gpkg, "runs")) == 1
    assert not list(cfg.output_dir.glob(".*"))
