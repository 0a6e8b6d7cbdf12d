"""settlements: map settlements from imagery with pretrained CNN embeddings and k-means."""

import os as _os

__version__ = "0.1.0"

# GDAL's block cache defaults to 5 % of RAM per process, and every DataLoader worker fills its own
# while streaming a huge raster: bound it (in MB) unless the user chose a size. Read by GDAL at its
# first block read, so it must be set before any raster is read.
_os.environ.setdefault("GDAL_CACHEMAX", "256")
