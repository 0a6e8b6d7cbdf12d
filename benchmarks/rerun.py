"""Time a rerun with nothing changed as a share of the full run (target: under 5 %).

Runs a shipped pipeline into a temporary folder three times through the command line, as a
scheduler would: a full first run, an unchanged rerun (exit 3, nothing to do) and a forced rerun
that re-exports everything from the embedding cache (``--force``). It prints wall times, including
Python start-up, and each as a ratio of the full run; then the same in-process (library call,
no start-up), where the unchanged rerun is only the state check.

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


def cli(config: Path, *args: str) -> tuple[float, int]:
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "settlements.cli", "run", str(config), *args], env=env,
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    if proc.returncode not in (0, 3):
        sys.exit(f"run failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return elapsed, proc.returncode


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
        full, _ = cli(config)
        same, code = cli(config)
        forced, _ = cli(config, "--force")
        print(f"{args.pipeline} via the command line (wall time incl. Python start-up):")
        print(f"  full run          {full:8.2f} s")
        print(f"  unchanged rerun   {same:8.2f} s  = {same / full:6.1%} of the full run (exit {code}: nothing to do)")
        print(f"  forced rerun      {forced:8.2f} s  = {forced / full:6.1%} (re-export from the embedding cache)")

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
