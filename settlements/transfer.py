"""What a portable model means to the pipeline it is given: clusters, names, colours, networks, and fit.

A model file (:mod:`settlements.model_file`, written by ``settlements model export``) holds what made the
embeddings, the named clusters and, when trained, the top model and the fine-tuned network. Here they
become the pipeline's objects again: a :class:`~settlements.clustering.KMeansClusterer` of the model's
centroids, :class:`~settlements.labels.ClusterLabels` of its names and colours, a
:class:`~settlements.supervised.top_model.TopModel` and the fine-tuned network's state.

A pipeline may use a model only when it embeds its tiles as the model's pipeline did: the same backbone,
weights file (by SHA-256), layer, input size and band count (:func:`check_embedding`: one error naming
both values). Another pixel size, tile size on the ground or scaling is allowed, with one warning line
(:func:`ground_warning`) that the run records.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .config import PipelineConfig, Scaling
from .errors import ModelFileError, ModelMismatchError
from .labels import ClusterLabels
from .model_file import ModelFile, refused
from .palette import is_colour
from .store import settings_key

if TYPE_CHECKING:
    from .clustering import KMeansClusterer
    from .rasters import RasterInfo
    from .supervised.top_model import TopModel

#: Pixel or tile sizes on the ground within this share of each other count as the same.
GROUND_TOLERANCE = 0.1

#: Share of a pipeline's tiles lying farther from their centroid than 90 % of the model's own tiles did,
#: above which a run warns that its imagery differs from what the clusters were named on. Measured on
#: the Mumbai patches: 0.14-0.15 for half the patches against the other half (``benchmarks/transfer.py``),
#: 0.58 for the 37 patches of other source tiles against the 27 of ``tile_1.*`` (whose clusters still
#: found informal settlements there with F1 0.92), 1.0 for a patch at 1 m pixels and another scaling.
FAR_SHARE_WARNING = 0.75


def scaling_spec(s: Scaling) -> dict[str, Any]:
    """The settings of a scaling that change the pixels the CNN sees (the sample size does not)."""
    if s.method == "percentile":
        return {"method": s.method, "low": s.low, "high": s.high}
    if s.method == "range":
        return {"method": s.method, "min": s.min, "max": s.max}
    return {"method": s.method}


def describe_scaling(spec: dict[str, Any]) -> str:
    if spec.get("method") == "percentile":
        return f"percentile {spec.get('low'):g}-{spec.get('high'):g}"
    if spec.get("method") == "range":
        return f"range {spec.get('min')}-{spec.get('max')}"
    return str(spec.get("method"))


@dataclass(frozen=True)
class Embedder:
    """What makes a pipeline's embeddings: the facts a model must share with it."""

    backbone: str
    layer: str  # the graph node (resolved)
    input_size: int
    band_counts: tuple[int, ...]
    weights_sha256: str | None = None  # None: not resolved yet (checked once it is)


def embedder(cfg: PipelineConfig, layer: str, weights_sha256: str | None = None) -> Embedder:
    """What makes ``cfg``'s embeddings, its backbone cut at ``layer`` (the resolved node)."""
    e = cfg.embedding
    return Embedder(e.backbone, layer, e.input_size, tuple(len(r.bands) for r in cfg.rasters), weights_sha256)


def ground_sizes(infos: Sequence[RasterInfo], tiles: pd.DataFrame) -> tuple[float, float]:
    """The median pixel size and tile side on the ground (metres) over ``tiles`` (columns raster, tile_w)."""
    if not len(tiles):
        return math.nan, math.nan
    r = tiles["raster"].to_numpy(np.int64)
    pixel = np.asarray([(i.pixel_w_m + i.pixel_h_m) / 2 for i in infos])[r]
    return float(np.median(pixel)), float(np.median(pixel * tiles["tile_w"].to_numpy()))


def scalings(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """The distinct scalings of ``cfg``'s rasters."""
    out: list[dict[str, Any]] = []
    for spec in (scaling_spec(r.scaling) for r in cfg.rasters):
        if spec not in out:
            out.append(spec)
    return out


def _section(m: ModelFile, name: str) -> dict[str, Any]:
    value = m.header.get(name)
    if not isinstance(value, dict):
        raise refused(m.path, f"its header has no {name!r} section")
    return value


def check_embedding(m: ModelFile, here: Embedder) -> None:
    """Raise one :class:`ModelMismatchError` naming every difference (this pipeline's value and the model's)
    in what makes the embeddings: backbone, layer, input size, band count, weights."""
    e, im = _section(m, "embedding"), _section(m, "imagery")
    diffs = []
    for key, mine, theirs in (("embedding.backbone", here.backbone, e.get("backbone")),
                              ("embedding.layer", here.layer, e.get("layer")),
                              ("embedding.input_size", here.input_size, e.get("input_size"))):
        if mine != theirs:
            diffs.append(f"{key}: {mine} here, {theirs} in the model")
    model_counts = sorted(set(im.get("band_counts") or []))
    if sorted(set(here.band_counts)) != model_counts:
        diffs.append(f"rasters.bands: {'/'.join(map(str, sorted(set(here.band_counts))))} band(s) here, "
                     f"{'/'.join(map(str, model_counts))} in the model")
    theirs_sha = e.get("weights_sha256")
    if here.weights_sha256 is not None and here.weights_sha256 != theirs_sha:
        diffs.append(f"embedding.weights: SHA-256 {here.weights_sha256[:12]}... here, {str(theirs_sha)[:12]}... "
                     "in the model")
    if diffs:
        raise ModelMismatchError(f"{m.path}: made from other embeddings than this pipeline's: {'; '.join(diffs)}; "
                                 "embed as the model's pipeline did, or use a model made from these embeddings")


def _close(a: float, b: float) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= GROUND_TOLERANCE * max(abs(a), abs(b))


def ground_warning(m: ModelFile, pixel_m: float, tile_m: float, scalings: Sequence[dict[str, Any]]) -> str | None:
    """One line when this pipeline's pixels or tiles on the ground, or its scaling, differ from the model's
    (its clusters and networks then see other tiles than they were made on); None when they agree."""
    im = _section(m, "imagery")
    diffs = []
    if not _close(pixel_m, float(im.get("pixel_size_m", math.nan))):
        diffs.append(f"pixels of {pixel_m:.3g} m here, {float(im.get('pixel_size_m', math.nan)):.3g} m in the model")
    if not _close(tile_m, float(im.get("tile_size_m", math.nan))):
        diffs.append(f"tiles of {tile_m:.3g} m here, {float(im.get('tile_size_m', math.nan)):.3g} m in the model")
    theirs = im.get("scalings") or []
    other = [s for s in scalings if s not in theirs]
    if other:
        diffs.append(f"scaling {describe_scaling(other[0])} here, "
                     f"{' / '.join(describe_scaling(s) for s in theirs) or 'none recorded'} in the model")
    if not diffs:
        return None
    return f"{m.path}: {'; '.join(diffs)}: its clusters and networks may fit these tiles less well"


# ----------------------------------------------------------------------------------------- clusters

def clusters_section(m: ModelFile) -> dict[str, Any]:
    c = _section(m, "clusters")
    items = c.get("items")
    if not isinstance(items, list) or len(items) != c.get("k"):
        raise refused(m.path, "its clusters section does not list its k clusters")
    return c


def model_clusters(m: ModelFile) -> KMeansClusterer:
    """The model's clusters as k-means assigns with them: its centroids (and PCA basis), its normalisation."""
    from .clustering import KMeansClusterer

    c = clusters_section(m)
    km = KMeansClusterer(k=int(c["k"]), l2_normalize=bool(c["l2_normalize"]))
    centers = np.ascontiguousarray(m.array("clusters.centroids"), dtype=np.float32)
    if centers.ndim != 2 or len(centers) != km.k:
        raise refused(m.path, f"clusters.centroids has shape {centers.shape} for k={km.k}")
    km.cluster_centers_ = centers
    km.components_ = None
    if "clusters.components" in m.arrays:
        km.components_ = np.ascontiguousarray(m.array("clusters.components"), dtype=np.float32)
        km.mean_ = np.ascontiguousarray(m.array("clusters.mean"), dtype=np.float32)
        km.pca_dim = km.components_.shape[0]
    return km


def clusters_key(m: ModelFile) -> str:
    """What identifies the model's clusters (their centroids, basis and normalisation): equal keys, equal
    clusters, whatever else of the file (names, networks) changed."""
    parts = {name: a.tobytes().hex() for name, a in sorted(m.group("clusters").items())}
    return settings_key({"arrays": settings_key(parts), "l2": clusters_section(m)["l2_normalize"]})


def model_labels(m: ModelFile) -> ClusterLabels:
    """The model's cluster names and colours (each colour explicit: the legend the model's pipeline showed)."""
    items = clusters_section(m)["items"]
    try:
        names = {int(i["id"]): str(i["name"]) for i in items}
        colours: dict[int, str | None] = {int(i["id"]): str(i["colour"]) for i in items}
    except (KeyError, TypeError, ValueError):
        raise refused(m.path, "a cluster without id, name or colour") from None
    if sorted(names) != list(range(len(items))) or not all(is_colour(str(c)) for c in colours.values()):
        raise refused(m.path, "its clusters are not numbered 0 to k-1, each with a '#rrggbb' colour")
    return ClusterLabels(names, colours)


def label_snapshot(labels: ClusterLabels) -> dict[str, list[str | None]]:
    return {str(c): [labels.names[c], labels.colours.get(c)] for c in sorted(labels.names)}


def labels_to_write(model: ClusterLabels, key: str, current: ClusterLabels | None,
                    previous: dict[str, Any] | None, ran_before: bool) -> tuple[ClusterLabels | None, str]:
    """The labels file a run with this model writes (None: the file stays as it is), and why.

    The file starts from the model's names and colours and stays the analyst's: while the model's clusters
    stay the same (``key``), a name or colour the analyst left as the model gave it follows the model (a
    renamed cluster travels), one she changed stays hers. A file named for other clusters (the pipeline's
    own fit, another model: ``previous``, the last run's record of its model, or None) starts again from
    the model's. A file there before any run is the analyst's own, kept.
    """
    if current is None:
        return model, "written from the model's names and colours"
    if not ran_before:
        return None, ""
    if previous is None or previous.get("clusters_key") != key:
        return model, "rewritten from the model's names and colours: its clusters replace those it named"
    was = previous.get("labels") or {}
    names, colours = dict(current.names), dict(current.colours)
    followed = []
    for cid, name in model.names.items():
        before = was.get(str(cid))
        mine = [current.names.get(cid), current.colours.get(cid)]
        theirs = [name, model.colours.get(cid)]
        if before is not None and mine == list(before) and theirs != mine:
            names[cid], colours[cid] = name, theirs[1]
            followed.append(cid)
    if not followed:
        return None, ""
    return (ClusterLabels(names, colours, current.anchors),
            f"clusters {followed} follow the model's new names or colours (the others are as the analyst left them)")


def distance_statistics(clusters: np.ndarray, distances: np.ndarray, k: int) -> list[dict[str, float]]:
    """Per cluster: its tiles' count and share, and the median, 90th percentile and largest distance to
    the centroid: how tight each cluster was where it was named."""
    total = max(len(clusters), 1)
    out = []
    for c in range(k):
        d = distances[clusters == c]
        q = np.quantile(d, [0.5, 0.9]) if len(d) else [math.nan, math.nan]
        out.append({"size": int(len(d)), "share": round(len(d) / total, 6), "distance_median": float(q[0]),
                    "distance_p90": float(q[1]), "distance_max": float(d.max()) if len(d) else math.nan})
    return out


def far_share(m: ModelFile, clusters: np.ndarray, distances: np.ndarray) -> float:
    """Share of these tiles farther from their centroid than 90 % of the model's own tiles of that cluster."""
    p90 = np.asarray([float(i.get("distance_p90", math.nan)) for i in clusters_section(m)["items"]])
    limit = p90[np.asarray(clusters, dtype=np.int64)]
    known = np.isfinite(limit)
    return float((distances[known] > limit[known]).mean()) if known.any() else math.nan


def far_warning(m: ModelFile, share: float) -> str | None:
    if not share > FAR_SHARE_WARNING:
        return None
    return (f"{m.path}: {share:.0%} of these tiles lie farther from their cluster's centroid than 90 % of the "
            "model's own tiles did: the imagery differs from what its clusters were named on (look at atlas.png)")


# ----------------------------------------------------------------------------------------- networks

def networks(m: ModelFile) -> list[str]:
    """The supervised networks the file holds: ``top_model``, ``fine_tuned``."""
    return [name for name in ("top_model", "fine_tuned") if isinstance(m.header.get(name), dict)]


def _tensors(m: ModelFile, prefix: str) -> dict[str, Any]:
    import torch

    arrays = m.group(prefix)
    if not arrays:
        raise refused(m.path, f"no arrays of its {prefix}")
    return {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}


def top_model_of(m: ModelFile) -> tuple[TopModel, bool]:
    """The file's top model, and whether it sees each tile beside its neighbours' mean."""
    from .supervised.top_model import TopModel

    if "top_model" not in networks(m):
        raise ModelFileError(f"{m.path}: holds no top model (its pipeline was not trained); export one after "
                             "`settlements train`")
    t = m.header["top_model"]
    state = {"params": t.get("params"), "classes": t.get("classes"), "dim": t.get("dim"),
             "head": _tensors(m, "top_model"), "n_train": t.get("n_train")}
    return TopModel.from_state(state, m.path), t.get("neighbours") is True


def fine_tuned_state(m: ModelFile) -> dict[str, Any]:
    """The file's fine-tuned network as :meth:`~settlements.supervised.finetune.FineTuner.from_state` takes it."""
    if "fine_tuned" not in networks(m):
        raise ModelFileError(f"{m.path}: holds no fine-tuned network (its pipeline did not fine tune)")
    f = m.header["fine_tuned"]
    return {"params": f.get("params"), "classes": f.get("classes"), "model": _tensors(m, "fine_tuned"),
            "history": f.get("history", []), "best_epoch": f.get("best_epoch"), "trainable": f.get("trainable", []),
            "head_hidden": f.get("head_hidden"), "extra": {}}


def summary(m: ModelFile) -> list[str]:
    """What the file holds, as ``settlements model show`` prints it."""
    e, im, c = _section(m, "embedding"), _section(m, "imagery"), clusters_section(m)
    names = pd.Series([i["name"] for i in c["items"]]).value_counts(sort=False)
    out = [f"{m.path}: settlements model, format {m.header.get('format_version')}, SHA-256 {m.sha256}",
           f"  from pipeline {m.header.get('pipeline')!r} (run {m.header.get('run_id')})",
           f"  embeddings: {e.get('backbone')} cut at {e.get('layer')} ({e.get('dim')}-d), input "
           f"{e.get('input_size')} px, weights SHA-256 {str(e.get('weights_sha256'))[:12]}...",
           f"  imagery: {'/'.join(map(str, im.get('band_counts', [])))} band(s), pixels {im.get('pixel_size_m'):.3g} m,"
           f" tiles {im.get('tile_size_m'):.3g} m, scaling "
           f"{' / '.join(describe_scaling(s) for s in im.get('scalings', []))}",
           f"  clusters: k={c['k']} (L2 {c['l2_normalize']}, neighbour weight {c['neighbour_weight']}), named "
           + ", ".join(f"{n} ({v})" for n, v in names.items())]
    for name in networks(m):
        net = m.header[name]
        out.append(f"  {name.replace('_', ' ')}: classes {', '.join(net.get('classes', []))}")
    return out
