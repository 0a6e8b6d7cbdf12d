"""``settlements compare``: several pipelines' regions in one GeoPackage, their label shares side by side.

Pipelines that share a model (``clustering: {model: FILE}``, :mod:`settlements.transfer`) share one legend:
the same labels in the same order, with the same colours, raster codes and columns, so their ``regions``
layers concatenate as they are. This command does that, with a ``pipeline`` field, into one GeoPackage
(layer ``regions``, styled from the legend, and a ``pipelines`` table of each one's run, model and label
shares), and draws the label shares of every pipeline side by side (``<stem>_shares.png``). Each
pipeline's legend is read from its GeoPackage, as its last run wrote it; pipelines of different legends
are refused with one line saying which labels differ.
"""

from __future__ import annotations

import logging
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio

from .config import PipelineConfig
from .errors import ConfigError, LegendMismatchError, OutputError, StageError
from .export import plots
from .export.geopackage import write_geopackage
from .export.previous import clusters_rows
from .export.styles import vector_styles
from .palette import Legend, build_legend
from .products import outputs

log = logging.getLogger(__name__)

#: The per-cluster columns of a regions layer (``n_c0``, ``frac_c0``, ``km2_c0``, ...): meaningful across
#: pipelines only when they share a model's clusters.
_CLUSTER_COLUMN = re.compile(r"^(n|frac|km2)_c\d+$")
#: What ``compare`` writes into its GeoPackage: a file holding both is one it wrote (and may write again).
LAYERS = ("regions", "pipelines")


@dataclass(frozen=True)
class PipelineRegions:
    """One pipeline's regions layer and legend, as its last run wrote them."""

    name: str
    config: Path | None
    gpkg: Path
    legend: Legend
    k: int
    regions: gpd.GeoDataFrame
    run: dict[str, Any]


def shares_png(target: Path) -> Path:
    return target.with_name(f"{target.stem}_shares.png")


def check_target(cfgs: list[PipelineConfig], target: Path) -> None:
    """A ``.gpkg`` that is no pipeline's file, and if it exists, one ``compare`` wrote; two pipelines at least,
    of distinct names."""
    if len(cfgs) < 2:
        raise ConfigError("compare: give two pipeline configs or more")
    names = [c.name for c in cfgs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"compare: pipeline name(s) {', '.join(twice)} given twice; the 'pipeline' field would not "
                          "tell them apart")
    if target.suffix.lower() != ".gpkg":
        raise ConfigError(f"-o: {target}: expected a GeoPackage (.gpkg)")
    for cfg in cfgs:
        files = outputs(cfg)
        if target.resolve() in {p.resolve() for p in files.declared()} | {shares_png(p).resolve()
                                                                         for p in files.declared()}:
            raise OutputError(f"{target}: an output of pipeline '{cfg.name}'; compare writes a file of its own "
                              "(give -o another name)")
    if target.is_dir():
        raise OutputError(f"{target}: is a folder; give -o the GeoPackage's name")
    if target.exists():
        try:
            with sqlite3.connect(f"file:{target}?mode=ro", uri=True) as con:
                tables = {r[0] for r in con.execute("SELECT table_name FROM gpkg_contents")}
        except sqlite3.Error:
            tables = set()
        if not set(LAYERS) <= tables:
            raise OutputError(f"{target}: exists and is not a GeoPackage `settlements compare` wrote; nothing was "
                              "replaced (delete it, or give -o another name)")


def read_pipeline(cfg: PipelineConfig) -> PipelineRegions:
    """The pipeline's regions and legend from its GeoPackage (read-only: the file may come from anywhere)."""
    gpkg = outputs(cfg).gpkg
    if not gpkg.is_file():
        raise StageError(f"{gpkg}: missing; run `settlements run {cfg.source}` first")
    try:
        rows, _ = clusters_rows(gpkg)
        con = sqlite3.connect(f"file:{gpkg}?mode=ro", uri=True)
        try:
            columns = {r[1] for r in con.execute("PRAGMA table_info(runs)")}
            wanted = [c for c in ("run_id", "finished_utc", "model_sha256") if c in columns]
            last = con.execute(f"SELECT {', '.join(wanted)} FROM runs ORDER BY fid DESC LIMIT 1").fetchone()
        finally:
            con.close()
        names = {int(c): str(label) for c, label, _, _ in rows}
        colours: dict[int, str | None] = {int(c): str(colour) for c, _, colour, _ in rows}
        legend = build_legend(names, colours)
        regions = pyogrio.read_dataframe(gpkg, layer="regions")
    except (sqlite3.Error, ValueError, TypeError) as exc:
        raise ConfigError(f"{gpkg}: not a settlements GeoPackage with clusters, runs and regions "
                          f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    except Exception as exc:  # pyogrio's DataSourceError, DataLayerError
        raise ConfigError(f"{gpkg}: cannot read its regions layer ({str(exc).splitlines()[0]})") from None
    run = dict(zip(wanted, last, strict=True)) if last else {}
    return PipelineRegions(cfg.name, cfg.source, gpkg, legend, len(names), regions, run)


def legend_differences(a: PipelineRegions, b: PipelineRegions) -> list[str]:
    """How ``b``'s legend differs from ``a``'s: labels only in one, their order, their colours."""
    la, lb = a.legend, b.legend
    out = []
    only_a = [x for x in la.labels if x not in lb.labels]
    only_b = [x for x in lb.labels if x not in la.labels]
    if only_a:
        out.append(f"labels only in {a.name}: {', '.join(map(repr, only_a))}")
    if only_b:
        out.append(f"labels only in {b.name}: {', '.join(map(repr, only_b))}")
    common_a = [x for x in la.labels if x in lb.labels]
    common_b = [x for x in lb.labels if x in la.labels]
    if common_a != common_b:
        out.append(f"labels in another order: {a.name} {', '.join(map(repr, common_a))}; "
                   f"{b.name} {', '.join(map(repr, common_b))}")
    for x in common_a:
        if la.colour(x) != lb.colour(x):
            out.append(f"{x!r} is {la.colour(x)} in {a.name}, {lb.colour(x)} in {b.name}")
    return out


def check_legends(read: list[PipelineRegions]) -> Legend:
    """The one legend of every pipeline, or one :class:`LegendMismatchError` saying which labels differ."""
    first = read[0]
    for other in read[1:]:
        diffs = legend_differences(first, other)
        if diffs:
            raise LegendMismatchError(f"compare: pipelines {first.name} and {other.name} have different legends: "
                                      f"{'; '.join(diffs)}; pipelines given one model file "
                                      "(clustering: {model: FILE}) share one")
    return first.legend


def combined_regions(read: list[PipelineRegions]) -> tuple[gpd.GeoDataFrame, int]:
    """Every pipeline's regions, with a ``pipeline`` field first, in the first one's CRS; and the number of
    clusters whose columns they keep (0 where their cluster columns differ and were left out)."""
    crs = read[0].regions.crs
    frames = [r.regions.to_crs(crs) if r.regions.crs != crs else r.regions for r in read]
    columns = [list(f.columns) for f in frames]
    k = read[0].k
    if any(c != columns[0] for c in columns[1:]):
        frames = [f[[c for c in f.columns if not _CLUSTER_COLUMN.match(c)]] for f in frames]
        k = 0
        log.info("compare: the pipelines have other clusters; their per-cluster columns are left out")
        if any(list(f.columns) != list(frames[0].columns) for f in frames[1:]):
            raise ConfigError(f"compare: the regions layers of {read[0].name} and the others have other columns "
                              "(written by other versions?); run each pipeline again")
    parts = [f.assign(pipeline=r.name)[["pipeline", *f.columns]] for r, f in zip(read, frames, strict=True)]
    return gpd.GeoDataFrame(pd.concat(parts, ignore_index=True), geometry=parts[0].geometry.name, crs=crs), k


def shares_table(read: list[PipelineRegions], legend: Legend) -> pd.DataFrame:
    """Per pipeline: its run, model, regions, mapped km² and each label's km² and share of the mapped area."""
    rows = []
    for r in read:
        km2 = {x: float(r.regions.get(f"km2_{legend.key(x)}", pd.Series(dtype=float)).sum()) for x in legend.labels}
        mapped = sum(km2.values())
        rows.append({"pipeline": r.name, "config": str(r.config or ""), "gpkg": str(r.gpkg),
                     "run_id": r.run.get("run_id"), "model_sha256": r.run.get("model_sha256") or "",
                     "regions": int(len(r.regions)), "mapped_km2": mapped,
                     **{f"km2_{legend.key(x)}": v for x, v in km2.items()},
                     **{f"frac_{legend.key(x)}": (v / mapped if mapped > 0 else np.nan) for x, v in km2.items()}})
    return pd.DataFrame(rows)


def write_comparison(read: list[PipelineRegions], legend: Legend, gpkg: Path, png: Path) -> dict[str, Any]:
    """Write the GeoPackage and the figure to ``gpkg`` and ``png`` (staged paths: the caller commits them)."""
    regions, k = combined_regions(read)
    table = shares_table(read, legend)
    styles = [s for s in vector_styles(legend, k) if s.layer == "regions"]
    write_geopackage(gpkg, {"regions": regions, "pipelines": table}, styles)
    shares = pd.DataFrame({x: table[f"frac_{legend.key(x)}"].to_numpy() for x in legend.labels},
                          index=table["pipeline"].to_numpy()).fillna(0.0)
    plots.label_shares(png, shares, legend, "label shares of the mapped area, by pipeline",
                       table["mapped_km2"].tolist())
    return {"regions": int(len(regions)), "pipelines": [r.name for r in read], "shares": shares}
