"""Progress and verbosity: what a run says on stderr, off a terminal (cron, a log file) and with -v, -vv, -q.

The line rule of :mod:`settlements.progress` is checked on a clock of its own (no timing in the test);
the command line is checked in fresh interpreters writing stderr to a file, as cron does.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from settlements import progress as progress_module
from settlements.cli import verbosity_first
from settlements.progress import LINE_SECONDS, counted, progress

from .conftest import ROOT, run_cli, scene, write_pipeline


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def lines(monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], Clock]:
    """The progress logger's lines, off a terminal, on a clock the test moves."""
    clock = Clock()
    monkeypatch.setattr(progress_module.time, "monotonic", clock)
    monkeypatch.setattr(progress_module, "on_terminal", lambda: False)
    got: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            got.append(record.getMessage())

    log = progress_module.log
    keep, level, propagate = Keep(), log.level, log.propagate
    log.addHandler(keep)
    log.setLevel(logging.INFO)
    log.propagate = False
    yield got, clock
    log.removeHandler(keep)
    log.setLevel(level)
    log.propagate = propagate


def test_a_line_each_tenth_of_the_work(lines) -> None:
    got, clock = lines
    with progress(1000, "embedding", "tile") as bar:
        for _ in range(1000):  # 100 s in all
            clock.now += 0.1
            bar.update(1)
    assert got == [f"embedding: {p}% ({p * 10:,}/1,000 tiles), {p} s" for p in range(10, 101, 10)]


def test_slow_work_says_something_every_30_seconds(lines) -> None:
    got, clock = lines
    for _ in counted(range(4), "fine tuning epoch 1/10", "batch"):  # 75 s a batch: each beyond 30 s
        clock.now += 75
    assert len(got) == 4 and got[-1] == "fine tuning epoch 1/10: 100% (4/4 batches), 300 s"
    got.clear()
    with progress(None, "scoring", "block") as bar:  # total unknown: by time alone
        for _ in range(100):
            clock.now += 3
            bar.update(1)
    assert len(got) == 300 // LINE_SECONDS and got[0] == "scoring: 10 blocks, 30 s"


def test_quick_work_prints_no_line(lines) -> None:
    got, clock = lines
    for _ in counted(range(10), "k-means", "restart"):
        clock.now += 0.1
    assert got == []


def test_verbosity_flags_go_before_the_command_wherever_given() -> None:
    assert verbosity_first(["run", "-v", "p.yaml"]) == ["-v", "run", "p.yaml"]
    assert verbosity_first(["cache", "prune", "p.yaml", "-vv", "--quiet"]) == ["-vv", "--quiet", "cache", "prune",
                                                                                "p.yaml"]
    assert verbosity_first(["similar", "p.yaml", "--examples", "1,2", "--", "-v"]) == [
        "similar", "p.yaml", "--examples", "1,2", "--", "-v"]


def settlements(*args: str, cwd: Path) -> tuple[int, str, str]:
    """``settlements ARGS`` in a fresh interpreter, stdout and stderr going to files (not a terminal)."""
    out, err = cwd / "stdout.log", cwd / "stderr.log"
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    with open(out, "w") as o, open(err, "w") as e:
        code = subprocess.run([sys.executable, "-m", "settlements.cli", *args], stdout=o, stderr=e, cwd=ROOT,
                              env={**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}).returncode
    return code, out.read_text(), err.read_text()


STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "
PROGRESS = re.compile(STAMP + r"(?P<desc>[^:]+): (?P<pct>\d+)% \((?P<n>[\d,]+)/(?P<total>[\d,]+) \w+\), (?P<s>\d+) s$")


@pytest.mark.slow
def test_a_run_off_a_terminal_logs_its_stages_and_sparse_progress(tmp_path: Path, monkeypatch, capsys) -> None:
    """``settlements run -v`` (the flag after the command) writing stderr to a file: one line per stage, progress
    lines no more often than every tenth of a count (or 30 s), no terminal control characters; this package's
    INFO lines but no other library's (pyogrio, FAISS) and no GDAL error for the COG's colour table; the
    libraries' lines come at -vv; -q says nothing."""
    scene("olinda_brazil", "L7_ETMs.tif")
    cfg = write_pipeline(tmp_path, "cron", "olinda", tiling={"tile_size": "16px"}, clustering={"k": 4},
                         embedding={"input_size": 32, "num_workers": 0})
    code, out, err = settlements("run", "-v", str(cfg), cwd=tmp_path)
    assert code == 0, err
    assert out.startswith("cron: 484 tiles in 1 raster(s)")
    # the summary's seconds are the duration the runs table records
    said = float(re.search(r"; ([\d.]+) s$", out.splitlines()[0])[1])
    with sqlite3.connect(tmp_path / "outputs" / "cron" / "cron.gpkg") as con:
        (recorded,) = con.execute("SELECT duration_s FROM runs").fetchone()
    assert said == round(recorded, 1)
    assert "\r" not in err and "\x1b" not in err
    stages = [line for line in err.splitlines() if re.fullmatch(STAMP + r"cron: \d/4 .*", line)]
    assert [s.split("cron: ")[1].split()[0] for s in stages] == ["1/4", "2/4", "3/4", "4/4"]
    found = [PROGRESS.match(line) for line in err.splitlines()]
    counts: dict[str, list[re.Match[str]]] = {}
    for m in filter(None, found):
        counts.setdefault(m["desc"], []).append(m)
    for desc, ms in counts.items():  # at most one line per tenth of the work, or per 30 s of it
        elapsed = int(ms[-1]["s"])
        assert len(ms) <= 10 + elapsed // 30 + 1, (desc, [m.group(0) for m in ms])
        pcts = [int(m["pct"]) for m in ms]
        assert pcts == sorted(pcts) and pcts[-1] == 100, (desc, pcts)
    assert "INFO settlements.stages.tile: tiling: 484 tiles" in err
    assert not re.search(r"INFO (pyogrio|faiss|rasterio)", err), err
    assert "GDAL signalled an error" not in err and "PhotometricInterpretation" not in err

    # the export stage alone writes the GeoPackage and the COG again
    code, _, err = settlements("-vv", "export", str(cfg), cwd=tmp_path)
    assert code == 0 and "INFO pyogrio._io: Created 484 records" in err and "PhotometricInterpretation" not in err
    code, out, err = run_cli(monkeypatch, capsys, "run", "--force", str(cfg), "--quiet")
    assert code == 0 and err == "" and out.startswith("cron: 484 tiles")
