"""Writers for the outputs analysts open: GeoPackage, styles, plots."""
