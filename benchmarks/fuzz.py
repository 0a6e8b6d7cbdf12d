"""Fuzz what users hand the pipeline: no exception may escape except a one-line SettlementsError.

Hypothesis drives four targets:

- config: random text, random YAML structures (with the schema's own keys mixed in) and mutations
  of a real pipeline (a value replaced at a random key path) go through ``load_config``;
- rasters: small GeoTIFFs cut from the real scenes in ../shared/data (striped, tiled + deflate,
  LZW with nodata, with an internal mask) are truncated, bit-flipped, overwritten or spliced, then
  opened, checked, scaled and read as a tile, as the tile and embed stages do;
- labels: random text and bytes (Latin-1 too), random structures under ``clusters`` and mutations of
  a labels file a real run wrote go through ``read_labels``;
- clusters: the ``clusters`` table (and the labels snapshot in ``runs``) of a GeoPackage a real run
  wrote is edited as a person with QGIS or sqlite could (values of every SQLite type, rows deleted,
  added or duplicated, the table dropped), then pulled into the labels file as ``labels pull`` does.

Every input is written under a temporary folder. Unexpected exceptions are collected (not raised),
so one run reports all of them. Usage::

    .venv/bin/python benchmarks/fuzz.py --examples 2000 [--seed 0] [--only config|rasters|labels|clusters]

Exit code 0 when nothing unexpected escaped, 1 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sqlite3
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
from settlements.labels import pull_edits, read_labels  # noqa: E402
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


# ------------------------------------------------------------------------------------------ labels

LABEL_KEYS = ["clusters", "name", "colour", "size", "anchors", 0, 1, 2, 3, -1, 300, "2", True, None]
label_scalars = st.one_of(scalars, st.sampled_from(["#00ff00", "#GGGGGG", "#abc", "water", " ", "", "集落"]),
                          st.lists(st.integers(-5, 10**6), max_size=4))
label_structures = st.recursive(label_scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=4),
    st.dictionaries(st.sampled_from(LABEL_KEYS), kids, max_size=5)), max_leaves=25)


def real_run(folder: Path) -> Path:
    """A small real run (Olinda, 64-pixel tiles, k=4): its labels file and GeoPackage seed two targets."""
    from settlements.pipeline import run

    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "fz.yaml"
    base = _real_config()
    base.update(name="fz", tiling={"tile_size": "64px"}, embedding={"input_size": 32, "num_workers": 0},
                clustering={"k": 4, "seed": 0},
                output={"dir": str(folder / "out"), "work_dir": str(folder / "work")})
    for raster in base["rasters"]:
        raster["path"] = str((ROOT / "pipelines" / raster["path"]).resolve())
    for region in base["regions"] if isinstance(base["regions"], list) else [base["regions"]]:
        region["path"] = str((ROOT / "pipelines" / region["path"]).resolve())
    config.write_text(yaml.safe_dump(base))
    run(load_config(config))
    return config


def labels_inputs(real: str) -> st.SearchStrategy[tuple[str, bytes]]:
    text = st.text(max_size=300).map(lambda s: ("text", s.encode("utf-8", "surrogatepass")))
    latin = st.text(alphabet=st.characters(max_codepoint=255), max_size=200).map(
        lambda s: ("latin-1", ("clusters:\n  0: {name: " + s + "}\n").encode("latin-1")))
    raw = st.binary(max_size=200).map(lambda b: ("bytes", b))
    struct = label_structures.map(lambda t: ("structure", yaml.safe_dump({"clusters": t}).encode()))
    base = yaml.safe_load(real)
    mutated = st.tuples(st.lists(st.integers(0, 50), max_size=4), label_structures).map(
        lambda pv: ("mutation", yaml.safe_dump(_mutate(base, pv[0], pv[1])).encode()))
    lines = real.splitlines(keepends=True)
    # a line duplicated or dropped, as a hand edit or a merge conflict leaves a file
    edited = st.tuples(st.integers(0, len(lines) - 1), st.booleans()).map(lambda ib: (
        "line", "".join(lines[:ib[0]] + ([lines[ib[0]]] * 2 if ib[1] else []) + lines[ib[0] + 1:]).encode()))
    return st.one_of(text, latin, raw, struct, mutated, edited)


def fuzz_labels(tally: Tally, examples: int, folder: Path, seed_value: int | None = None) -> None:
    real = _run_folder(folder)
    path = folder / "fuzzed.labels.yaml"

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(labels_inputs(real["labels"].read_text(encoding="utf-8")), st.integers(2, 12))
    def target(item: tuple[str, bytes], k: int) -> None:
        kind, content = item
        path.write_bytes(content)
        tally.run("labels", f"{kind}, k={k}: {content[:200]!r}", lambda: read_labels(path, k))

    (target if seed_value is None else seed(seed_value)(target))()


# ------------------------------------------------------------------------------------------ clusters

sql_values = st.one_of(st.none(), st.integers(-2, 10), st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=True),
                       st.text(max_size=12), st.sampled_from(["#ff00ff", "#FF00FF", " water ", "3", "1.0", ""]),
                       st.binary(max_size=8))
edits = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(["cluster", "label", "colour", "size"]), st.integers(0, 5), sql_values),
    st.tuples(st.just("delete"), st.integers(0, 5)),
    st.tuples(st.just("insert"), sql_values, sql_values, sql_values, sql_values),
    st.tuples(st.just("snapshot"), st.one_of(sql_values, label_structures.map(lambda t: yaml.safe_dump(t)))),
    st.tuples(st.just("drop"), st.sampled_from(["clusters", "runs"])),
)


def _edit(con: sqlite3.Connection, edit: tuple) -> None:
    if edit[0] == "set":
        _, column, row, value = edit
        con.execute(f"UPDATE clusters SET {column} = ? WHERE rowid = (SELECT rowid FROM clusters "
                    "ORDER BY rowid LIMIT 1 OFFSET ?)", (value, row))
    elif edit[0] == "delete":
        con.execute("DELETE FROM clusters WHERE rowid = (SELECT rowid FROM clusters ORDER BY rowid LIMIT 1 "
                    "OFFSET ?)", (edit[1],))
    elif edit[0] == "insert":
        con.execute("INSERT INTO clusters (cluster, label, colour, size) VALUES (?, ?, ?, ?)", edit[1:])
    elif edit[0] == "snapshot":
        con.execute("UPDATE runs SET labels = ?", (edit[1],))
    else:
        con.execute(f"DROP TABLE {edit[1]}")


def fuzz_clusters(tally: Tally, examples: int, folder: Path, seed_value: int | None = None) -> None:
    real = _run_folder(folder)
    gpkg, labels = folder / "fz.gpkg", folder / "fz.labels.yaml"
    written = folder / "written.labels.yaml"

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(edits, min_size=1, max_size=4))
    def target(changes: list[tuple]) -> None:
        shutil.copy(real["gpkg"], gpkg)
        shutil.copy(real["labels"], labels)
        written.unlink(missing_ok=True)
        con = sqlite3.connect(gpkg)
        try:
            with con:
                for change in changes:
                    _edit(con, change)
        except sqlite3.Error:  # e.g. a NOT NULL column or the primary key: QGIS could not save that either
            pass
        finally:
            con.close()

        def pull_and_read_back() -> None:
            pull_edits(gpkg, labels, "fz", 4, target=written)
            if written.exists():  # what was pulled must read back as a labels file
                read_labels(written, 4)

        tally.run("clusters", f"{changes!r}"[:300], pull_and_read_back)

    (target if seed_value is None else seed(seed_value)(target))()


_RUN: dict[str, Path] = {}


def _run_folder(folder: Path) -> dict[str, Path]:
    """The real run both label targets start from (made once per fuzz session)."""
    if not _RUN:
        config = real_run(folder / "run")
        cfg = load_config(config)
        _RUN.update(labels=cfg.labels_path, gpkg=cfg.output_dir / "fz.gpkg")
    return _RUN


# ------------------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000, help="inputs per target")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (random when omitted)")
    parser.add_argument("--only", choices=["config", "rasters", "labels", "clusters"], default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    tally = Tally()
    started = time.time()
    _RUN.clear()
    with tempfile.TemporaryDirectory(prefix="settlements-fuzz-") as tmp:
        targets = (("config", fuzz_config), ("rasters", fuzz_rasters), ("labels", fuzz_labels),
                   ("clusters", fuzz_clusters))
        for name, fn in targets:
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
