"""Train once, map anywhere, measured: a model made on half of the Mumbai patches, applied to the other half.

The 64 hand-labelled 0.5 m patches of ``data/mumbai_train``, split by patch (sorted by name, taken
alternately) into two pipelines of 32, with the settings of ``make quality`` (50 m tiles, k=8, the
defaults otherwise). Per k-means seed 0-4, the first pipeline fits its clusters, names each by the
majority class of the hand-made masks under its tiles (:func:`tests.mumbai.name_by_majority`, what an
analyst does by eye), has a top model trained on its masks (once: it does not depend on the seed) and
exports its model to one file; the second pipeline takes the model (``clustering: {model: FILE}``: the
changed file reprocesses it) and predicts with it (``predict --model FILE``). Printed: the F1 of
informal settlements on the second pipeline's tiles against its own masks (the mumbai_train README's
reference: a tile is informal when informal settlements cover half its cell) of

  (a) the applied named clusters (the labels of the second's ``tiles`` layer),
  (b) the applied top model (the second's ``predicted_tiles``),
  (c) the second fitting its own clusters and naming them by its own masks (a third pipeline over the
      second's patches: what the transfer spares an analyst, at best),
  (d) colour statistics (per band mean, std and an 8-bin histogram of the scaled pixels, standardised with
      the first's statistics, averaged with the neighbours as the embeddings are): k-means fitted and named
      on the first, applied to the second; and (d') fitted and named on the second itself,

the share of the second's tiles lying farther from their centroid than 90 % of the first's did (the
run's fit measure, ``runs.model_far_share``), and ends with one JSON line.

Time: about 4 minutes on a shared 2-core CPU (embedding 3 x 1,152 tiles once, then about 35 s a seed).

    .venv/bin/python benchmarks/transfer.py [--workdir DIR] [--seeds 0 1 2 3 4]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MUMBAI = ROOT / "data" / "mumbai_train"
PATCHES = MUMBAI / "patches"
CLASSES = ["informal", "formal", "not built up"]


def split() -> tuple[list[str], list[str]]:
    """The 64 patches by name, taken alternately: two halves of the same city, neither chosen by content."""
    names = sorted(p.name.removesuffix("_image.tif") for p in PATCHES.glob("*_image.tif"))
    return names[0::2], names[1::2]


def write_pipeline(folder: Path, name: str, patches: list[str], **sections: Any) -> Path:
    config = {"name": name, "rasters": [{"path": str(PATCHES / f"{p}_image.tif")} for p in patches],
              "regions": {"path": str(MUMBAI / "patches.gpkg"), "id_field": "patch",
                          "where": "patch IN (" + ", ".join(f"'{p}'" for p in patches) + ")"},
              "tiling": {"tile_size": "50m"}, **sections,
              "output": {"dir": str(folder / "outputs" / name), "work_dir": str(folder / "work" / name)}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def informal_f1(truth: pd.DataFrame, predicted: pd.DataFrame, column: str) -> float:
    """F1 of 'informal' over the tiles the reference gives a class (``truth``: tile_id, class)."""
    from settlements.supervised.evaluation import class_scores

    guessed = pd.DataFrame({"tile_id": predicted["tile_id"].to_numpy(), "guess": predicted[column].to_numpy()})
    both = truth.merge(guessed, on="tile_id", how="left")
    guess = both["guess"].fillna("none").astype(str).to_numpy()
    scores = class_scores(both["class"].astype(str).to_numpy(), guess, CLASSES).set_index("class")
    return float(scores.loc["informal", "f1"])


def tile_layer(config: Path, layer: str) -> pd.DataFrame:
    import pyogrio

    from settlements.config import load_config

    cfg = load_config(config)
    name = f"{cfg.name}_supervised.gpkg" if layer == "predicted_tiles" else f"{cfg.name}.gpkg"
    return pyogrio.read_dataframe(cfg.output_dir / name, layer=layer, read_geometry=False)


def colour_inputs(config: Path) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """The kept tiles' colour statistics (embedding order), their neighbours, and the tiles."""
    from settlements.config import load_config
    from settlements.neighbours import tile_neighbours
    from settlements.rasters import load_infos
    from settlements.store import workspace
    from settlements.supervised.train import colour_features
    from settlements.tile_tables import kept_tiles

    ws = workspace(load_config(config))
    infos, tiles = load_infos(ws), kept_tiles(ws)
    return colour_features(infos, tiles), tile_neighbours(tiles, infos), tiles


def colour_f1(first: tuple, second: tuple, truth: tuple[pd.DataFrame, pd.DataFrame], seed: int,
              clustering: Any) -> tuple[float, float]:
    """(d) k-means on colour statistics fitted and named on the first, applied to the second; (d') fitted and
    named on the second."""
    from settlements.clustering import KMeansClusterer
    from settlements.neighbours import with_neighbours
    from settlements.supervised.evaluation import majority_mapping

    mean, sd = first[0].mean(axis=0), first[0].std(axis=0)
    scale = np.where(sd > 0, sd, 1.0)

    def features(part: tuple, m: np.ndarray, s: np.ndarray) -> np.ndarray:
        z = ((part[0] - m) / s).astype(np.float32)
        return with_neighbours(z, part[1], clustering.neighbour_weight, clustering.l2_normalize)

    def named(fit_on: np.ndarray, fit_tiles: pd.DataFrame, fit_truth: pd.DataFrame, apply_to: np.ndarray,
              apply_tiles: pd.DataFrame, apply_truth: pd.DataFrame) -> float:
        km = KMeansClusterer(k=clustering.k, seed=seed, sample_size=clustering.sample_size, niter=clustering.niter,
                             nredo=clustering.nredo, l2_normalize=clustering.l2_normalize).fit(fit_on)
        own = pd.DataFrame({"tile_id": fit_tiles["tile_id"].to_numpy(), "cluster": km.predict(fit_on)[0]})
        merged = own.merge(fit_truth, on="tile_id")
        mapping, _ = majority_mapping(merged["cluster"].to_numpy(), merged["class"].to_numpy())
        applied = km.predict(apply_to)[0]
        labels = pd.DataFrame({"tile_id": apply_tiles["tile_id"].to_numpy(),
                               "label": [mapping.get(int(c), "unlabelled") for c in applied]})
        return informal_f1(apply_truth, labels, "label")

    a, b = features(first, mean, scale), features(second, mean, scale)
    own_sd = second[0].std(axis=0)
    b_own = features(second, second[0].mean(axis=0), np.where(own_sd > 0, own_sd, 1.0))
    return (named(a, first[2], truth[0], b, second[2], truth[1]),
            named(b_own, second[2], truth[1], b_own, second[2], truth[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None, help="keep work and outputs here (default: a temporary "
                    "folder; an existing one reuses its embedding caches)")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not PATCHES.exists():
        raise SystemExit(f"{PATCHES}: missing; run `make data`")
    from settlements.config import load_config
    from settlements.pipeline import export_model, predict, run, train
    from tests.mumbai import name_by_majority, reference_labels, tile_reference

    folder = args.workdir or Path(tempfile.mkdtemp(prefix="settlements-transfer-"))
    folder.mkdir(parents=True, exist_ok=True)
    halves = split()
    reference = reference_labels(PATCHES)
    model = folder / "shared" / "mumbai_first.model.npz"
    print(f"transfer benchmark in {folder}: {len(halves[0])} + {len(halves[1])} patches, seeds {args.seeds}",
          flush=True)
    rows: list[dict[str, Any]] = []
    top_f1 = float("nan")
    truths: tuple[pd.DataFrame, pd.DataFrame] | None = None
    colours: tuple[tuple, tuple] | None = None
    for seed in args.seeds:
        t0 = time.perf_counter()
        first = write_pipeline(folder, "first", halves[0], clustering={"k": 8, "seed": seed},
                               training={"labels": reference, "evaluation": {"enabled": False}})
        second = write_pipeline(folder, "second", halves[1], clustering={"model": str(model)})
        own = write_pipeline(folder, "own", halves[1], clustering={"k": 8, "seed": seed})
        cfg = load_config(first)
        run(cfg)
        name_by_majority(cfg, reference)
        run(cfg)
        if seed == args.seeds[0]:
            train(cfg)  # on the masks: the same top model for every seed
        export_model(cfg, model)
        report = run(load_config(second), skip_unchanged=True)
        assert not report.nothing_to_do  # the model file changed: reprocessed
        c = load_config(own)
        run(c)
        name_by_majority(c, reference)
        run(c)
        if truths is None:
            truths = (tile_reference(cfg, reference), tile_reference(load_config(second), reference))
            colours = (colour_inputs(first), colour_inputs(second))
            predict(load_config(second), model)
            top_f1 = informal_f1(truths[1], tile_layer(second, "predicted_tiles"), "class")
        assert colours is not None
        d, d_own = colour_f1(colours[0], colours[1], truths, seed, load_config(first).clustering)
        runs = tile_layer(second, "runs")
        row = {"seed": seed,
               "a_applied_clusters": informal_f1(truths[1], tile_layer(second, "tiles"), "label"),
               "b_applied_top_model": top_f1,
               "c_own_clusters": informal_f1(truths[1], tile_layer(own, "tiles"), "label"),
               "d_colour_applied": d, "d_colour_own": d_own,
               "first_clusters": informal_f1(truths[0], tile_layer(first, "tiles"), "label"),
               "far_share": float(runs["model_far_share"].iloc[-1])}
        rows.append(row)
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "seed")
              + f"; {time.perf_counter() - t0:.0f} s", flush=True)
    frame = pd.DataFrame(rows).set_index("seed")
    assert truths is not None
    n_informal = int((truths[1]["class"] == "informal").sum())
    print(f"\ninformal-settlement F1 on the second pipeline's {len(truths[1])} tiles with a reference class "
          f"({n_informal} informal), by k-means seed:")
    print(frame.to_string(float_format=lambda v: f"{v:.3f}"))
    print("(a) the first's named clusters applied; (b) the first's top model applied; (c) the second's own "
          "clusters named by its own masks; (d) colour statistics fitted and named on the first, applied; "
          "(d') the same fitted and named on the second; first_clusters: (a)'s clusters on their own tiles; "
          "far_share: the second's tiles beyond 90 % of the first's distance to their centroid")
    summary = {"patches": [len(h) for h in halves], "tiles_with_reference": len(truths[1]),
               "informal_tiles": n_informal, "seeds": list(args.seeds),
               **{f"{k}_min": round(float(frame[k].min()), 4) for k in frame.columns},
               **{f"{k}_max": round(float(frame[k].max()), 4) for k in frame.columns}}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
