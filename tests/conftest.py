"""Shared fixtures: real scenes from ../shared/data, and each real pipeline run once per session."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, settings

from settlements.config import PipelineConfig, load_config
from settlements.pipeline import RunReport, run

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
PIPELINES = ROOT / "pipelines"

os.environ.setdefault("TQDM_DISABLE", "1")

#: Seconds a test waits at most for a process, a marker or a lock: a guard against a hang, never a check of
#: speed, so far above any real duration that a slow or busy machine never reaches it. (Hypothesis runs
#: without deadlines: see the profile below.)
HANG_GUARD = 1800

# Every property test runs under this one profile: no deadline and no speed health check (a busy machine is
# no failure), and the same examples on every machine and every run (derandomized; `make fuzz` explores).
settings.register_profile("settlements", deadline=None, suppress_health_check=[HealthCheck.too_slow],
                          derandomize=True, database=None)
settings.load_profile("settlements")


@pytest.fixture(scope="session", autouse=True)
def machine_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """What ``embedding.engine: auto`` measures goes to a folder of the test session, never the user's cache."""
    path = tmp_path_factory.mktemp("machine-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SETTLEMENTS_CACHE_DIR", str(path))
        yield path


def scene(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} missing: run `make data`")
    return path


def write_pipeline(tmp: Path, name: str, base: str | None = None, **overrides: object) -> Path:
    """A pipeline YAML in ``tmp``: ``pipelines/<base>.yaml`` with absolute paths and outputs in ``tmp``.

    ``overrides`` replace top-level sections (dicts are merged one level deep).
    """
    data: dict = {}
    if base is not None:
        cfg = load_config(PIPELINES / f"{base}.yaml")
        data = cfg.to_yaml_dict()
        data.pop("labels", None)
    data["name"] = name
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    data["output"] = {**data.get("output", {}), "dir": str(tmp / "outputs" / name),
                      "work_dir": str(tmp / "work" / name)}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


#: The start of a progress line (:mod:`settlements.progress`): a time stamp. Everything else a command writes
#: to stderr is an error or a warning.
PROGRESS_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")


def said(stderr: str) -> list[str]:
    """The lines of a command's stderr but its progress lines: its errors and warnings."""
    return [line for line in stderr.strip().splitlines() if not PROGRESS_LINE.match(line)]


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """Run ``settlements ARGS`` in-process: exit code, stdout, stderr. The loggers the command line sets up
    (``-v``, ``-q``, progress) are as they were afterwards."""
    import logging
    import sys

    from settlements.cli import main

    monkeypatch.setattr(sys, "argv", ["settlements", *args])
    own, shown = logging.getLogger("settlements"), logging.getLogger("settlements.progress")
    before = own.level, shown.level, shown.propagate, list(shown.handlers)
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        own.level, shown.level, shown.propagate, shown.handlers = before[0], before[1], before[2], before[3]
    out = capsys.readouterr()
    return code, out.out, out.err


class Ran:
    """A finished real pipeline run: its config, report and output paths."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.cfg: PipelineConfig = load_config(config_path)
        self.report: RunReport = run(self.cfg)

    @property
    def gpkg(self) -> Path:
        return self.report.outputs["gpkg"]

    @property
    def work(self) -> Path:
        return self.cfg.work_dir


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One CPU thread for torch and BLAS: on a shared, loaded machine two threads run ~15x slower."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def swellendam_tiles() -> tuple:
    """64 real 32 px tiles from the Swellendam aerial photo: two bands of tile rows, town and fields."""
    import numpy as np

    from settlements.config import RasterInput
    from settlements.rasters import compute_scaling, inspect_raster

    path = scene("swellendam_za", "3420B_2010_328_RGB_LATLNG.tif")
    spec = RasterInput(path=path, bands=[1, 2, 3])
    info = compute_scaling(inspect_raster(path, spec), spec)
    rows, cols = np.meshgrid(np.arange(1200, 1264, 32), np.arange(0, 1024, 32), indexing="ij")
    tiles = np.stack([cols.ravel(), rows.ravel(), np.full(rows.size, 32), np.full(rows.size, 32)], axis=1)
    return info, tiles


@pytest.fixture(scope="session")
def olinda(tmp_path_factory: pytest.TempPathFactory) -> Ran:
    scene("olinda_brazil", "L7_ETMs.tif")
    return Ran(write_pipeline(tmp_path_factory.mktemp("olinda"), "olinda", "olinda"))


@pytest.fixture(scope="session")
def swellendam(tmp_path_factory: pytest.TempPathFactory) -> Ran:
    scene("swellendam_za", "3420B_2010_328_RGB_LATLNG.tif")
    return Ran(write_pipeline(tmp_path_factory.mktemp("swellendam"), "swellendam", "swellendam"))


@pytest.fixture(scope="session")
def kampala(tmp_path_factory: pytest.TempPathFactory) -> Ran:
    scene("kampala_oam")
    return Ran(write_pipeline(tmp_path_factory.mktemp("kampala"), "kampala", "kampala"))


@pytest.fixture(scope="session")
def bangalore(tmp_path_factory: pytest.TempPathFactory) -> Ran:
    scene("bangalore_s2", "section_2_sentinel.tif")
    return Ran(write_pipeline(tmp_path_factory.mktemp("bangalore"), "bangalore", "bangalore"))


@pytest.fixture(params=["olinda", "swellendam", "kampala", "bangalore"])
def any_scene(request: pytest.FixtureRequest) -> Ran:
    return request.getfixturevalue(request.param)
