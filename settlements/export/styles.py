"""QGIS styles (QML) generated from the legend: no colour is written here by hand.

Vector styles go into the GeoPackage's ``layer_styles`` table (QGIS loads the default one when the
layer opens); the raster style is a ``.qml`` sidecar beside the cluster map (QGIS loads it the
same way). The QGIS project embeds the same XML, so every view of the outputs shows one legend.
"""

from __future__ import annotations

from xml.sax.saxutils import escape, quoteattr

from ..palette import NO_DATA, NO_DATA_COLOUR, OUTLINE_COLOUR, Legend, hex_to_rgb, score_colours
from .geopackage import LayerStyle

QGIS_VERSION = "3.22.0"
_HEADER = "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>"

TILES_ALIASES = {"tile_id": "Tile", "cluster": "Cluster", "label": "Label", "distance": "Distance to centroid",
                 "region_id": "Region", "raster": "Source raster", "row": "Grid row", "col": "Grid column",
                 "valid_fraction": "Share of valid pixels"}
REGIONS_ALIASES = {"region_id": "Region id", "region_name": "Region", "area_km2": "Area (km²)",
                   "imaged_km2": "Imaged area (km²)", "mapped_km2": "Mapped area (km²)", "n_tiles": "Tiles",
                   "n_skipped": "Tiles skipped", "valid_fraction": "Share imaged", "dominant_label": "Dominant label"}


def _rgba(colour: str, alpha: int = 255) -> str:
    r, g, b = hex_to_rgb(colour)
    return f"{r},{g},{b},{alpha}"


def _fill_symbol(name: str, colour: str, outline_width: float, fill_alpha: int = 255,
                 outline: str = OUTLINE_COLOUR, cased: bool = False) -> str:
    """A polygon symbol; ``cased``: the outline in ``outline`` with a thin dark line along its middle, so a
    boundary stays visible over tiles of its own colour."""
    casing = _fill_layer(NO_DATA_COLOUR, 0.15, 0, OUTLINE_COLOUR) if cased else ""
    return f"""<symbol type="fill" name={quoteattr(name)} alpha="1" clip_to_extent="1" force_rhr="0">
        {_fill_layer(colour, outline_width, fill_alpha, outline)}{casing}
      </symbol>"""


def _fill_layer(colour: str, outline_width: float, fill_alpha: int, outline: str) -> str:
    return f"""<layer class="SimpleFill" enabled="1" locked="0" pass="0">
          <Option type="Map">
            <Option type="QString" name="border_width_map_unit_scale" value="3x:0,0,0,0,0,0"/>
            <Option type="QString" name="color" value="{_rgba(colour, fill_alpha)}"/>
            <Option type="QString" name="joinstyle" value="bevel"/>
            <Option type="QString" name="offset" value="0,0"/>
            <Option type="QString" name="offset_map_unit_scale" value="3x:0,0,0,0,0,0"/>
            <Option type="QString" name="offset_unit" value="MM"/>
            <Option type="QString" name="outline_color" value="{_rgba(outline)}"/>
            <Option type="QString" name="outline_style" value="solid"/>
            <Option type="QString" name="outline_width" value="{outline_width}"/>
            <Option type="QString" name="outline_width_unit" value="MM"/>
            <Option type="QString" name="style" value="{'solid' if fill_alpha else 'no'}"/>
          </Option>
        </layer>"""


def _aliases(aliases: dict[str, str]) -> str:
    return "\n    ".join(f'<alias field={quoteattr(f)} index="{i}" name={quoteattr(a)}/>'
                       for i, (f, a) in enumerate(aliases.items()))


def _layer_tail(aliases: dict[str, str], map_tip: str, display_field: str, extra: str = "") -> str:
    return f"""  <aliases>
    {_aliases(aliases)}
  </aliases>
  {extra}
  <mapTip>{escape(map_tip)}</mapTip>
  <previewExpression>{escape(display_field)}</previewExpression>
  <layerGeometryType>2</layerGeometryType>"""


#: Outline width (mm) of regions: drawn over the tiles as outlines in their dominant label's colour, never filled,
#: so every tile keeps its own colour (a translucent fill turned a red class brown).
REGION_OUTLINE_MM = 0.6


def categorized_renderer(field: str, legend: Legend, outline_width: float, no_data_category: bool,
                         fill_alpha: int = 255, outline_only: bool = False) -> str:
    """A categorized polygon renderer on ``field``: one category per palette label, filled at ``fill_alpha``, or
    (``outline_only``) outlined in the label's colour and not filled.

    With ``no_data_category`` features whose value is NULL (e.g. regions without imagery) fall in an
    outline-only "no data" category (QGIS's "all other values"), so they stay visible uncoloured.
    """
    items = legend.items()
    cats = [f'<category render="true" symbol="{i}" value={quoteattr(label)} label={quoteattr(label)}/>'
            for i, (label, _) in enumerate(items)]
    symbols = [_fill_symbol(str(i), c, outline_width, 0, outline=c, cased=True) if outline_only else
               _fill_symbol(str(i), c, outline_width, fill_alpha) for i, (_, c) in enumerate(items)]
    if no_data_category:
        cats.append(f'<category render="true" symbol="{len(items)}" value="" label={quoteattr(NO_DATA)}/>')
        symbols.append(_fill_symbol(str(len(items)), NO_DATA_COLOUR, outline_width, fill_alpha=0))
    sep = "\n      "
    return f"""<renderer-v2 type="categorizedSymbol" attr={quoteattr(field)} symbollevels="0" enableorderby="0"
               forceraster="0" referencescale="-1">
    <categories>
      {sep.join(cats)}
    </categories>
    <symbols>
      {sep.join(symbols)}
    </symbols>
    <source-symbol>
      {_fill_symbol("0", legend.colours[0] if legend.colours else NO_DATA_COLOUR, outline_width)}
    </source-symbol>
    <rotation/>
    <sizescale/>
  </renderer-v2>"""


def _outline_renderer(outline_width: float) -> str:
    return f"""<renderer-v2 type="singleSymbol" symbollevels="0" enableorderby="0" forceraster="0" referencescale="-1">
    <symbols>
      {_fill_symbol("0", NO_DATA_COLOUR, outline_width, fill_alpha=0)}
    </symbols>
    <rotation/>
    <sizescale/>
  </renderer-v2>"""


def pie_diagram(legend: Legend, size_mm: float = 7.0) -> str:
    """A pie per region of the label fractions (``frac_<label>``), in the palette's colours."""
    attrs = "\n      ".join(
        f'<attribute field={quoteattr(chr(34) + "frac_" + legend.key(lb) + chr(34))} color="{c}" colorOpacity="1" '
        f"label={quoteattr(lb)}/>" for lb, c in legend.items())
    return f"""<SingleCategoryDiagramRenderer diagramType="Pie" attributeLegend="1">
    <DiagramCategory enabled="1" width="{size_mm}" height="{size_mm}" sizeType="MM" penWidth="0.1"
        penColor="{OUTLINE_COLOUR}" penAlpha="255" backgroundColor="{NO_DATA_COLOUR}" backgroundAlpha="0"
        opacity="1" rotationOffset="270" direction="1" scaleDependency="Area" scaleBasedVisibility="0"
        minScaleDenominator="0" maxScaleDenominator="0" minimumSize="0" labelPlacementMethod="Height"
        diagramOrientation="Up" barWidth="5" showAxis="0" lineSizeType="MM" spacing="0" spacingUnit="MM"
        sizeScale="3x:0,0,0,0,0,0" lineSizeScale="3x:0,0,0,0,0,0" spacingUnitScale="3x:0,0,0,0,0,0">
      <fontProperties description="Sans Serif,8,-1,5,50,0,0,0,0,0" style=""/>
      {attrs}
    </DiagramCategory>
  </SingleCategoryDiagramRenderer>
  <DiagramLayerSettings placement="1" priority="5" linePlacementFlags="1" zIndex="0" showAll="1" obstacle="0"
      dist="0"/>"""


def _document(body: str) -> str:
    return f"""{_HEADER}
<qgis version="{QGIS_VERSION}" styleCategories="AllStyleCategories" hasScaleBasedVisibilityFlag="0">
  {body}
</qgis>
"""


def qml_body(qml: str) -> str:
    """What a QML document holds inside its ``<qgis>`` element: the style a QGIS project embeds in a layer."""
    start = qml.find(">", qml.find("<qgis")) + 1
    end = qml.rfind("</qgis>")
    return qml[start:end].strip() if 0 < start <= end else ""


def categorized_qml(field: str, legend: Legend, aliases: dict[str, str] | None = None,
                    outline_width: float = 0.06, map_tip: str = "", display_field: str = "",
                    no_data_category: bool = False, outline_only: bool = False) -> str:
    """A complete QML: categorized polygon renderer on ``field``, aliases and map tip."""
    return _document(categorized_renderer(field, legend, outline_width, no_data_category,
                                          outline_only=outline_only) + "\n"
                     + _layer_tail(aliases or {}, map_tip, display_field))


def tiles_qml_body(legend: Legend) -> str:
    """Tiles: categorized by label, thin outlines."""
    tip = "<b>[% \"label\" %]</b><br>cluster [% \"cluster\" %], region [% \"region_id\" %]"
    return (categorized_renderer("label", legend, 0.02, no_data_category=False) + "\n"
            + _layer_tail(TILES_ALIASES, tip, '"label"'))


def region_aliases(legend: Legend, k: int) -> dict[str, str]:
    """Readable names for every regions column, label and cluster columns included."""
    out = dict(REGIONS_ALIASES)
    for lb in legend.labels:
        s = legend.key(lb)
        out |= {f"n_{s}": f"Tiles: {lb}", f"frac_{s}": f"Share: {lb}", f"km2_{s}": f"Area (km²): {lb}"}
    for c in range(k):
        out |= {f"n_c{c}": f"Tiles: cluster {c}", f"frac_c{c}": f"Share: cluster {c}",
                f"km2_c{c}": f"Area (km²): cluster {c}"}
    return out


def area_expression(km2: str) -> str:
    """A QGIS expression printing the km² value ``km2`` as :func:`settlements.regions.format_area` does:
    m² below a hectare, ha below a km², km² above."""
    x = f"coalesce({km2}, 0)"
    return (f"CASE WHEN abs({x}) < 0.01 THEN format_number({x} * 1000000, 0) || ' m²' "
            f"WHEN abs({x}) < 1 THEN format_number({x} * 100, 2) || ' ha' "
            f"ELSE format_number({x}, 2) || ' km²' END")


def region_map_tip(legend: Legend) -> str:
    """HTML map tip: region name, dominant label, then each label's share and area of the mapped area."""
    rows = "".join(
        f'<tr><td><span style="color:{c}">&#9632;</span> {escape(lb)}</td>'
        f'<td align="right">[% format_number(coalesce("frac_{legend.key(lb)}", 0) * 100, 1) %] %</td>'
        f'<td align="right">[% {area_expression(chr(34) + "km2_" + legend.key(lb) + chr(34))} %]</td></tr>'
        for lb, c in legend.items())
    return ('<b>[% "region_name" %]</b> ([% "region_id" %])<br>dominant: [% coalesce("dominant_label", \'no data\') %]'
            f'<br>mapped [% {area_expression(chr(34) + "mapped_km2" + chr(34))} %] of '
            f'[% {area_expression(chr(34) + "area_km2" + chr(34))} %]'
            f"<table>{rows}</table>")


def regions_qml_body(legend: Legend, k: int) -> str:
    """Regions: outlined in their dominant label's colour, unfilled so the tiles below keep their colours; the
    label mix in the map tip."""
    return (categorized_renderer("dominant_label", legend, REGION_OUTLINE_MM, no_data_category=True,
                                 outline_only=True) + "\n"
            + _layer_tail(region_aliases(legend, k), region_map_tip(legend), '"region_name"'))


def regions_mix_qml_body(legend: Legend, k: int) -> str:
    """Regions, second style: outlines with a pie of the label fractions on each region."""
    return (_outline_renderer(0.2) + "\n"
            + _layer_tail(region_aliases(legend, k), region_map_tip(legend), '"region_name"',
                          extra=pie_diagram(legend)))


def raster_qml_body(legend: Legend) -> str:
    """The cluster map: paletted renderer with one class per label code, names as class labels."""
    entries = "\n        ".join(
        f'<paletteEntry value="{legend.code(lb)}" color="{c}" alpha="255" label={quoteattr(lb)}/>'
        for lb, c in legend.items())
    return raster_pipe(f"""<rasterrenderer type="paletted" band="1" opacity="1" alphaBand="-1" nodataColor="">
      <rasterTransparency/>
      <colorPalette>
        {entries}
      </colorPalette>
    </rasterrenderer>""")


def raster_pipe(renderer: str) -> str:
    """A QGIS raster style around ``renderer`` (a ``rasterrenderer`` element): nearest-neighbour resampling, no
    colour adjustments."""
    return f"""<pipe>
    <provider>
      <resampling enabled="false" zoomedInResamplingMethod="nearestNeighbour"
                  zoomedOutResamplingMethod="nearestNeighbour" maxOversampling="2"/>
    </provider>
    {renderer}
    <brightnesscontrast brightness="0" contrast="0" gamma="1"/>
    <huesaturation saturation="0" grayscaleMode="0" invertColors="0" colorizeOn="0" colorizeRed="255"
                   colorizeGreen="128" colorizeBlue="128" colorizeStrength="100"/>
    <rasterresampler maxOversampling="2"/>
    <resamplingStage>resamplingFilter</resamplingStage>
  </pipe>
  <blendMode>0</blendMode>"""


def raster_qml(legend: Legend) -> str:
    """The ``.qml`` sidecar of the cluster map; the nodata code has no entry, so it stays transparent."""
    return _document(raster_qml_body(legend))


#: The name of the regions' second style (a pie of the label mix), which the QGIS project shows as a layer.
LABEL_MIX_STYLE = "settlements label mix"


def vector_styles(legend: Legend, k: int) -> list[LayerStyle]:
    """The GeoPackage's ``layer_styles`` rows: defaults for tiles and regions, plus the label-mix style."""
    return [
        LayerStyle("tiles", "settlements labels", _document(tiles_qml_body(legend)), "tiles coloured by label"),
        LayerStyle("regions", LABEL_MIX_STYLE, _document(regions_mix_qml_body(legend, k)),
                   "regions with a pie of their label shares", default=False),
        LayerStyle("regions", "settlements dominant label", _document(regions_qml_body(legend, k)),
                   "regions coloured by their dominant label"),
    ]


def change_styles(legend: Legend) -> list[LayerStyle]:
    """QGIS default styles for the change layers (``changes``, ``tile_changes``), from the one legend."""
    tip = ("<b>[% region_name %]</b><br>since run [% previous_run %]: [% round(changed_share * 100, 1) %] % "
           "of the mapped area changed label<br>" + "<br>".join(
               f"{escape(lb)}: [% round(\"dfrac_{legend.key(lb)}\" * 100, 1) %] points, "
               f"[% round(\"dkm2_{legend.key(lb)}\", 3) %] km²" for lb in legend.labels))
    return [
        LayerStyle("changes", "settlements largest gain",
                   categorized_qml("largest_gain", legend,
                                   aliases={"region_name": "Region", "largest_gain": "Label that grew most",
                                            "largest_loss": "Label that shrank most",
                                            "changed_share": "Share of mapped area that changed label",
                                            "previous_run": "Compared with run"},
                                   outline_width=0.2, map_tip=tip, display_field="region_name"),
                   "regions coloured by the label whose share grew most since the previous run"),
        LayerStyle("tile_changes", "settlements new label",
                   categorized_qml("new_label", legend,
                                   aliases={"old_label": "Label before", "new_label": "Label now",
                                            "change": "Change", "raster": "Source raster"},
                                   outline_width=0.05, map_tip="[% change %]", display_field="change"),
                   "tiles whose label changed since the previous run, coloured by their new label"),
    ]
def graduated_renderer(field: str, breaks: list[float], outline_width: float, fill_alpha: int = 255) -> str:
    """A graduated polygon renderer on ``field``: one range per pair of consecutive ``breaks``, coloured
    along the palette's score ramp (low to high)."""
    colours = score_colours(len(breaks) - 1)
    ranges, symbols = [], []
    for i, (lo, hi, colour) in enumerate(zip(breaks[:-1], breaks[1:], colours, strict=True)):
        ranges.append(f'<range render="true" symbol="{i}" lower="{lo!r}" upper="{hi!r}" '
                      f'label={quoteattr(f"{lo:.3g} - {hi:.3g}")}/>')
        symbols.append(_fill_symbol(str(i), colour, outline_width, fill_alpha))
    sep = "\n      "
    return f"""<renderer-v2 type="graduatedSymbol" attr={quoteattr(field)} graduatedMethod="GraduatedColor"
               symbollevels="0" enableorderby="0" forceraster="0" referencescale="-1">
    <ranges>
      {sep.join(ranges)}
    </ranges>
    <symbols>
      {sep.join(symbols)}
    </symbols>
    <source-symbol>
      {_fill_symbol("0", colours[-1], outline_width, fill_alpha)}
    </source-symbol>
    <mode name="quantile"/>
    <symmetricMode enabled="0" symmetryPoint="0" astride="0"/>
    <rotation/>
    <sizescale/>
    <labelformat format="%1 - %2" decimalplaces="3" trimtrailingzeroes="1"/>
  </renderer-v2>"""


def graduated_qml(field: str, breaks: list[float], aliases: dict[str, str] | None = None,
                  outline_width: float = 0.06, map_tip: str = "", display_field: str = "") -> str:
    """A complete QML: graduated polygon renderer on ``field`` (see :func:`graduated_renderer`)."""
    return _document(graduated_renderer(field, breaks, outline_width) + "\n"
                     + _layer_tail(aliases or {}, map_tip, display_field))


def outline_qml_body(colour: str, outline_width: float, aliases: dict[str, str] | None = None) -> str:
    """Polygons drawn as an outline of ``colour`` only (drawn layers such as the examples)."""
    renderer = f"""<renderer-v2 type="singleSymbol" symbollevels="0" enableorderby="0" forceraster="0"
               referencescale="-1">
    <symbols>
      {_fill_symbol("0", colour, outline_width, fill_alpha=0, outline=colour)}
    </symbols>
    <rotation/>
    <sizescale/>
  </renderer-v2>"""
    return renderer + "\n" + _layer_tail(aliases or {}, "", "")


def outline_qml(colour: str, outline_width: float, aliases: dict[str, str] | None = None) -> str:
    return _document(outline_qml_body(colour, outline_width, aliases))
