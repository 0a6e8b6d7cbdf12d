"""The class palette: the one place colours are defined.

Vector styles, the raster colour table and every plot take their colours from a pipeline's
:class:`Legend` (:func:`build_legend`); nothing else names a colour.
"""

from __future__ import annotations

import colorsys
import math
import re
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache, cached_property
from itertools import chain, count, islice

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

#: Colours of clusters with no colour of their own, by cluster id: ColorBrewer Set3, Paired and Dark2 and
#: Tableau's, each at least :data:`MIN_COLOUR_DISTANCE` from every other and from every known colour above
#: (Set3's pale yellow #ffffb3 was all but the known ``beach``; Paired's blue all but ``water``).
AUTO_COLOURS = [
    "#8dd3c7", "#ffed6f", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69", "#fccde5",
    "#bc80bd", "#ccebc5", "#33a02c", "#fb9a99", "#ff7f00", "#6a3d9a", "#b15928", "#1b9e77",
    "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#9c755f", "#17becf", "#bcbd22", "#e377c2",
]

#: Two colours of one legend differ by at least this CIE76 Delta E (CIELAB distance; about 2.3 is the least a
#: person notices side by side, and ColorBrewer's qualitative schemes keep 13 or more apart): labels whose
#: colours come from the palette never look alike on a map. An analyst's own colours are taken as given.
MIN_COLOUR_DISTANCE = 15.0

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
class Legend:
    """Labels in display order, each with one colour, one raster code (1..n; 0 = no data) and one column key.

    The legend of a pipeline is one value: every writer (styles, COG colour tables, pictures, the QGIS
    project) takes it, so a label has one colour, code and column everywhere. :meth:`only` keeps some of
    its labels with their colours, codes and keys (the classes a model predicts).
    """

    labels: tuple[str, ...]
    colours: tuple[str, ...]
    codes: tuple[int, ...] = ()
    column_keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.codes:
            object.__setattr__(self, "codes", tuple(range(1, len(self.labels) + 1)))
        if not self.column_keys:
            keys = column_keys(self.labels)
            object.__setattr__(self, "column_keys", tuple(keys[lb] for lb in self.labels))
        if not len(self.labels) == len(self.colours) == len(self.codes) == len(self.column_keys):
            raise ValueError("a legend needs one colour, code and key per label")

    @cached_property
    def keys(self) -> dict[str, str]:
        """Label -> column key (see :func:`column_keys`)."""
        return dict(zip(self.labels, self.column_keys, strict=True))

    def key(self, label: str) -> str:
        return self.keys[label]

    def colour(self, label: str) -> str:
        if label == NO_DATA:
            return NO_DATA_COLOUR
        return self.colours[self.labels.index(label)]

    def code(self, label: str) -> int:
        return self.codes[self.labels.index(label)]

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

    def only(self, labels: Sequence[str]) -> Legend:
        """These labels (each once, in this legend's order) with their own colours, codes and keys."""
        wanted = set(labels)
        missing = wanted - set(self.labels)
        if missing:
            raise KeyError(f"not in the legend: {sorted(missing)}")
        at = [i for i, lb in enumerate(self.labels) if lb in wanted]
        return Legend(tuple(self.labels[i] for i in at), tuple(self.colours[i] for i in at),
                      tuple(self.codes[i] for i in at), tuple(self.column_keys[i] for i in at))


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

    The first 24 ids take :data:`AUTO_COLOURS`, later ones :func:`_more_colours`.
    """
    if cluster < len(AUTO_COLOURS):
        return AUTO_COLOURS[cluster]
    return _more_colours(cluster - len(AUTO_COLOURS))


#: How far :func:`_more_colours` searches: about 150 colours beyond the fixed 24 keep their distance.
_MORE_TRIES = 20_000
_more: list[str] = []
_more_tried = [0]


def _walk_candidate(i: int) -> str:
    """The ``i``-th point of a low-discrepancy walk (generalised golden ratio) through hue, saturation
    0.25-1 and value 0.35-1: spread evenly over the colours a map can show."""
    h, s, v = ((0.5 + i / 1.2207440846057596 ** (j + 1)) % 1.0 for j in range(3))
    r, g, b = colorsys.hsv_to_rgb(h, 0.25 + 0.75 * s, 0.35 + 0.65 * v)
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


def _more_colours(n: int) -> str:
    """The ``n``-th automatic colour beyond :data:`AUTO_COLOURS`: the walk's points, each kept only where it
    lies at least :data:`MIN_COLOUR_DISTANCE` from every fixed, known and earlier kept one (found once,
    as far as needed); past what the search finds, the walk's own points."""
    fixed = [*AUTO_COLOURS, *KNOWN_COLOURS.values()]
    while len(_more) <= n and _more_tried[0] < _MORE_TRIES:
        colour = _walk_candidate(_more_tried[0])
        _more_tried[0] += 1
        if all(colour_distance(colour, c) >= MIN_COLOUR_DISTANCE for c in (*fixed, *_more)):
            _more.append(colour)
    return _more[n] if n < len(_more) else _walk_candidate(_MORE_TRIES + n)


@cache
def _lab(colour: str) -> tuple[float, float, float]:
    """CIELAB (D65) of an sRGB ``#rrggbb``."""
    def linear(c: float) -> float:
        return ((c + 0.055) / 1.055) ** 2.4 if c > 0.04045 else c / 12.92

    r, g, b = (linear(v / 255) for v in hex_to_rgb(colour))
    xyz = ((0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047, 0.2126 * r + 0.7152 * g + 0.0722 * b,
           (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883)
    fx, fy, fz = (v ** (1 / 3) if v > 0.008856 else 7.787 * v + 16 / 116 for v in xyz)
    return 116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)


def colour_distance(a: str, b: str) -> float:
    """CIE76 Delta E between two ``#rrggbb`` colours."""
    return math.dist(_lab(a), _lab(b))


#: Candidates an automatic colour tries before it settles for the one farthest from those taken (only a
#: legend of well over a hundred labels has no room left at :data:`MIN_COLOUR_DISTANCE`).
_MAX_TRIES = 128


def _distinct(candidates: Iterator[str], taken: list[str]) -> str:
    """The first candidate at least :data:`MIN_COLOUR_DISTANCE` from every colour taken; where none of the
    first :data:`_MAX_TRIES` is, the one of them farthest from its nearest taken colour."""
    best, best_gap = "", -1.0
    for colour in islice(candidates, _MAX_TRIES):
        gap = min((colour_distance(colour, t) for t in taken), default=math.inf)
        if gap >= MIN_COLOUR_DISTANCE:
            return colour
        if gap > best_gap:
            best, best_gap = colour, gap
    return best


def _walk(first: int) -> Iterator[str]:
    """Automatic colours from ``first`` on: its own, then the hue walk beyond the fixed list."""
    yield auto_colour(first)
    for i in count(max(first + 1, len(AUTO_COLOURS))):
        yield auto_colour(i)


def build_legend(names: dict[int, str], colours: dict[int, str | None], extra: Sequence[str] = ()) -> Legend:
    """The legend of a pipeline: one entry per distinct cluster name (by lowest cluster id), then ``extra``
    labels that no cluster carries (classes a model predicts), each with one colour.

    A label's colour is the first explicit colour given for any of its clusters (lowest id), else the
    known colour for its name, else the automatic colour of its lowest cluster id (an extra label counts
    on from the highest id): a colour depends on the label's own id and name, so naming clusters 0 and 1
    leaves cluster 5 as it was. A known or automatic colour within :data:`MIN_COLOUR_DISTANCE` of one an
    earlier label holds moves on along the walk, so no two labels look alike (as long as there is room:
    some 170 labels; beyond, each takes the candidate farthest from the others). Extra labels come after
    every cluster's: they never change a cluster's colour or code.
    """
    return _build_legend(tuple(sorted(names.items())), tuple(sorted(colours.items())), tuple(extra))


@cache
def _build_legend(names_: tuple[tuple[int, str], ...], colours_: tuple[tuple[int, str | None], ...],
                  extra: tuple[str, ...]) -> Legend:
    """:func:`build_legend`, cached: ClusterLabels.legend is asked for often, and a large one takes a second."""
    names, colours = dict(names_), dict(colours_)
    labels: list[str] = []
    first: dict[str, int] = {}
    explicit: dict[str, str] = {}
    for cid in sorted(names):
        label = names[cid]
        if label not in first:
            labels.append(label)
            first[label] = cid
        colour = colours.get(cid)
        if colour and label not in explicit:
            explicit[label] = colour.lower()
    n_clusters = len(labels)
    after = max(names, default=-1) + 1
    for label in extra:
        if label not in first:
            labels.append(label)
            first[label] = after + len(labels) - n_clusters - 1
    chosen: dict[str, str] = dict(explicit)
    for group in (labels[:n_clusters], labels[n_clusters:]):  # the clusters' colours never depend on extras
        for label in group:  # known colours before automatic ones: 'water' keeps its blue
            known = KNOWN_COLOURS.get(label.strip().lower())
            if label not in chosen and known is not None:
                chosen[label] = _distinct(chain([known], _walk(first[label])), list(chosen.values()))
        for label in group:
            if label not in chosen:
                chosen[label] = _distinct(_walk(first[label]), list(chosen.values()))
    return Legend(tuple(labels), tuple(chosen[label] for label in labels))
