"""The embedding cache re-embeds exactly what a setting change affects."""

from __future__ import annotations

import pandas as pd

from settlements.config import load_config
from settlements.pipeline import run

from .conftest import scene, write_pipeline


def test_lowering_the_invalid_threshold_embeds_only_the_newly_kept_tiles(tmp_path) -> None:
    scene("bangalore_s2", "section_2_sentinel.tif")
    strict = write_pipeline(tmp_path, "b", "bangalore", tiling={"tile_size": "80m", "max_invalid_fraction": 0.2})
    first = run(load_config(strict)).embedding
    # every tile is read; only the valid enough ones are embedded, the others skipped for a reason
    assert first["tiles_read"] == first["tiles_kept"] + first["tiles_skipped"]
    assert first["tiles_embedded"] == first["tiles_kept"] and first["tiles_skipped"] > 0
    assert first["tiles_skipped"] == first["tiles_skipped_nodata"] + first["tiles_skipped_invalid"]
    meta = pd.read_parquet(tmp_path / "work" / "b" / "embedded.parquet")
    newly = int(((meta["valid_tile"] < 0.8) & (meta["valid_tile"] >= 0.1)).sum())
    assert newly > 0
    lenient = write_pipeline(tmp_path, "b", "bangalore", tiling={"tile_size": "80m", "max_invalid_fraction": 0.9})
    second = run(load_config(lenient)).embedding
    assert second["tiles_embedded"] == newly
    assert second["tiles_kept"] == first["tiles_kept"] + newly
    third = run(load_config(lenient)).embedding
    assert third["tiles_embedded"] == third["tiles_read"] == 0 and third["tiles_reused"] == third["tiles_kept"]
    assert third["tiles_skipped"] == second["tiles_skipped"]  # as before, from the cached validity
