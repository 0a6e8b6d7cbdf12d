"""Kills and signals at every point of a run, and two runs at once: previous outputs survive, reruns finish.

Each killed run is compared with a twin work folder that ran the same steps without interruption.
Kills are real: SIGKILL from outside when a marker file appears, or (for the steps of the commit,
too short to hit from outside) the process's own SIGKILL at a named step (``SETTLEMENTS_CRASH_AT``).
"""

from __future__ import annotations

import json
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

from .conftest import HANG_GUARD, said
from .reprocess_helpers import (
    assert_same_content,
    integrity_ok,
    kampala_chips,
    layer,
    leftovers,
    name_clusters,
    session_processes,
    snapshot,
)

pytestmark = pytest.mark.slow


def start(config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "TQDM_DISABLE": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "settlements.cli", "run", str(config), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(proc: subprocess.Popen, marker: Callable[[], object], timeout: float = HANG_GUARD) -> object:
    """Poll until ``marker()`` is truthy while the run goes on; return what it saw."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        seen = marker()
        if seen:
            return seen
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (exit {proc.returncode}) before the kill point: {out}{err}")
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("kill point never reached")


def kill_when(proc: subprocess.Popen, marker: Callable[[], object], timeout: float = HANG_GUARD) -> object:
    """SIGKILL the run's process group as soon as ``marker()`` is truthy; return what it saw."""
    seen = wait_for(proc, marker, timeout)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return seen


def shard_chunks(work: Path) -> list[Path]:
    return sorted((work / "cache").glob("*/chunk-*.npz"))


def staged_gpkg(out: Path) -> list[Path]:
    """A GeoPackage being built in a hidden staging folder of the output folder."""
    return sorted(p for p in out.glob(".*/*") if "gpkg" in p.name)


def twin(src: Path, dst: Path, n_chips: int, **overrides: object) -> Path:
    """Copy a finished pipeline folder (work, outputs, labels) and point a config at the copy."""
    shutil.copytree(src / "work", dst / "work")
    shutil.copytree(src / "outputs", dst / "outputs")
    shutil.copy(src / "ka.labels.yaml", dst / "ka.labels.yaml")
    return kampala_chips(dst, n_chips, **overrides)


def state(config: Path) -> tuple[dict[str, str], dict[str, str], bytes]:
    """What a run may change: the outputs, the work folder's artifacts and the analyst's labels file."""
    cfg = load_config(config)
    return snapshot(cfg.output_dir), snapshot(cfg.work_dir), cfg.labels_path.read_bytes()


def no_leftovers(config: Path) -> None:
    cfg = load_config(config)
    left = leftovers(cfg.output_dir, cfg.work_dir) + [
        p for p in cfg.labels_path.parent.glob(".settlements-tmp-*")]
    assert not left, left


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
    no_leftovers(config_a)

    # 2. killed while the GeoPackage is written (after the analyst renamed a cluster)
    for folder in (a, b):
        data = yaml.safe_load((folder / "ka.labels.yaml").read_text())
        data["clusters"][0]["name"] = "dense roofs"
        (folder / "ka.labels.yaml").write_text(yaml.safe_dump(data))
    before = snapshot(cfg.output_dir)
    proc = start(config_a)
    kill_when(proc, lambda: staged_gpkg(cfg.output_dir))
    assert snapshot(cfg.output_dir) == before
    run(load_config(config_a))
    run(load_config(config_b))
    assert_same_content(cfg.output_dir, load_config(config_b).output_dir)
    assert "dense roofs" in set(layer(cfg.output_dir / "ka.gpkg", "clusters")["label"])
    no_leftovers(config_a)
    assert len(layer(cfg.output_dir / "ka.gpkg", "runs")) == 3  # killed runs leave no row


def test_runs_at_once_one_works_the_others_fail_clearly_or_wait(tmp_path: Path) -> None:
    config = kampala_chips(tmp_path, 2)
    cfg = load_config(config)
    procs = [start(config), start(config), start(config, "--wait", str(HANG_GUARD))]
    results = [(p.wait(timeout=HANG_GUARD), *p.communicate()) for p in procs]
    codes = [r[0] for r in results]
    assert codes.count(0) == 1, results  # exactly one run did the work
    assert codes[2] in (0, 3), results  # the waiting one either ran, or ran after it and found nothing to do
    failed = [r for r in results[:2] if r[0] == 2]
    assert failed, results  # of two runs that do not wait, at most one can hold the lock
    for _, _, err in failed:
        lines = said(err)
        assert len(lines) == 1 and lines[0].startswith("error: ")
        assert "another run of pipeline 'ka' is in progress" in lines[0]
    if codes[2] == 3:
        assert "nothing to do" in results[2][1]
    gpkg = cfg.output_dir / "ka.gpkg"
    assert integrity_ok(gpkg) and len(layer(gpkg, "runs")) == 1
    no_leftovers(config)


# ------------------------------------------------------------------ named clusters, then a refit

NAMES = {0: "dense roofs", 1: "trees", 2: "bare ground", 3: "sparse roofs"}


@pytest.fixture(scope="module")
def named(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two Kampala chips clustered (k=4), the clusters named by the analyst."""
    folder = tmp_path_factory.mktemp("named")
    config = kampala_chips(folder, 2)
    run(load_config(config))
    name_clusters(load_config(config).labels_path, NAMES)
    return folder


@pytest.fixture(scope="module")
def refitted(named: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The named pipeline after k is lowered to 3 (a refit that renames and renumbers), uninterrupted."""
    config = twin(named, tmp_path_factory.mktemp("refitted"), 2, clustering={"k": 3, "seed": 0})
    report = run(load_config(config), skip_unchanged=True)
    assert report.clustering["matching"]["matched"] and report.clustering["matching"]["gone"]
    return config


def assert_same_run(config: Path, reference: Path) -> None:
    """Outputs row for row (runs, tile_changes, every layer, pictures) and the labels file, byte for byte."""
    a, b = load_config(config), load_config(reference)
    assert_same_content(a.output_dir, b.output_dir)
    assert a.labels_path.read_bytes() == b.labels_path.read_bytes()
    ja, jb = (json.loads((c.work_dir / "clusters.json").read_text()) for c in (a, b))
    assert {k: v for k, v in ja.items() if k != "trained_on"} == {k: v for k, v in jb.items() if k != "trained_on"}
    no_leftovers(config)


def new_centroids(work: Path, before: os.stat_result) -> object:
    """The refit's centroids are on disk: clusters.npz replaced in place, or staged beside it."""
    now = (work / "clusters.npz").stat()
    return (now.st_ino, now.st_mtime_ns) != (before.st_ino, before.st_mtime_ns) or list(
        work.glob(".settlements-tmp-*clusters.npz"))


@pytest.mark.parametrize("point", ["centroids saved", "exporting"])
def test_a_refit_killed_midway_changes_nothing_and_its_rerun_equals_an_uninterrupted_one(
        named: Path, refitted: Path, tmp_path: Path, point: str) -> None:
    config = twin(named, tmp_path, 2, clustering={"k": 3, "seed": 0})
    cfg = load_config(config)
    before = state(config)
    centroids = (cfg.work_dir / "clusters.npz").stat()
    proc = start(config)
    if point == "centroids saved":
        kill_when(proc, lambda: new_centroids(cfg.work_dir, centroids))
    else:
        kill_when(proc, lambda: staged_gpkg(cfg.output_dir))
    # the analyst's names, the outputs and the centroids the next run refits from: all as they were
    assert state(config) == before
    assert yaml.safe_load(cfg.labels_path.read_text())["clusters"][1]["name"] == "trees"
    rerun = run(load_config(config), skip_unchanged=True)
    assert not rerun.nothing_to_do
    assert_same_run(config, refitted)


def test_a_kill_at_any_step_of_the_commit_leaves_old_or_new_outputs_and_the_next_command_completes_it(
        named: Path, refitted: Path, tmp_path: Path) -> None:
    """A real run (a refit), killed when all is staged (no journal yet), when the journal is written, and
    after the renames of the labels file and of the GeoPackage. Every single step (the last rename with
    the journal not yet deleted too) is killed in the cheaper test below."""
    steps = ["commit:staged", "commit:journal"]
    done: list[str] = []
    while steps:
        step = steps.pop(0)
        config = twin(named, tmp_path / step.replace(":", "-"), 2, clustering={"k": 3, "seed": 0})
        cfg = load_config(config)
        before = state(config)
        proc = start(config, env={"SETTLEMENTS_CRASH_AT": step})  # settlements.store.CRASH_ENV
        out, err = proc.communicate(timeout=HANG_GUARD)
        assert proc.returncode == -signal.SIGKILL, (step, out, err)
        journal = cfg.work_dir / ".settlements-commit.json"
        if step == "commit:staged":  # killed before the commit point: everything as it was
            assert state(config) == before and not journal.exists(), step
        else:  # past it: the journal lists every rename, those not yet done still staged
            renames = json.loads(journal.read_text())["renames"]
            finals = [Path(t).name for _, t in renames]
            assert {"ka.gpkg", "ka.labels.yaml", "last_run.json", "clusters.npz", "atlas.png"} <= set(finals)
            n_done = 0 if step == "commit:journal" else int(step.rsplit(":", 1)[1])
            for i, (staged, _) in enumerate(renames):
                assert (cfg.work_dir / staged).exists() == (i >= n_done), (step, staged)
            if step == "commit:journal":
                assert state(config) == before
                steps += [f"commit:rename:{i}" for i in sorted(
                    {finals.index("ka.labels.yaml") + 1, finals.index("ka.gpkg") + 1})]
        # what the scheduler does next: the run completes the commit and has nothing left to do,
        # or (killed before the commit point) runs again
        rerun = run(load_config(config), skip_unchanged=True)
        assert rerun.nothing_to_do == (step != "commit:staged"), step
        assert_same_run(config, refitted)
        assert len(layer(cfg.output_dir / "ka.gpkg", "runs")) == 2
        done.append(step)
    assert len(done) == 4, done


COMMIT_SCRIPT = """
import sys
from pathlib import Path
from settlements.store import Commit

root = Path(sys.argv[1])
with Commit(root / "work" / ".settlements-commit.json") as commit:
    for name in ("tiles.parquet", "clusters.npz", "last_run.json"):
        commit.stage(root / "work" / name).write_text("new " + name)
    commit.stage(root / "olinda.labels.yaml").write_text("new olinda.labels.yaml")
    stage = commit.folder(root / "out")
    for name in ("atlas.png", "olinda.qgz", "olinda.gpkg"):
        (stage / name).write_text("new " + name)
"""


def test_a_kill_at_every_step_of_a_commit_leaves_the_old_files_or_a_journal_that_completes_the_new_ones(
        tmp_path: Path) -> None:
    """Seven files in three folders (work, output staging folder, beside the labels file), killed before
    the journal, after it, and after each rename."""
    from settlements.store import finish_commit, remove_stale_temps

    files = [Path("work/tiles.parquet"), Path("work/clusters.npz"), Path("work/last_run.json"),
             Path("olinda.labels.yaml"), Path("out/atlas.png"), Path("out/olinda.qgz"), Path("out/olinda.gpkg")]
    steps = ["commit:staged", "commit:journal", *(f"commit:rename:{i}" for i in range(1, len(files) + 1))]
    for step in steps:
        root = tmp_path / step.replace(":", "-")
        for f in files:
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            (root / f).write_text("old " + f.name)
        proc = subprocess.run([sys.executable, "-c", COMMIT_SCRIPT, str(root)], capture_output=True, text=True,
                              env={**os.environ, "SETTLEMENTS_CRASH_AT": step}, timeout=HANG_GUARD)
        assert proc.returncode == -signal.SIGKILL, (step, proc.stderr)
        contents = {f: (root / f).read_text().split()[0] for f in files}
        journal = root / "work" / ".settlements-commit.json"
        if step == "commit:staged":
            assert set(contents.values()) == {"old"} and not journal.exists()
            assert remove_stale_temps(root / "work", root / "out", root) == 5  # 4 files, 1 staging folder
        else:
            done = 0 if step == "commit:journal" else int(step.rsplit(":", 1)[1])
            renamed = [Path(t).name for _, t in json.loads(journal.read_text())["renames"]][:done]
            assert sorted(f.name for f in files if contents[f] == "new") == sorted(renamed), step
            assert finish_commit(journal) == len(files) - done
            assert {f: (root / f).read_text() for f in files} == {f: "new " + f.name for f in files}, step
        assert not leftovers(root), (step, leftovers(root))


# ---------------------------------------------------------------------------------------- signals

@pytest.mark.parametrize(("sig", "point", "group"), [
    (signal.SIGINT, "embedding", True),    # Ctrl-C in a terminal: the whole foreground group
    (signal.SIGTERM, "embedding", True),   # systemd stopping the unit: every process of it
    (signal.SIGTERM, "clustering", False),  # kill PID
    (signal.SIGINT, "exporting", False),
])
def test_a_signal_exits_128_plus_its_number_with_one_line_and_changes_nothing(
        named: Path, tmp_path: Path, sig: signal.Signals, point: str, group: bool) -> None:
    # with DataLoader worker processes; to stop it while embedding, three more chips to embed
    config = twin(named, tmp_path, 5 if point == "embedding" else 2, embedding={"input_size": 32, "num_workers": 2})
    cfg = load_config(config)
    before = state(config)
    chunks = len(shard_chunks(cfg.work_dir))
    proc = start(config)
    markers: dict[str, Callable[[], object]] = {  # embedding: a chip done, the next one's workers reading
        "embedding": lambda: len(shard_chunks(cfg.work_dir)) > chunks and len(session_processes(proc.pid)) > 1,
        "clustering": lambda: list(cfg.work_dir.glob(".*assignments.parquet*")),
        "exporting": lambda: staged_gpkg(cfg.output_dir),
    }
    wait_for(proc, markers[point])
    workers = [p for p in session_processes(proc.pid) if p != proc.pid]
    (os.killpg if group else os.kill)(proc.pid, sig)
    out, err = proc.communicate(timeout=HANG_GUARD)
    assert proc.returncode == 128 + sig, (proc.returncode, out, err)
    assert said(err) == [f"error: interrupted by {sig.name}; the outputs are those of the last completed run"]
    if point == "embedding":
        assert workers, "no DataLoader worker was running: the test did not test them"
    assert session_processes(proc.pid) == [], "processes of the run outlived it"
    assert state(config) == before
    no_leftovers(config)
