"""The class palette: the one place colours are defined.

Vector styles, the raster colour table and every plot take their colours from a
:class:`Palette`; nothing else names a colour.
"""

from __future__ import annotations

import colorsys
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import count

UNLABELLED = "unlabelled"
NO_DATA = "no data"
UNLABELLED_COLOUR = "#bdbdbd"
NO_DATA_COLOUR = "#000000"
#: The raster code of "no data" (no valid tile); labels are coded 1..n in palette order.
NO_DATA_CODE = 0
OUTLINE_COLOUR = "#404040"
#: Low and high ends of sequential colour ramps (confusion matrices): white to dark blue.
RAMP_COLOURS = ("#f7fbff", "#08306b")
#: Similarity scores, low to high (ColorBrewer YlOrRd): the likest tiles stand out in dark red.
SCORE_RAMP = ("#ffffb2", "#fecc5c", "#fd8d3c", "#f03b20", "#bd0026")
#: Outlines of the layers an analyst draws in (examples, negatives): cyan and magenta, unlike any label colour.
DRAWN_COLOURS = {"examples": "#00e5ff", "negatives": "#ff00ff"}

#: Colours for the names analysts use most, so the same class looks alike in every pipeline.
KNOWN_COLOURS = {
    "informal settlement": "#e31a1c",
    "established neighbourhood": "#fd8d3c",
    "formal settlement": "#fd8d3c",
    "industrial": "#756bb1",
    "road": "#636363",
    "built-up": "#d94801",
    "bare soil": "#d9b38c",
    "farmland": "#fee391",
    "grassland": "#a1d99b",
    "vegetation": "#31a354",
    "forest": "#006d2c",
    "water": "#2171b5",
    "beach": "#fff7bc",
    "cloud": "#f7f7f7",
    UNLABELLED: UNLABELLED_COLOUR,
}

#: Colours of clusters with no colour of their own, by cluster id (ColorBrewer Set3 + Paired, none of
#: them a known colour above).
AUTO_COLOURS = [
    "#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69", "#fccde5",
    "#bc80bd", "#ccebc5", "#ffed6f", "#a6cee3", "#1f78b4", "#b2df8a", "#33a02c", "#fb9a99",
    "#cb181d", "#fdbf6f", "#ff7f00", "#cab2d6", "#6a3d9a", "#b15928", "#d9d9d9", "#66c2a5",
]

_HEX = re.compile(r"^#[0-9a-fA-F]{6}$")


def is_colour(text: str) -> bool:
    return bool(_HEX.match(text))


def default_cluster_name(cluster: int) -> str:
    return f"cluster {cluster}"


def hex_to_rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def slug(label: str) -> str:
    """A label in plain ASCII for a column name: 'informal settlement' -> 'informal_settlement', 'Café' -> 'cafe';
    empty where nothing Latin is left ('水')."""
    ascii_text = unicodedata.normalize("NFKD", label).encode("ascii", "ignore").decode()
    return re.sub(r"[^0-9a-zA-Z]+", "_", ascii_text.strip().lower()).strip("_")


#: Keys a label may not take: they would be the regions table's own n_tiles / n_skipped, or the
#: per-cluster columns n_c0, frac_c0, ... (and p_c0 of predictions).
_RESERVED_KEY = re.compile(r"^(tiles|skipped|c\d+)$")


def column_keys(labels: Sequence[str]) -> dict[str, str]:
    """The column key of each label (``n_<key>``, ``frac_<key>``, ``km2_<key>``, ``dfrac_<key>``, ``p_<key>``).

    The one place label columns are named. Keys are the label's ASCII slug, ``l<n>`` for a label with
    nothing Latin in it (n its 1-based place in ``labels``), with ``_2``, ``_3``, ... where a key is
    taken by an earlier label or reserved: 'Water' and 'water' become ``water`` and ``water_2``, a label
    'tiles' ``tiles_2``, 'c0' ``c0_2``. A label's key depends only on the labels before it, so the keys
    of a list stay the same when labels are appended. The label's own text lives in field aliases and
    in the ``histogram`` table.
    """
    keys: dict[str, str] = {}
    used: set[str] = set()
    for place, label in enumerate(labels, start=1):
        if label in keys:
            continue
        base = slug(label) or f"l{place}"
        key = base
        if key in used or _RESERVED_KEY.match(key):
            key = next(f"{base}_{n}" for n in count(2) if f"{base}_{n}" not in used)
        keys[label] = key
        used.add(key)
    return keys


@dataclass(frozen=True)
class Palette:
    """Labels in display order, each with one colour and a small integer code (1..n; 0 = no data)."""

    labels: tuple[str, ...]
    colours: tuple[str, ...]

    @cached_property
    def keys(self) -> dict[str, str]:
        """Label -> column key (see :func:`column_keys`)."""
        return column_keys(self.labels)

    def key(self, label: str) -> str:
        return self.keys[label]

    def colour(self, label: str) -> str:
        if label == NO_DATA:
            return NO_DATA_COLOUR
        return self.colours[self.labels.index(label)]

    def code(self, label: str) -> int:
        return self.labels.index(label) + 1

    def items(self) -> list[tuple[str, str]]:
        return list(zip(self.labels, self.colours, strict=True))

    def rgb(self, label: str) -> tuple[float, float, float]:
        r, g, b = hex_to_rgb(self.colour(label))
        return r / 255, g / 255, b / 255

    def colour_table(self) -> dict[int, tuple[int, int, int, int]]:
        """The raster colour table: code -> RGBA, with code 0 (no data) transparent."""
        table = {NO_DATA_CODE: (*hex_to_rgb(NO_DATA_COLOUR), 0)}
        for label, colour in self.items():
            table[self.code(label)] = (*hex_to_rgb(colour), 255)
        return table

    def class_names(self) -> dict[int, str]:
        """Code -> class name, no data included: what the raster attribute table and legend show."""
        return {NO_DATA_CODE: NO_DATA, **{self.code(label): label for label in self.labels}}


def score_colours(n: int) -> list[str]:
    """``n`` colours along :data:`SCORE_RAMP`, low to high, interpolated in RGB."""
    stops = [hex_to_rgb(c) for c in SCORE_RAMP]
    out = []
    for i in range(n):
        t = i / (n - 1) * (len(stops) - 1) if n > 1 else len(stops) - 1
        j = min(int(t), len(stops) - 2)
        f = t - j
        rgb = [round(a + (b - a) * f) for a, b in zip(stops[j], stops[j + 1], strict=True)]
        out.append("#" + "".join(f"{v:02x}" for v in rgb))
    return out


def auto_colour(cluster: int) -> str:
    """The colour of a cluster nobody coloured: fixed by its id alone, so naming other clusters never moves it.

    The first 24 ids take :data:`AUTO_COLOURS`; later ones a golden-angle hue walk (distinct, stable).
    """
    if cluster < len(AUTO_COLOURS):
        return AUTO_COLOURS[cluster]
    hue = (cluster * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.55, 0.85)
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


def build_palette(names: dict[int, str], colours: dict[int, str | None]) -> Palette:
    """One colour per distinct label, from cluster-level names and optional colours.

    A label's colour is the first explicit colour given for any of its clusters (lowest id), else the
    known colour for that name, else the automatic colour of its lowest cluster id: a cluster's colour
    depends on its own id and name only, so naming clusters 0 and 1 leaves cluster 5 as it was.
    """
    labels: list[str] = []
    chosen: dict[str, str] = {}
    first: dict[str, int] = {}
    for cid in sorted(names):
        label = names[cid]
        if label not in labels:
            labels.append(label)
            first[label] = cid
        colour = colours.get(cid)
        if colour and label not in chosen:
            chosen[label] = colour.lower()
    out = [chosen.get(label) or KNOWN_COLOURS.get(label.strip().lower()) or auto_colour(first[label])
           for label in labels]
    return Palette(tuple(labels), tuple(out))
