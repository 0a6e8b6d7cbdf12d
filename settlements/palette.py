"""The class palette: the one place colours are defined.

Vector styles, the raster colour table and every plot take their colours from a
:class:`Palette`; nothing else names a colour.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

UNLABELLED = "unlabelled"
NO_DATA = "no data"
UNLABELLED_COLOUR = "#bdbdbd"
NO_DATA_COLOUR = "#000000"
#: The raster code of "no data" (no valid tile); labels are coded 1..n in palette order.
NO_DATA_CODE = 0
OUTLINE_COLOUR = "#404040"
#: Low and high ends of sequential colour ramps (confusion matrices): white to dark blue.
RAMP_COLOURS = ("#f7fbff", "#08306b")

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

#: Colours given to clusters not yet named (ColorBrewer Set3 + Paired, distinct from the above).
AUTO_COLOURS = [
    "#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69", "#fccde5",
    "#bc80bd", "#ccebc5", "#ffed6f", "#a6cee3", "#1f78b4", "#b2df8a", "#33a02c", "#fb9a99",
    "#e31a1c", "#fdbf6f", "#ff7f00", "#cab2d6", "#6a3d9a", "#b15928", "#d9d9d9", "#66c2a5",
]

_HEX = re.compile(r"^#[0-9a-fA-F]{6}$")


def is_colour(text: str) -> bool:
    return bool(_HEX.match(text))


def default_cluster_name(cluster: int) -> str:
    return f"cluster {cluster}"


def hex_to_rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def slug(label: str) -> str:
    """A label as a column-name fragment: 'informal settlement' -> 'informal_settlement'."""
    s = re.sub(r"[^0-9a-zA-Z]+", "_", label.strip().lower()).strip("_")
    return s or "label"


@dataclass(frozen=True)
class Palette:
    """Labels in display order, each with one colour and a small integer code (1..n; 0 = no data)."""

    labels: tuple[str, ...]
    colours: tuple[str, ...]

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


def build_palette(names: dict[int, str], colours: dict[int, str | None]) -> Palette:
    """One colour per distinct label, from cluster-level names and optional colours.

    A label's colour is the first explicit colour given for any of its clusters (lowest id),
    else the known colour for that name, else the next unused automatic colour.
    """
    labels: list[str] = []
    chosen: dict[str, str] = {}
    for cid in sorted(names):
        label = names[cid]
        if label not in labels:
            labels.append(label)
        colour = colours.get(cid)
        if colour and label not in chosen:
            chosen[label] = colour.lower()
    used = set(chosen.values())
    auto = iter(c for c in AUTO_COLOURS if c not in used)
    out = []
    for label in labels:
        colour = chosen.get(label) or KNOWN_COLOURS.get(label.strip().lower())
        if colour is None:
            colour = next(auto, "#999999")
        used.add(colour)
        out.append(colour)
    return Palette(tuple(labels), tuple(out))
