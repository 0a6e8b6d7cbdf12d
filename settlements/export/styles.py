"""QGIS styles (QML) generated from the palette: no colour is written here by hand."""

from __future__ import annotations

from xml.sax.saxutils import escape, quoteattr

from ..palette import OUTLINE_COLOUR, Palette, hex_to_rgb

QGIS_VERSION = "3.22.0"


def _rgba(colour: str, alpha: int = 255) -> str:
    r, g, b = hex_to_rgb(colour)
    return f"{r},{g},{b},{alpha}"


def _fill_symbol(name: str, colour: str, outline_width: float, alpha: float = 1.0) -> str:
    return f"""<symbol type="fill" name={quoteattr(name)} alpha="{alpha}" clip_to_extent="1" force_rhr="0">
        <layer class="SimpleFill" enabled="1" locked="0" pass="0">
          <Option type="Map">
            <Option type="QString" name="border_width_map_unit_scale" value="3x:0,0,0,0,0,0"/>
            <Option type="QString" name="color" value="{_rgba(colour)}"/>
            <Option type="QString" name="joinstyle" value="bevel"/>
            <Option type="QString" name="offset" value="0,0"/>
            <Option type="QString" name="offset_map_unit_scale" value="3x:0,0,0,0,0,0"/>
            <Option type="QString" name="offset_unit" value="MM"/>
            <Option type="QString" name="outline_color" value="{_rgba(OUTLINE_COLOUR)}"/>
            <Option type="QString" name="outline_style" value="solid"/>
            <Option type="QString" name="outline_width" value="{outline_width}"/>
            <Option type="QString" name="outline_width_unit" value="MM"/>
            <Option type="QString" name="style" value="solid"/>
          </Option>
        </layer>
      </symbol>"""


def categorized_qml(field: str, palette: Palette, aliases: dict[str, str] | None = None,
                    outline_width: float = 0.06, map_tip: str = "", display_field: str = "") -> str:
    """A categorized polygon renderer on ``field``: one category per palette label."""
    cats = "\n      ".join(
        f'<category render="true" symbol="{i}" value={quoteattr(label)} label={quoteattr(label)}/>'
        for i, (label, _) in enumerate(palette.items())
    )
    symbols = "\n      ".join(
        _fill_symbol(str(i), c, outline_width) for i, (_, c) in enumerate(palette.items())
    )
    alias_xml = "\n    ".join(
        f'<alias field={quoteattr(f)} index="{i}" name={quoteattr(a)}/>'
        for i, (f, a) in enumerate((aliases or {}).items())
    )
    return f"""<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<qgis version="{QGIS_VERSION}" styleCategories="AllStyleCategories" hasScaleBasedVisibilityFlag="0">
  <renderer-v2 type="categorizedSymbol" attr={quoteattr(field)} symbollevels="0" enableorderby="0"
               forceraster="0" referencescale="-1">
    <categories>
      {cats}
    </categories>
    <symbols>
      {symbols}
    </symbols>
    <source-symbol>
      {_fill_symbol("0", "#bdbdbd", outline_width)}
    </source-symbol>
    <rotation/>
    <sizescale/>
  </renderer-v2>
  <aliases>
    {alias_xml}
  </aliases>
  <mapTip>{escape(map_tip)}</mapTip>
  <previewExpression>{escape(display_field)}</previewExpression>
  <layerGeometryType>2</layerGeometryType>
</qgis>
"""
