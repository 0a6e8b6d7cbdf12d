"""Pictures for people: the cluster atlas, per-region label histograms, and the label map."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import geopandas as gpd  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import PercentFormatter, ScalarFormatter  # noqa: E402
from pyproj import CRS  # noqa: E402

from ..palette import Legend  # noqa: E402
from ..regions import common_area_unit, format_area  # noqa: E402
from ..store import atomic_path  # noqa: E402


def _save(fig: plt.Figure, path: Path, dpi: int = 110, tight: bool = False) -> None:
    """``tight``: the picture cropped to what is drawn (no white bands where a map's shape differs from the
    figure's)."""
    with atomic_path(path, suffix=".png") as tmp:
        if tight:
            fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight", pad_inches=0.1)
        else:
            fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)


def mosaic(chips: list[np.ndarray], per_row: int, size: int, gap: int = 2) -> np.ndarray:
    """Chips (h, w, 3) in [0, 1] resized by nearest neighbour into one grid image."""
    rows = max(1, math.ceil(len(chips) / per_row))
    out = np.ones((rows * (size + gap) - gap, per_row * (size + gap) - gap, 3), dtype=np.float32)
    for i, chip in enumerate(chips):
        h, w = chip.shape[:2]
        yi = (np.arange(size) * h / size).astype(int)
        xi = (np.arange(size) * w / size).astype(int)
        r, c = divmod(i, per_row)
        out[r * (size + gap): r * (size + gap) + size, c * (size + gap): c * (size + gap) + size] = chip[yi][:, xi]
    return out


def atlas(path: Path, panels: list[tuple[int, str, int, list[np.ndarray]]], legend: Legend,
          title: str) -> None:
    """One panel per cluster: its most typical tiles as image chips, titled id, label, size."""
    n = len(panels)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.7 * rows + 0.6), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (cid, label, size, chips) in zip(axes.ravel(), panels, strict=False):
        per_row = max(1, math.ceil(math.sqrt(len(chips)))) if chips else 1
        if chips:
            ax.imshow(mosaic(chips, per_row, 48))
        ax.set_title(f"{cid}: {label}\n{size} tiles", fontsize=10)
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor(legend.colour(label))
            spine.set_linewidth(5)
    fig.suptitle(title, fontsize=13)
    fig.tight_layout()
    _save(fig, path)


def histograms_heading(title: str, shown: int, mapped: int, unit: str) -> str:
    """The figure's title: what it shows, of how many regions, and the one unit of its areas."""
    which = ("the one region" if mapped == 1 else f"all {mapped} regions" if shown == mapped
             else f"the {shown} largest of {mapped} regions")
    return f"{title}\nshare of mapped area per label, {which} (areas in {unit})"


def histograms(path: Path, regions: pd.DataFrame, legend: Legend, max_regions: int, title: str) -> None:
    """Small multiples: label fractions of the regions with the largest mapped area, their areas in one unit."""
    mapped = regions[regions["mapped_km2"] > 0]
    top = mapped.nlargest(max_regions, "mapped_km2")
    unit = common_area_unit(top["mapped_km2"].to_numpy())
    n = max(1, len(top))
    cols = min(4, n)
    rows = math.ceil(n / cols)
    labels = list(legend.labels)
    fig, axes = plt.subplots(rows, cols, figsize=(max(3.0 * cols, 6.0), 2.3 * rows + 1.2), squeeze=False,
                             sharey=True, layout="constrained")
    for ax in axes.ravel():
        ax.axis("off")
    x = np.arange(len(labels))
    for ax, (_, reg) in zip(axes.ravel(), top.iterrows(), strict=False):
        ax.axis("on")
        fr = [reg.get(f"frac_{legend.key(lb)}", 0.0) for lb in labels]
        ax.bar(x, fr, color=[legend.colour(lb) for lb in labels], edgecolor="#404040", linewidth=0.4)
        ax.set_xticks([])
        ax.set_ylim(0, 1)
        name, rid = reg["region_name"], reg["region_id"]
        name = name if name == rid else f"{name} ({rid})"
        ax.set_title(f"{name}\n{format_area(float(reg['mapped_km2']), unit)} mapped", fontsize=8)
    handles = [Patch(facecolor=c, edgecolor="#404040", label=lb) for lb, c in legend.items()]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(5, len(handles)), fontsize=8, frameon=False)
    fig.suptitle(histograms_heading(title, len(top), len(mapped), unit), fontsize=10)
    _save(fig, path, tight=True)


#: Above this many tiles the label map is rasterised instead of drawn polygon by polygon: a tile is
#: then a few pixels wide in the figure anyway, and 18,000 polygons took 3.9 s to draw, the image 0.2 s.
MAX_POLYGONS = 5_000


def _label_image(tiles: gpd.GeoDataFrame, legend: Legend, bounds: tuple[float, float, float, float],
                 width: int = 1000) -> np.ndarray:
    """Tiles burnt into an 8-bit RGBA image of ``width`` columns over ``bounds`` (transparent where no tile).

    About the figure's own width in pixels: a wider image shows nothing more, yet matplotlib resamples
    it in float (1800 columns took 210 MB at its peak, 1000 take 66 MB)."""
    from rasterio.features import rasterize
    from rasterio.transform import from_bounds

    x0, y0, x1, y1 = bounds
    height = max(1, int(round(width * (y1 - y0) / max(x1 - x0, 1e-12))))
    labels = list(legend.labels)
    codes = tiles["label"].map({lb: i + 1 for i, lb in enumerate(labels)}).fillna(0).astype(np.int32).to_numpy()
    img = rasterize(zip(tiles.geometry.values, codes, strict=True), out_shape=(height, width),
                    transform=from_bounds(x0, y0, x1, y1, width, height), fill=0, dtype="int32", all_touched=True)
    lut = np.zeros((len(labels) + 1, 4), dtype=np.uint8)
    lut[1:] = [matplotlib.colors.to_rgba_array(legend.colour(lb))[0] * 255 + 0.5 for lb in labels]
    return lut[img]


def label_map(path: Path, tiles: gpd.GeoDataFrame, regions: gpd.GeoDataFrame, legend: Legend,
              title: str) -> None:
    """Tiles coloured by label, region outlines on top; the figure shaped as the map is (ground units equal on
    both axes: lon/lat degrees stretched by 1/cos(latitude)), and saved without white bands."""
    x0, y0, x1, y1 = tiles.total_bounds
    crs = CRS.from_user_input(tiles.crs) if tiles.crs else None
    aspect = 1.0 / max(math.cos(math.radians((y0 + y1) / 2)), 0.05) if crs is not None and crs.is_geographic else 1.0
    shape = (y1 - y0) * aspect / max(x1 - x0, 1e-12)  # the map's height over its width, as drawn
    width = 7.5 if shape <= 1 else max(7.5 / shape, 3.0)
    fig, ax = plt.subplots(figsize=(width + 1.6, min(width * shape, 10.0) + 0.9))
    if len(tiles) > MAX_POLYGONS:  # one patch per tile would take minutes and gigabytes: draw an image
        ax.imshow(_label_image(tiles, legend, (x0, y0, x1, y1)), extent=(x0, x1, y0, y1), origin="upper",
                  interpolation="nearest", aspect="auto")
    else:
        tiles.plot(ax=ax, color=tiles["label"].map(legend.colour), linewidth=0)
    regions.boundary.plot(ax=ax, color="#202020", linewidth=0.3)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_aspect(aspect)
    ax.set_title(title)
    used = [lb for lb in legend.labels if (tiles["label"] == lb).any()]
    handles = [Patch(facecolor=legend.colour(lb), edgecolor="#404040", label=lb) for lb in used]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    plain_axes(ax, crs)
    _save(fig, path, tight=True)


def plain_axes(ax: plt.Axes, crs: CRS | None) -> None:
    """Tick labels in plain degrees or metres (no '+3.929e1' offset), axes named with their unit and the CRS."""
    for axis in (ax.xaxis, ax.yaxis):
        fmt = ScalarFormatter(useOffset=False)
        fmt.set_scientific(False)
        axis.set_major_formatter(fmt)
    ax.tick_params(labelsize=7)
    if crs is None:
        return
    if crs.is_geographic:
        x, y = "longitude (°)", "latitude (°)"
    else:
        unit = crs.axis_info[0].unit_name if crs.axis_info else "metre"
        unit = "m" if unit in ("metre", "meter") else unit
        x, y = f"easting ({unit})", f"northing ({unit})"
    ax.set_xlabel(f"{x}; {crs.name}", fontsize=8)
    ax.set_ylabel(y, fontsize=8)


def label_shares(path: Path, shares: pd.DataFrame, legend: Legend, title: str, mapped_km2: list[float]) -> None:
    """One bar per pipeline (``shares``: a row per pipeline, a column per label, its share of the mapped
    area), stacked in the legend's order and colours, with each share of 5 % or more written on it and
    each pipeline's mapped area under its name."""
    n = len(shares)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * n + 3.2), 5.2))
    x = np.arange(n)
    bottom = np.zeros(n)
    for label in legend.labels:
        values = shares[label].to_numpy(dtype=float) if label in shares.columns else np.zeros(n)
        ax.bar(x, values, bottom=bottom, width=0.6, color=legend.colour(label), edgecolor="#404040", linewidth=0.4,
               label=label)
        for xi, b, v in zip(x, bottom, values, strict=True):
            if v >= 0.05:
                r, g, bl = legend.rgb(label)
                ink = "black" if 0.299 * r + 0.587 * g + 0.114 * bl > 0.5 else "white"
                ax.text(float(xi), b + v / 2, f"{v:.0%}", ha="center", va="center", fontsize=8, color=ink)
        bottom += values
    ax.set_xticks(x, [f"{i}\n{format_area(km2)} mapped" for i, km2 in zip(shares.index, mapped_km2, strict=True)],
                  fontsize=9)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of the mapped area")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(*[list(reversed(h)) for h in ax.get_legend_handles_labels()], loc="center left",
              bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.set_title(title, fontsize=11)
    fig.tight_layout()
    _save(fig, path)
