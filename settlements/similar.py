"""``settlements similar``: every tile ranked by likeness to an analyst's example tiles.

"I know these five blocks are informal settlements; where else are there places like them?" The
examples (tiles under polygons drawn in any vector file, e.g. the ``examples`` layer every run puts
in its GeoPackage, or tile ids) become one query in the run's embedding space
(:mod:`settlements.search`): the mean direction of the examples, refined once by the tiles it finds
first (query expansion); with negatives, the weights of a logistic regression of examples against
negatives. The matching tiles (the likest ``--top`` N, or every tile scoring at least
``--threshold``) and the examples go into the run's GeoPackage as layer ``similar_<name>`` (rank,
score, is_example; a graduated style on score from the legend), with ``similar_<name>_regions``:
per region the count, share and km² of similar tiles, counted as the label histograms are.

The result is a labelled-tile map (similar or not; :mod:`settlements.export.tile_map`) added to a copy
of the GeoPackage, with the QGIS project rewritten to show it; both are renamed into place at the
command's commit (:func:`settlements.pipeline.similar`), under the pipeline's lock, so a killed command
leaves them as they were and a run can never interleave. Later runs keep the result layers
(:func:`settlements.similar_examples.analyst_layers`). Nothing but geometries is read from the
examples' file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd

from .config import EXACT_MAX_TILES, QUERY_EXPANSION, SIMILAR_LINEAR_C, PipelineConfig, SimilarOptions
from .errors import ExamplesError, StageError
from .export.geopackage import LayerStyle, copy_geopackage
from .export.qgis_project import write_pipeline_project
from .export.styles import graduated_qml
from .export.tile_map import TileMap, named_as_final, similar_layers, tile_map, write_tile_map
from .neighbours import tile_neighbours
from .palette import build_legend, slug
from .products import MapFiles, outputs
from .rasters import RasterInfo, load_infos
from .reprocess import keep_recorded
from .search import Index, Space, exact_scores, search_space, unit
from .similar_examples import analyst_layer_names, select_tiles
from .store import Workspace, read_table
from .tile_tables import kept_tiles, tiles_by_row

log = logging.getLogger(__name__)

#: The label of similar tiles in the per-region summary (columns n_similar, frac_similar, km2_similar).
SIMILAR, OTHER = "similar", "other"

SIMILAR_ALIASES = {"tile_id": "Tile", "rank": "Rank (0 = example)", "score": "Score",
                   "similarity": "Own similarity (without neighbours)", "is_example": "Example",
                   "cluster": "Cluster", "label": "Label", "region_id": "Region", "raster": "Source raster",
                   "row": "Grid row", "col": "Grid column"}
SUMMARY_ALIASES = {"region_id": "Region id", "region_name": "Region", "area_km2": "Area (km²)",
                   "mapped_km2": "Mapped area (km²)", "n_tiles": "Tiles", "n_similar": "Similar tiles",
                   "frac_similar": "Share similar", "km2_similar": "Area similar (km²)"}


@dataclass
class Ranking:
    """The scored tiles, best first: embedding rows, scores, and how they were found."""

    rows: np.ndarray
    scores: np.ndarray
    exact: bool
    method: str
    similarity: np.ndarray  # each tile's own similarity (the score without its neighbours)
    examples: pd.DataFrame | None = None  # the examples' rows, scores and similarities
    cutoff: float | None = None  # the lowest matching score


def cosine_query(space: Space, examples: np.ndarray, expand: int, index: Index | None) -> np.ndarray:
    """The mean direction of the examples and of the ``expand`` tiles most like any one of them.

    Examples differ (a dense core, a mixed edge): the tiles nearest *some* example (the largest cosine)
    are sure neighbours, and averaging them with the examples (average query expansion) pulls the
    query to what they all share, where the examples' plain mean leans towards the odd one out.
    """
    ex = space.vectors(examples)
    if expand <= 0:
        return unit(ex.mean(axis=0, keepdims=True))[0]
    if index is not None:
        rows, _ = index.top(ex, expand + len(examples))
        near = rows[~np.isin(rows, examples)][:expand]
    else:
        first = exact_scores(space, ex)
        first[examples] = -np.inf
        near = np.argpartition(-first, expand)[:expand] if len(first) > expand else np.arange(len(first))
    return unit(np.concatenate([ex, space.vectors(np.sort(near))]).mean(axis=0, keepdims=True))[0]


def linear_query(space: Space, examples: np.ndarray, negatives: np.ndarray) -> tuple[np.ndarray, float]:
    """A class-balanced logistic regression, examples against negatives, in the space: its weights, intercept."""
    from sklearn.linear_model import LogisticRegression

    x = np.concatenate([space.vectors(examples), space.vectors(negatives)])
    y = np.r_[np.ones(len(examples)), np.zeros(len(negatives))]
    model = LogisticRegression(C=SIMILAR_LINEAR_C, class_weight="balanced", max_iter=5000).fit(x, y)
    return model.coef_[0].astype(np.float32), float(model.intercept_[0])


@dataclass(frozen=True)
class Neighbours:
    """Each tile's neighbours on the ground, as embedding rows: the eight around it, across files
    (:func:`settlements.neighbours.tile_neighbours`), in compressed rows."""

    indptr: np.ndarray
    indices: np.ndarray

    @classmethod
    def of(cls, tiles: pd.DataFrame, n: int, infos: list[RasterInfo]) -> Neighbours:
        """``tiles``: kept tiles with ``emb_row`` and the tile table's columns; ``n`` embedding rows."""
        ring = tile_neighbours(tiles, infos)  # positions in ``tiles``
        emb_row = tiles["emb_row"].to_numpy()
        full = np.full((n, ring.shape[1]), -1, dtype=np.int64)
        full[emb_row] = np.where(ring >= 0, emb_row[np.maximum(ring, 0)], -1)
        has = full >= 0
        return cls(np.concatenate([[0], np.cumsum(has.sum(axis=1))]).astype(np.int64), full[has])

    def _of(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The neighbours of ``rows`` and, for each, its position in ``rows``."""
        counts = np.diff(self.indptr)
        if len(rows) == len(counts) and np.array_equal(rows, np.arange(len(counts))):
            return self.indices, np.repeat(np.arange(len(rows)), counts)
        parts = [self.indices[self.indptr[r]:self.indptr[r + 1]] for r in rows]
        return (np.concatenate(parts) if parts else np.empty(0, np.int64)), np.repeat(np.arange(len(rows)),
                                                                                       counts[rows])

    def of_rows(self, rows: np.ndarray) -> np.ndarray:
        return np.unique(self._of(rows)[0])

    def smooth(self, rows: np.ndarray, own: np.ndarray, score: pd.Series, weight: float) -> np.ndarray:
        """``(1 - weight) * own + weight * (mean score of the neighbours)`` for ``rows`` (own where none);
        ``score``: scores by embedding row, the neighbours' included."""
        nb, at = self._of(rows)
        values = score.to_numpy()[nb] if score.index.equals(pd.RangeIndex(len(score))) else score.loc[nb].to_numpy()
        counts = np.bincount(at, minlength=len(rows))
        sums = np.bincount(at, weights=values, minlength=len(rows))
        own = np.asarray(own, dtype=np.float64)
        return np.where(counts > 0, (1 - weight) * own + weight * sums / np.maximum(counts, 1), own)


def rank(space: Space, examples: np.ndarray, negatives: np.ndarray, opts: SimilarOptions,
         neighbours: Neighbours | None = None) -> Ranking:
    """Score tiles against the examples (embedding rows): exact, or through the cached index for a large run.

    With ``neighbours`` and ``opts.context`` w > 0, a tile's score is (1 - w) x its own similarity + w x
    the mean similarity of its neighbours: settlements are contiguous, and a tile among tiles like the
    examples is surer to be one than a lone look-alike.
    """
    n = len(space.rows)
    use_index = opts.index == "ivf" or (opts.index == "auto" and n > EXACT_MAX_TILES)
    index = Index(space, opts.nprobe) if use_index else None
    w = opts.context if neighbours is not None else 0.0
    bias: float | None = None
    if len(negatives):
        query, bias = linear_query(space, examples, negatives)
        method = "logistic regression"
    else:
        query, method = cosine_query(space, examples, QUERY_EXPANSION, index), "cosine"
    method += f", neighbours {w:g}" if w else ""

    def to_score(ip: np.ndarray) -> np.ndarray:
        """Cosine as it is; with a linear model, the probability of being like the examples."""
        return np.asarray(ip if bias is None else 1 / (1 + np.exp(-(ip + bias))), dtype=np.float64)

    if index is None:
        own = to_score(exact_scores(space, query))
        rows = np.arange(n)
        score = own if not w else neighbours.smooth(rows, own, pd.Series(own), w)  # type: ignore[union-attr]
        order = np.argsort(-score, kind="stable")
        ranking = Ranking(order, score[order], True, method, own[order])
    else:
        if opts.threshold is not None:  # the score is at most (1 - w) x own + w: candidates have own >= that
            least = (opts.threshold - w) / (1 - w)
            ip_least = least if bias is None else _logit(min(max(least, 1e-9), 1 - 1e-9)) - bias
            rows, ip = index.above(query, ip_least)
        else:
            assert opts.top is not None
            rows, ip = index.top(query, (opts.top + len(examples)) * (3 if w else 1))
        missing = np.setdiff1d(examples, rows)  # the examples are scored too, whether found or not
        rows = np.r_[rows, missing]
        own = to_score(np.r_[ip, space.vectors(missing) @ query if len(missing) else np.empty(0)])
        score = own
        if w:
            around = np.setdiff1d(neighbours.of_rows(rows), rows)  # type: ignore[union-attr]
            known = pd.Series(np.r_[own, to_score(space.vectors(around) @ query)], index=np.r_[rows, around])
            score = neighbours.smooth(rows, own, known, w)  # type: ignore[union-attr]
        order = np.argsort(-score, kind="stable")
        ranking = Ranking(rows[order], score[order], False, f"{method} (IVF index)", own[order])
    return _cut(ranking, examples, opts)


def _logit(p: float) -> float:
    if not 0 < p < 1:
        raise ExamplesError(f"--threshold: with negatives the score is a probability; expected 0 < D < 1, got {p:g}")
    return float(np.log(p / (1 - p)))


def _cut(r: Ranking, examples: np.ndarray, opts: SimilarOptions) -> Ranking:
    """The matching tiles: the best ``top`` that are not examples, or those scoring at least ``threshold``;
    the examples apart (their scores where they were scored)."""
    others = ~np.isin(r.rows, examples)
    if opts.threshold is not None:
        match = others & (r.scores >= opts.threshold)
    else:
        match = others & (np.cumsum(others) <= (opts.top or 0))
    cutoff = float(r.scores[match].min()) if match.any() else None
    scored = pd.DataFrame({"row": r.rows[~others], "score": r.scores[~others], "similarity": r.similarity[~others]})
    ex = pd.DataFrame({"row": np.asarray(examples, dtype=np.int64)}).merge(scored, on="row", how="left")
    return Ranking(r.rows[match], r.scores[match], r.exact, r.method, r.similarity[match], ex, cutoff)


@dataclass
class SimilarReport:
    layer: str
    regions_layer: str
    examples: int
    negatives: int
    matches: int
    method: str
    exact: bool
    cutoff: float | None
    seconds: float
    gpkg: Path


@dataclass
class Query:
    """A finished query: its result map and styles, to be committed into ``gpkg``."""

    name: str
    map: TileMap
    styles: list[LayerStyle]
    found: Ranking
    examples: int
    negatives: int
    gpkg: Path
    record: dict[str, object]

    def report(self, seconds: float) -> SimilarReport:
        layers = similar_layers(self.name)
        return SimilarReport(layers.tiles, layers.regions, self.examples, self.negatives, len(self.found.rows),
                             self.found.method, self.found.exact, self.found.cutoff, seconds, self.gpkg)


def query(cfg: PipelineConfig, ws: Workspace, examples: str, layer: str | None, negatives: str | None,
          negatives_layer: str | None, opts: SimilarOptions) -> Query:
    """Find the tiles like the examples (and unlike the negatives) in the run's work folder ``ws``; writes
    nothing but the search cache."""
    gpkg = outputs(cfg).gpkg
    if not gpkg.is_file() or not ws.embeddings.exists():
        raise StageError(f"{gpkg}: no outputs of pipeline '{cfg.name}' yet; run `settlements run {cfg.source}` "
                         "first")
    tiles, infos = kept_tiles(ws), load_infos(ws)
    ex_ids, source = select_tiles(examples, layer, "examples", "--examples", infos, tiles)
    neg_ids = np.empty(0, np.int64)
    if negatives is not None:
        neg_ids, _ = select_tiles(negatives, negatives_layer, "negatives", "--negatives", infos, tiles)
        both = np.intersect1d(ex_ids, neg_ids)
        if len(both):
            raise ExamplesError(f"--negatives: tile(s) {', '.join(map(str, both[:10]))} are also examples; "
                                "a tile is one or the other")
    row_of = pd.Series(tiles["emb_row"].to_numpy(), index=tiles["tile_id"].to_numpy())
    ex_rows, neg_rows = row_of.loc[ex_ids].to_numpy(), row_of.loc[neg_ids].to_numpy()
    space = search_space(ws)
    found = rank(space, ex_rows, neg_rows, opts, Neighbours.of(tiles, len(space.rows), infos) if opts.context else None)
    name = opts.name or slug(source) or "examples"
    result = result_map(cfg, ws, tiles_by_row(cfg, ws), found, infos)
    record: dict[str, object] = {"layer": similar_layers(name).tiles, "examples": examples, "negatives": negatives,
                                 "method": found.method, "cutoff": found.cutoff, "identity": space.identity}
    return Query(name, result, result_styles(result, name), found, len(ex_ids), len(neg_ids), gpkg, record)


def write(cfg: PipelineConfig, ws: Workspace, q: Query) -> None:
    """Stage a copy of the GeoPackage with the query's layers, and the QGIS project showing them, in ``ws``'s
    commit (renamed into place when it ends)."""
    assert ws.commit is not None
    files = outputs(cfg)
    stage = ws.out_dir(cfg.output_dir)
    staged = files.cluster_map.in_folder(stage)
    with named_as_final(stage, cfg.output_dir):
        copy_geopackage(q.gpkg, staged.gpkg)
        write_tile_map(q.map, MapFiles(staged.gpkg), similar_layers(q.name), q.styles, cfg.output.max_plot_regions,
                       into_existing=True)
        project = write_pipeline_project(files, stage, load_infos(ws), f"settlements: {cfg.name}",
                                         analyst_layer_names(staged.gpkg))
    keep_recorded(cfg, ws.commit, {files.gpkg: staged.gpkg, files.project: project})
    log.info("similar: %s", json.dumps({**q.record, "utc": datetime.now(timezone.utc).isoformat(timespec="seconds")},
                                       default=str))


def result_map(cfg: PipelineConfig, ws: Workspace, frame: gpd.GeoDataFrame, found: Ranking, infos: list[RasterInfo]
               ) -> TileMap:
    """The result as a map of two labels, similar or not: its tile layer the examples and the matching tiles
    (``rank`` 0 and 1, 2, ...), its region layer the per-region summary of the similar tiles."""
    by_row = frame.set_index("emb_row", drop=False)
    matched = by_row.loc[found.rows].assign(rank=np.arange(1, len(found.rows) + 1, dtype=np.int64),
                                            score=found.scores, similarity=found.similarity, is_example=False)
    assert found.examples is not None
    ex = found.examples.sort_values("score", ascending=False, kind="stable")
    examples = by_row.loc[ex["row"].to_numpy()].assign(rank=np.int64(0), score=ex["score"].to_numpy(),
                                                       similarity=ex["similarity"].to_numpy(), is_example=True)
    hits = pd.concat([examples, matched], ignore_index=True)
    columns = ["tile_id", "rank", "score", "similarity", "is_example", "cluster", "label", "region_id", "raster",
               "row", "col", "geometry"]
    hits = gpd.GeoDataFrame(hits[columns], geometry="geometry", crs=frame.crs)
    meta = read_table(ws.embedded, "embed")
    every = read_table(ws.tiles, "tile").merge(meta[["tile_id", "kept", "valid_cell"]], on="tile_id")
    is_similar = every["tile_id"].isin(set(hits["tile_id"].tolist())).to_numpy()
    label = np.where(is_similar, SIMILAR, OTHER).astype(object)
    label[~every["kept"].to_numpy(dtype=bool)] = None  # not kept: in no histogram
    every["label"] = label
    legend = build_legend({0: SIMILAR, 1: OTHER}, {})
    m = tile_map(every, hits, read_table(ws.shares, "tile"), gpd.read_parquet(ws.regions), [i.crs for i in infos],
                 cfg.output.crs, legend, (f"{cfg.name}: tiles like the examples", f"{cfg.name}: share similar"))
    keep = ["region_id", "region_name", "area_km2", "mapped_km2", "n_tiles", "n_similar", "frac_similar",
            "km2_similar", "geometry"]
    return replace(m, regions=m.regions[keep])


def score_breaks(values: np.ndarray, classes: int = 5) -> list[float]:
    """Quantile class breaks of ``values`` (distinct, rising; at least one range)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return [0.0, 1.0]
    breaks = np.unique(np.quantile(v, np.linspace(0, 1, classes + 1)))
    if len(breaks) < 2:
        breaks = np.array([breaks[0], breaks[0] + 1e-9])
    return [float(b) for b in breaks]


def result_styles(m: TileMap, name: str) -> list[LayerStyle]:
    """Graduated default styles from the palette's score ramp: tiles by score, regions by share similar."""
    layers = similar_layers(name)
    tip = "<b>rank [% \"rank\" %]</b> (0 = example), score [% format_number(\"score\", 3) %]<br>[% \"label\" %]"
    frac = m.regions["frac_similar"].to_numpy()
    top = float(np.nanmax(frac)) if len(frac) and np.nanmax(frac) > 0 else 1.0
    region_tip = ("<b>[% \"region_name\" %]</b><br>similar: [% format_number(\"frac_similar\" * 100, 1) %] % "
                  "([% \"n_similar\" %] tiles, [% format_number(\"km2_similar\", 3) %] km²)")
    return [
        LayerStyle(layers.tiles, "settlements similarity", graduated_qml("score", score_breaks(m.tiles["score"]),
                                                                         SIMILAR_ALIASES, 0.02, tip, '"rank"'),
                   "tiles like the examples, coloured by score"),
        LayerStyle(layers.regions, "settlements share similar",
                   graduated_qml("frac_similar", [float(v) for v in np.linspace(0, top, 6)], SUMMARY_ALIASES, 0.2,
                                 region_tip, '"region_name"'),
                   "regions coloured by their share of tiles like the examples"),
    ]
