"""Time a rerun with nothing changed beside the full run (targets: under 1 s and 300 MB peak RSS).

Runs a shipped pipeline into a temporary folder three times through the command line, as a
scheduler would: a full first run, an unchanged rerun (exit 3, nothing to do) and a forced rerun
that re-exports everything from the embedding cache (``--force``). It prints wall times, including
Python start-up, each as a ratio of the full run, and each process's peak resident memory (the
command's own process; the full run's DataLoader workers are not counted); then the same
in-process (library call, no start-up), where the unchanged rerun is only the state check.

    .venv/bin/python benchmarks/rerun.py [--pipeline olinda] [--input-size 96]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def pipeline_copy(tmp: Path, name: str, input_size: int | None) -> Path:
    """The shipped pipeline with absolute paths and its work and outputs in ``tmp``."""
    sys.path.insert(0, str(ROOT))
    from settlements.config import load_config

    data = load_config(ROOT / "pipelines" / f"{name}.yaml").to_yaml_dict()
    data.pop("labels", None)
    data["output"] = {**data["output"], "dir": str(tmp / "outputs"), "work_dir": str(tmp / "work")}
    if input_size:
        data["embedding"]["input_size"] = input_size
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cli(config: Path, *args: str) -> tuple[float, int, float]:
    """``settlements run CONFIG ARGS`` in a new process: wall seconds, exit code, peak RSS in MB."""
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "settlements.cli", "run", str(config), *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own resources, not the largest child's so far
        elapsed = time.perf_counter() - t
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        if code not in (0, 3):
            err.seek(0)
            sys.exit(f"run failed (exit {code}): {err.read().decode(errors='replace').strip()}")
    return elapsed, code, usage.ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", default="olinda")
    ap.add_argument("--input-size", type=int, default=None, help="override embedding.input_size")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cli_dir, lib_dir = tmp / "cli", tmp / "lib"
        cli_dir.mkdir()
        lib_dir.mkdir()
        config = pipeline_copy(cli_dir, args.pipeline, args.input_size)
        full, _, full_mb = cli(config)
        same, code, same_mb = cli(config)
        forced, _, forced_mb = cli(config, "--force")
        print(f"{args.pipeline} via the command line (wall time incl. Python start-up; peak RSS of the process):")
        print(f"  full run          {full:8.2f} s  {full_mb:7.0f} MB")
        print(f"  unchanged rerun   {same:8.2f} s  {same_mb:7.0f} MB  = {same / full:6.1%} of the full run's time "
              f"(exit {code}: nothing to do; target under 1 s and 300 MB)")
        print(f"  forced rerun      {forced:8.2f} s  {forced_mb:7.0f} MB  = {forced / full:6.1%} "
              "(re-export from the embedding cache)")

        from settlements.config import load_config
        from settlements.pipeline import run

        cfg = load_config(pipeline_copy(lib_dir, args.pipeline, args.input_size))
        t = time.perf_counter()
        first = run(cfg, skip_unchanged=True)
        full = time.perf_counter() - t
        t = time.perf_counter()
        again = run(cfg, skip_unchanged=True)
        same = time.perf_counter() - t
        t = time.perf_counter()
        forced_report = run(cfg)
        forced = time.perf_counter() - t
        assert again.nothing_to_do and forced_report.embedding["tiles_embedded"] == 0
        print(f"{args.pipeline} in-process ({first.tiles['tiles']} tiles, {first.embedding['tiles_embedded']} embedded "
              "on the first run):")
        print(f"  full run          {full:8.2f} s")
        print(f"  unchanged rerun   {same:8.3f} s  = {same / full:6.2%} of the full run (nothing to do)")
        print(f"  forced rerun      {forced:8.2f} s  = {forced / full:6.1%} "
              f"({forced_report.embedding['tiles_reused']} tiles from the cache, 0 embedded)")


if __name__ == "__main__":
    main()
