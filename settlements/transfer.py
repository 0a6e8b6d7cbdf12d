"""What a portable model means to the pipeline it is given: clusters, names, colours, networks, and fit.

A model file (:mod:`settlements.model_file`, written by ``settlements model export``) holds what made the
embeddings, the named clusters and, when trained, the top model and the fine-tuned network. Its header
is one typed schema (:class:`Header`), which the exporter writes and every reader checks
(:func:`load_model`): a file from elsewhere with a field of another type is one error line, never a
failure halfway. Here the model becomes the pipeline's objects again: a
:class:`~settlements.clustering.KMeansClusterer` of its centroids, :class:`~settlements.labels.ClusterLabels`
of its names and colours, a :class:`~settlements.supervised.top_model.TopModel` and the fine-tuned
network's state.

A pipeline may use a model only when it embeds its tiles as the model's pipeline did: the same backbone,
weights file (by SHA-256), layer, input size and band count (:func:`check_embedding`: one error naming
both values). Another pixel size, tile size on the ground or scaling is allowed, with one warning line
(:func:`ground_warning`) that the run records.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import PipelineConfig, Scaling
from .errors import ModelFileError, ModelMismatchError
from .labels import ClusterLabels
from .model_file import ModelFile, read_model_file, refused
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


# --------------------------------------------------------------------------------------- the header

class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class EmbeddingPart(_Part):
    """What made the embeddings."""

    backbone: str
    layer: str
    dim: int = Field(ge=1)
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    input_size: int = Field(ge=1)
    precision: str | None = None
    normalisation: dict[str, list[float]]


class ImageryPart(_Part):
    """What the tiles were: bands, scaling, and their size on the ground (medians)."""

    band_counts: list[int] = Field(min_length=1)
    scalings: list[dict[str, Any]]
    pixel_size_m: float
    tile_size_m: float
    tile_size: str
    stride: str
    dtypes: list[str]


class ClusterItem(_Part):
    """One named cluster: how many tiles it had where it was named, and how tight it was."""

    id: int = Field(ge=0)
    name: str = Field(min_length=1)
    colour: str = Field(pattern=r"^#[0-9a-fA-F]{6}$")
    size: int = Field(ge=0)
    share: float
    distance_median: float
    distance_p90: float
    distance_max: float
    anchors: int = 0


class ClustersPart(_Part):
    k: int = Field(ge=2, le=255)
    l2_normalize: bool
    neighbour_weight: float = Field(ge=0, le=1)
    pca_dim: int | None = Field(default=None, ge=2)
    seed: int | None = None
    items: list[ClusterItem]


class LegendPart(_Part):
    labels: list[str]
    colours: list[str]
    codes: list[int]
    column_keys: list[str]


class TopModelParams(_Part):
    """:class:`~settlements.supervised.top_model.TopModel`'s settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    hidden: int = Field(ge=0)
    C: float = Field(gt=0)  # noqa: N815
    weight_decay: float = Field(ge=0)
    lr: float = Field(gt=0)
    epochs: int = Field(ge=1)
    seed: int = Field(ge=0)
    l2_normalize: bool
    standardise: bool


class TopModelPart(_Part):
    classes: list[str] = Field(min_length=2)
    params: TopModelParams
    dim: int = Field(ge=1)
    neighbours: bool
    n_train: int | None = None


class FineTunedParams(_Part):
    """:class:`~settlements.supervised.finetune.FineTuner`'s settings (no path, no device of the machine
    that trained it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    backbone: str
    layer: str
    weights: None = None
    input_size: int = Field(ge=1)
    unfreeze: int = Field(ge=1)
    lr: float = Field(gt=0)
    epochs: int = Field(ge=1)
    patience: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    augment: bool
    max_shift: float = Field(ge=0, lt=0.5)
    seed: int = Field(ge=0)
    device: str = "auto"
    num_workers: int = 0


class FineTunedPart(_Part):
    classes: list[str] = Field(min_length=2)
    params: FineTunedParams
    head_hidden: int = Field(ge=0)
    trainable: list[str]
    best_epoch: int | None = None
    history: list[dict[str, Any]] = Field(default_factory=list)


class Header(_Part):
    """``model.json``: what a model file holds (its format and version are :mod:`settlements.model_file`'s)."""

    settlements_version: str
    pipeline: str
    run_id: str | None = None
    embedding: EmbeddingPart
    imagery: ImageryPart
    clusters: ClustersPart
    legend: LegendPart
    top_model: TopModelPart | None = None
    fine_tuned: FineTunedPart | None = None


@dataclass(frozen=True)
class Model:
    """A model file, read as data and its header checked."""

    file: ModelFile
    header: Header

    @property
    def path(self) -> Path:
        return self.file.path

    @property
    def sha256(self) -> str:
        return self.file.sha256

    def networks(self) -> list[str]:
        """The supervised networks the file holds: ``top_model``, ``fine_tuned``."""
        return [name for name in ("top_model", "fine_tuned") if getattr(self.header, name) is not None]


def load_model(path: Path) -> Model:
    """The model file at ``path`` (:func:`~settlements.model_file.read_model_file`), its header checked against
    :class:`Header`: one :class:`ModelFileError` line naming the field otherwise."""
    m = read_model_file(path)
    try:
        header = Header.model_validate(m.header)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise refused(path, f"{where}: {err['msg']}") from None
    items = header.clusters.items
    if len(items) != header.clusters.k or [i.id for i in items] != list(range(header.clusters.k)):
        raise refused(path, "clusters.items: not the clusters 0 to k-1")
    return Model(m, header)


# ---------------------------------------------------------------------------------------- the checks

def scaling_spec(s: Scaling) -> dict[str, Any]:
    """The settings of a scaling that change the pixels the CNN sees (the sample size does not)."""
    if s.method == "percentile":
        return {"method": s.method, "low": s.low, "high": s.high}
    if s.method == "range":
        return {"method": s.method, "min": s.min, "max": s.max}
    return {"method": s.method}


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def describe_scaling(spec: dict[str, Any]) -> str:
    """'percentile 2-98', 'range 0-255', 'dtype'."""
    if spec.get("method") == "percentile":
        return f"percentile {_number(spec.get('low'))}-{_number(spec.get('high'))}"
    if spec.get("method") == "range":
        return f"range {_number(spec.get('min'))}-{_number(spec.get('max'))}"
    return str(spec.get("method"))


def scalings(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """The distinct scalings of ``cfg``'s rasters."""
    out: list[dict[str, Any]] = []
    for spec in (scaling_spec(r.scaling) for r in cfg.rasters):
        if spec not in out:
            out.append(spec)
    return out


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


def check_embedding(m: Model, here: Embedder) -> None:
    """Raise one :class:`ModelMismatchError` naming every difference (this pipeline's value and the model's)
    in what makes the embeddings: backbone, layer, input size, band count, weights."""
    e, im = m.header.embedding, m.header.imagery
    diffs = []
    for key, mine, theirs in (("embedding.backbone", here.backbone, e.backbone),
                              ("embedding.layer", here.layer, e.layer),
                              ("embedding.input_size", here.input_size, e.input_size)):
        if mine != theirs:
            diffs.append(f"{key}: {mine} here, {theirs} in the model")
    mine_counts, model_counts = sorted(set(here.band_counts)), sorted(set(im.band_counts))
    if mine_counts != model_counts:
        diffs.append(f"rasters.bands: {'/'.join(map(str, mine_counts))} band(s) here, "
                     f"{'/'.join(map(str, model_counts))} in the model")
    if here.weights_sha256 is not None and here.weights_sha256 != e.weights_sha256:
        diffs.append(f"embedding.weights: SHA-256 {here.weights_sha256[:12]}... here, {e.weights_sha256[:12]}... "
                     "in the model")
    if diffs:
        raise ModelMismatchError(f"{m.path}: made from other embeddings than this pipeline's: {'; '.join(diffs)}; "
                                 "embed as the model's pipeline did, or use a model made from these embeddings")


def _close(a: float, b: float) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= GROUND_TOLERANCE * max(abs(a), abs(b))


def ground_warning(m: Model, pixel_m: float, tile_m: float, pipeline_scalings: Sequence[dict[str, Any]]
                   ) -> str | None:
    """One line when this pipeline's pixels or tiles on the ground, or its scaling, differ from the model's
    (its clusters and networks then see other tiles than they were made on); None when they agree."""
    im = m.header.imagery
    diffs = []
    if not _close(pixel_m, im.pixel_size_m):
        diffs.append(f"pixels of {pixel_m:.3g} m here, {im.pixel_size_m:.3g} m in the model")
    if not _close(tile_m, im.tile_size_m):
        diffs.append(f"tiles of {tile_m:.3g} m here, {im.tile_size_m:.3g} m in the model")
    other = [s for s in pipeline_scalings if s not in im.scalings]
    if other:
        diffs.append(f"scaling {describe_scaling(other[0])} here, "
                     f"{' / '.join(describe_scaling(s) for s in im.scalings) or 'none recorded'} in the model")
    if not diffs:
        return None
    return f"{m.path}: {'; '.join(diffs)}: its clusters and networks may fit these tiles less well"


# ----------------------------------------------------------------------------------------- clusters

def model_clusters(m: Model) -> KMeansClusterer:
    """The model's clusters as k-means assigns with them: its centroids (and PCA basis), its normalisation."""
    from .clustering import KMeansClusterer

    c, dim = m.header.clusters, m.header.embedding.dim
    km = KMeansClusterer(k=c.k, l2_normalize=c.l2_normalize)
    centers = np.ascontiguousarray(m.file.array("clusters.centroids"), dtype=np.float32)
    km.components_ = None
    if "clusters.components" in m.file.arrays:
        km.components_ = np.ascontiguousarray(m.file.array("clusters.components"), dtype=np.float32)
        km.mean_ = np.ascontiguousarray(m.file.array("clusters.mean"), dtype=np.float32)
        km.pca_dim = km.components_.shape[0]
        if km.components_.shape != (c.pca_dim, dim) or km.mean_.shape != (dim,):
            raise refused(m.path, f"clusters.components {km.components_.shape} or clusters.mean {km.mean_.shape} "
                                  f"do not fit pca_dim {c.pca_dim} of {dim}-d embeddings")
    width = dim if km.components_ is None else km.components_.shape[0]
    if centers.shape != (c.k, width) or not np.isfinite(centers).all():
        raise refused(m.path, f"clusters.centroids: shape {centers.shape} (or values) unlike {c.k} centroids of "
                              f"{width} dimensions")
    km.cluster_centers_ = centers
    return km


def clusters_key(m: Model) -> str:
    """What identifies the model's clusters (their centroids, basis and normalisation): equal keys, equal
    clusters, whatever else of the file (names, networks) changed."""
    parts = {name: a.tobytes().hex() for name, a in sorted(m.file.group("clusters").items())}
    return settings_key({"arrays": settings_key(parts), "l2": m.header.clusters.l2_normalize})


def model_labels(m: Model) -> ClusterLabels:
    """The model's cluster names and colours (each colour explicit: the legend the model's pipeline showed)."""
    items = m.header.clusters.items
    return ClusterLabels({i.id: i.name for i in items}, {i.id: i.colour.lower() for i in items})


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


def far_share(m: Model, clusters: np.ndarray, distances: np.ndarray) -> float:
    """Share of these tiles farther from their centroid than 90 % of the model's own tiles of that cluster."""
    p90 = np.asarray([i.distance_p90 for i in m.header.clusters.items])
    limit = p90[np.asarray(clusters, dtype=np.int64)]
    known = np.isfinite(limit)
    return float((distances[known] > limit[known]).mean()) if known.any() else math.nan


def far_warning(m: Model, share: float) -> str | None:
    if not share > FAR_SHARE_WARNING:
        return None
    return (f"{m.path}: {share:.0%} of these tiles lie farther from their cluster's centroid than 90 % of the "
            "model's own tiles did: the imagery differs from what its clusters were named on (look at atlas.png)")


# ----------------------------------------------------------------------------------------- networks

def _tensors(m: Model, prefix: str) -> dict[str, Any]:
    import torch

    arrays = m.file.group(prefix)
    if not arrays:
        raise refused(m.path, f"no arrays of its {prefix}")
    return {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}


def top_model_of(m: Model) -> tuple[TopModel, bool]:
    """The file's top model, and whether it sees each tile beside its neighbours' mean."""
    from .supervised.top_model import TopModel

    t = m.header.top_model
    if t is None:
        raise ModelFileError(f"{m.path}: holds no top model (its pipeline was not trained); export one after "
                             "`settlements train`")
    state = {"params": t.params.model_dump(), "classes": t.classes, "dim": t.dim, "head": _tensors(m, "top_model"),
             "n_train": t.n_train}
    return TopModel.from_state(state, m.path), t.neighbours


def fine_tuned_state(m: Model) -> dict[str, Any]:
    """The file's fine-tuned network as :meth:`~settlements.supervised.finetune.FineTuner.from_state` takes it."""
    f = m.header.fine_tuned
    if f is None:
        raise ModelFileError(f"{m.path}: holds no fine-tuned network (its pipeline did not fine tune)")
    return {"params": f.params.model_dump(), "classes": f.classes, "model": _tensors(m, "fine_tuned"),
            "history": f.history, "best_epoch": f.best_epoch, "trainable": f.trainable, "head_hidden": f.head_hidden,
            "extra": {}}


def summary(m: Model) -> list[str]:
    """What the file holds, as ``settlements model show`` prints it."""
    h = m.header
    e, im, c = h.embedding, h.imagery, h.clusters
    names = pd.Series([i.name for i in c.items]).value_counts(sort=False)
    out = [f"{m.path}: settlements model, format {m.file.header.get('format_version')}, SHA-256 {m.sha256}",
           f"  from pipeline {h.pipeline!r} (run {h.run_id})",
           f"  embeddings: {e.backbone} cut at {e.layer} ({e.dim}-d), input {e.input_size} px, weights SHA-256 "
           f"{e.weights_sha256[:12]}...",
           f"  imagery: {'/'.join(map(str, im.band_counts))} band(s), pixels {im.pixel_size_m:.3g} m, tiles "
           f"{im.tile_size_m:.3g} m, scaling {' / '.join(describe_scaling(s) for s in im.scalings)}",
           f"  clusters: k={c.k} (L2 {c.l2_normalize}, neighbour weight {c.neighbour_weight}), named "
           + ", ".join(f"{n} ({v})" for n, v in names.items())]
    for name in m.networks():
        net = getattr(h, name)
        out.append(f"  {name.replace('_', ' ')}: classes {', '.join(net.classes)}")
    return out
