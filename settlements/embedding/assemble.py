"""Assemble the pipeline's embedding array from the cache shards, streaming.

The output ``.npy`` is written block by block with plain file writes, gathering each block's rows
from the few cache chunks that hold them; neither all embeddings nor a whole shard is ever held in
memory (a 30k x 30k raster in 32 px tiles is ~880k x 1280 float32 = 4.5 GB).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd

from ..store import atomic_path
from ..tiling import WINDOW_COLUMNS
from .cache import EmbeddingCache


def embedded_table(tiles: pd.DataFrame, keys: list[str], cache: EmbeddingCache,
                   min_valid: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per tile: validity, kept and emb_row; plus, per kept tile in emb_row order, where its row is cached."""
    metas, sources = [], []
    by_raster = tiles.groupby("raster").indices  # one pass, not a scan of every tile per raster
    for r, key in enumerate(keys):
        rt = tiles.iloc[by_raster.get(r, np.empty(0, np.int64))]
        merged = rt[["tile_id", *WINDOW_COLUMNS]].merge(cache.index(key), on=WINDOW_COLUMNS, how="left")
        embedded = merged["embedded"].astype("boolean").fillna(False).to_numpy(dtype=bool)
        kept = (merged["valid_tile"].to_numpy() >= min_valid - 1e-9) & embedded
        metas.append(pd.DataFrame({"tile_id": merged["tile_id"].to_numpy(),
                                   "valid_tile": merged["valid_tile"].to_numpy(),
                                   "valid_cell": merged["valid_cell"].to_numpy(), "kept": kept}))
        sources.append(pd.DataFrame({"raster": r, "chunk": merged["chunk"].to_numpy()[kept],
                                     "chunk_row": merged["chunk_row"].to_numpy()[kept].astype(np.int64)}))
    meta = pd.concat(metas, ignore_index=True) if metas else pd.DataFrame(
        columns=["tile_id", "valid_tile", "valid_cell", "kept"])
    meta["emb_row"] = -1
    meta.loc[meta["kept"], "emb_row"] = np.arange(int(meta["kept"].sum()))
    meta["emb_row"] = meta["emb_row"].astype(np.int64)
    source = pd.concat(sources, ignore_index=True) if sources else pd.DataFrame(
        {"raster": [], "chunk": [], "chunk_row": []})
    return meta, source


def embed_counts(meta: pd.DataFrame, read: np.ndarray) -> dict[str, int]:
    """What the embed stage did with each tile (``read``: ids of the tiles whose pixels it read).

    Every tile is kept (``embedded`` now by the CNN, or ``reused`` from the cache) or ``skipped``:
    ``skipped_nodata`` without a single valid pixel, ``skipped_invalid`` with some but fewer than
    the threshold. ``read`` counts tiles read this run, embedded or not.
    """
    kept = meta["kept"].to_numpy(dtype=bool)
    new = meta["tile_id"].isin(read).to_numpy()
    empty = meta["valid_tile"].fillna(0.0).to_numpy() <= 0
    return {"tiles_embedded": int((kept & new).sum()), "tiles_reused": int((kept & ~new).sum()),
            "tiles_kept": int(kept.sum()), "tiles_skipped": int((~kept).sum()),
            "tiles_skipped_nodata": int((~kept & empty).sum()), "tiles_skipped_invalid": int((~kept & ~empty).sum()),
            "tiles_read": int(new.sum())}


def write_embeddings(target: Path, source: pd.DataFrame, keys: list[str], cache: EmbeddingCache, dim: int,
                     block_rows: int = 2048, open_chunks: int = 4) -> int:
    """Write the kept rows, in order, as a float32 ``(n, dim)`` .npy; return n.

    Memory: a block of rows, its gathers and ``open_chunks`` chunks (2048 rows of 1280 floats each:
    about 60 MB in all, whatever the number of tiles; 8192-row blocks written through a copy took 125 MB).
    """
    n = len(source)
    rasters = source["raster"].to_numpy()
    chunks = source["chunk"].to_numpy()
    rows = source["chunk_row"].to_numpy()
    loaded: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()

    def chunk(r: int, name: str) -> np.ndarray:
        if (r, name) in loaded:
            loaded.move_to_end((r, name))
        else:
            loaded[(r, name)] = cache.chunk_embeddings(keys[r], name)
            if len(loaded) > open_chunks:
                loaded.popitem(last=False)
        return loaded[(r, name)]

    with atomic_path(target, suffix=".npy") as tmp, tmp.open("wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                                 "fortran_order": False, "shape": (n, dim)})
        for s in range(0, n, block_rows):
            e = min(s + block_rows, n)
            out = np.empty((e - s, dim), dtype=np.float32)
            pairs = pd.DataFrame({"r": rasters[s:e], "c": chunks[s:e]})
            for (r, name), pos in pairs.groupby(["r", "c"], sort=False).indices.items():
                out[pos] = chunk(int(r), str(name))[rows[s:e][pos]]
            f.write(memoryview(out).cast("B"))  # type: ignore[arg-type]  # no copy
    return n
