"""settlements: map settlements from imagery with pretrained CNN embeddings and k-means."""

import os as _os

__version__ = "0.1.0"

# GDAL's block cache defaults to 5 % of RAM per process, and every DataLoader worker fills its own
# while streaming a huge raster: bound it (in MB) unless the user chose a size. Read by GDAL at its
# first block read, so it must be set before any raster is read.
_os.environ.setdefault("GDAL_CACHEMAX", "256")


def _openblas_coretype() -> str | None:
    """The OpenBLAS kernel family for this CPU, from its flags (None: leave OpenBLAS to decide).

    faiss-cpu bundles an OpenBLAS (0.3.15) older than recent CPUs: it does not recognise them and
    falls back to its generic 'Prescott' kernels, which made FAISS k-means on 18k x 1280 embeddings
    1.6x slower here. Naming the family it does know fixes that (same results).
    """
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return None
    if {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


# Read by each OpenBLAS when it is loaded, so before faiss is imported; a user's setting wins.
if "OPENBLAS_CORETYPE" not in _os.environ and (_core := _openblas_coretype()) is not None:
    _os.environ["OPENBLAS_CORETYPE"] = _core
