"""Fuzz the config loader and the raster opener: no exception may escape except SettlementsError.

Hypothesis drives both targets:

- config: random text, random YAML structures (with the schema's own keys mixed in) and mutations
  of a real pipeline (a value replaced at a random key path) go through ``load_config``;
- rasters: small GeoTIFFs cut from the real scenes in ../shared/data (striped, tiled + deflate,
  LZW with nodata, with an internal mask) are truncated, bit-flipped, overwritten or spliced, then
  opened, checked, scaled and read as a tile, as the tile and embed stages do.

Every input is written under a temporary folder. Unexpected exceptions are collected (not raised),
so one run reports all of them. Usage::

    .venv/bin/python benchmarks/fuzz.py --examples 2000 [--seed 0] [--only config|rasters]

Exit code 0 when nothing unexpected escaped, 1 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

os.environ.setdefault("CPL_LOG", os.devnull)  # GDAL's own stderr chatter; failures surface as our errors

import numpy as np  # noqa: E402
import rasterio  # noqa: E402
import yaml  # noqa: E402
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from rasterio.windows import Window  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from settlements.config import RasterInput, load_config  # noqa: E402
from settlements.errors import SettlementsError  # noqa: E402
from settlements.rasters import compute_scaling, inspect_raster, open_raster, read_tile  # noqa: E402

log = logging.getLogger("fuzz")
DATA = ROOT / "data"

KEYS = ["name", "rasters", "regions", "tiling", "embedding", "clustering", "output", "labels", "path", "bands",
        "scaling", "method", "low", "high", "min", "max", "nodata", "wkt", "crs", "layer", "where", "id_field",
        "tile_size", "stride", "max_invalid_fraction", "backbone", "input_size", "k", "seed", "dir", "work_dir"]


class Tally:
    """Inputs tried per target, outcomes, and the unexpected exceptions with a sample input each."""

    def __init__(self) -> None:
        self.tried: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.unexpected: dict[str, tuple[str, str]] = {}

    def run(self, target: str, what: str, fn) -> None:  # noqa: ANN001
        self.tried[target] += 1
        try:
            fn()
        except SettlementsError as exc:
            msg = str(exc)
            if "\n" in msg:
                self._bad(target, f"multi-line SettlementsError {type(exc).__name__}", what, msg)
            self.outcomes[f"{target}: {type(exc).__name__}"] += 1
        except Exception as exc:  # the point: anything else is a bug
            self._bad(target, f"{type(exc).__module__}.{type(exc).__name__}", what, traceback.format_exc())
        else:
            self.outcomes[f"{target}: ok"] += 1

    def _bad(self, target: str, key: str, what: str, detail: str) -> None:
        self.outcomes[f"{target}: UNEXPECTED"] += 1
        self.unexpected.setdefault(f"{target}: {key}", (what, detail))


# ------------------------------------------------------------------------------------------ config

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=20), st.sampled_from(["240m", "8px", "0px", "-3m", "1e9km", "EPSG:4326",
                                                           "percentile", "resnet50", "*.tif", "[1, 2"]))
structures = st.recursive(scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=4),
    st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), kids, max_size=5)), max_leaves=25)


def _real_config() -> dict:
    path = ROOT / "pipelines" / "olinda.yaml"
    return yaml.safe_load(path.read_text()) if path.exists() else {"rasters": [{"path": "x.tif"}]}


def _mutate(tree: object, path: list[int], value: object) -> object:
    """Replace the value at a pseudo-random key path (indexes chosen modulo each level's size)."""
    if not path or not isinstance(tree, (dict, list)) or not tree:
        return value
    keys = list(tree.keys()) if isinstance(tree, dict) else list(range(len(tree)))
    k = keys[path[0] % len(keys)]
    out = dict(tree) if isinstance(tree, dict) else list(tree)
    out[k] = _mutate(tree[k], path[1:], value)  # type: ignore[index]
    return out


def config_inputs() -> st.SearchStrategy[tuple[str, bytes]]:
    base = _real_config()
    text = st.text(max_size=300).map(lambda s: ("text", s.encode("utf-8", "surrogatepass")))
    raw = st.binary(max_size=200).map(lambda b: ("bytes", b))
    struct = structures.map(lambda t: ("structure", yaml.safe_dump(t).encode()))
    mutated = st.tuples(st.lists(st.integers(0, 50), max_size=4), structures).map(
        lambda pv: ("mutation", yaml.safe_dump(_mutate(base, pv[0], pv[1])).encode()))
    return st.one_of(text, raw, struct, mutated)


def fuzz_config(tally: Tally, examples: int, folder: Path, seed_value: int | None = None) -> None:
    cfg_path = folder / "pipeline.yaml"

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(config_inputs())
    def target(item: tuple[str, bytes]) -> None:
        kind, content = item
        cfg_path.write_bytes(content)
        tally.run("config", f"{kind}: {content[:200]!r}", lambda: load_config(cfg_path))

    (target if seed_value is None else seed(seed_value)(target))()


# ------------------------------------------------------------------------------------------ rasters

def seed_rasters(folder: Path) -> list[Path]:
    """Small real GeoTIFFs in the layouts GDAL reads differently (the mutation starting points)."""
    sources = [DATA / "olinda_brazil" / "L7_ETMs.tif", DATA / "bangalore_s2" / "section_2_sentinel.tif",
               DATA / "swellendam_za" / "3420B_2010_328_RGB_LATLNG.tif"]
    layouts = [{}, {"tiled": True, "blockxsize": 16, "blockysize": 16, "compress": "deflate"},
               {"compress": "lzw", "nodata": 0}, {"tiled": True, "blockxsize": 32, "blockysize": 32, "mask": True}]
    seeds = []
    for src_path in sources:
        if not src_path.exists():
            continue
        with rasterio.open(src_path) as src:
            win = Window(src.width // 3, src.height // 3, 48, 40)
            data = src.read([1, 2, 3], window=win)
            profile = {"driver": "GTiff", "width": 48, "height": 40, "count": 3, "dtype": src.dtypes[0],
                       "crs": src.crs, "transform": src.window_transform(win)}
        for i, layout in enumerate(layouts):
            path = folder / f"seed-{src_path.stem}-{i}.tif"
            opts = {k: v for k, v in layout.items() if k != "mask"}
            with rasterio.open(path, "w", **profile, **opts) as dst:
                dst.write(data)
                if layout.get("mask"):
                    m = np.full((40, 48), 255, np.uint8)
                    m[:10] = 0
                    dst.write_mask(m)
            seeds.append(path)
    if not seeds:
        raise SystemExit("no real rasters under data/: link ../shared/data first")
    return seeds


@st.composite
def damaged(draw: st.DrawFn, seeds: list[bytes]) -> tuple[str, bytes]:
    base = bytearray(seeds[draw(st.integers(0, len(seeds) - 1))])
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "splice", "random", "header"]))
    n = len(base)
    if kind == "truncate":
        base = base[: draw(st.integers(0, n - 1))]
    elif kind == "flip":
        for _ in range(draw(st.integers(1, 16))):
            i = draw(st.integers(0, n - 1))
            base[i] ^= 1 << draw(st.integers(0, 7))
    elif kind == "overwrite":
        i = draw(st.integers(0, n - 1))
        chunk = draw(st.binary(min_size=1, max_size=64))
        base[i:i + len(chunk)] = chunk
    elif kind == "splice":
        other = seeds[draw(st.integers(0, len(seeds) - 1))]
        i, j = draw(st.integers(0, n - 1)), draw(st.integers(0, len(other) - 1))
        base = base[:i] + other[j:]
    elif kind == "header":  # the IFD and tag area: most parsing happens in the first few hundred bytes
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, min(n, 512) - 1))
            base[i] = draw(st.integers(0, 255))
    else:
        base = bytearray(draw(st.binary(max_size=2048)))
    return kind, bytes(base)


def _use_raster(path: Path, bands: list[int], method: str) -> None:
    """What the tile and embed stages do with a raster: inspect, scale, read a tile past the edge."""
    scaling = {"method": method} | ({"min": 0, "max": 255} if method == "range" else {})
    spec = RasterInput.model_validate({"path": path, "bands": bands, "scaling": scaling})
    info = compute_scaling(inspect_raster(path, spec), spec)
    with open_raster(path) as src:
        read_tile(src, info, Window(info.width - 8, info.height - 8, 16, 16))
        read_tile(src, info, Window(0, 0, 16, 16))


def fuzz_rasters(tally: Tally, examples: int, folder: Path, seed_value: int | None = None) -> None:
    seeds = [p.read_bytes() for p in seed_rasters(folder)]
    tif = folder / "fuzzed.tif"

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(damaged(seeds), st.sampled_from([[1, 2, 3], [1], [3, 2, 1]]),
           st.sampled_from(["percentile", "range", "dtype"]))
    def target(item: tuple[str, bytes], bands: list[int], method: str) -> None:
        kind, content = item
        tif.write_bytes(content)
        for sidecar in folder.glob("fuzzed.tif.*"):  # .aux.xml or .msk GDAL may leave
            sidecar.unlink()
        tally.run("rasters", f"{kind} ({len(content)} bytes), bands {bands}, {method}",
                  lambda: _use_raster(tif, bands, method))

    (target if seed_value is None else seed(seed_value)(target))()


# ------------------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000, help="inputs per target")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (random when omitted)")
    parser.add_argument("--only", choices=["config", "rasters"], default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    tally = Tally()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="settlements-fuzz-") as tmp:
        for name, fn in (("config", fuzz_config), ("rasters", fuzz_rasters)):
            if args.only in (None, name):
                t0 = time.time()
                fn(tally, args.examples, Path(tmp), args.seed)
                print(f"{name}: {tally.tried[name]} inputs in {time.time() - t0:.1f} s")
    for key, n in sorted(tally.outcomes.items()):
        print(f"  {key}: {n}")
    total = sum(tally.tried.values())
    print(f"total: {total} inputs tried in {time.time() - started:.1f} s; "
          f"{len(tally.unexpected)} kind(s) of unexpected exception")
    for key, (what, detail) in tally.unexpected.items():
        print(f"\nUNEXPECTED {key}\n  input: {what}\n{detail}")
    return 1 if tally.unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
