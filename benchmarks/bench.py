"""Throughput and memory benchmark: the pipeline on large mosaics of real pixels.

Builds tiled GeoTIFF mosaics (10k^2 and 30k^2 pixels; --quick: 4k^2 and 8k^2) by mirror-repeating the
Swellendam aerial photo from ../shared/data, written band by band (never the whole raster in memory),
then prints, on this machine:
  (a) end-to-end tiles/s of the pipeline (tile, embed, cluster, export; each size in a child process),
  (b) backbone-only forward tiles/s on in-memory real tiles of the same size (16 distinct batches
      cycled) with the same model settings,
  (c) a naive loop: read one window, preprocess, fp32 forward at batch 1,
  (d) peak RSS of each size's child process (ru_maxrss; its DataLoader worker's shown apart),
  (e) the pipeline's FAISS k-means (fit on all points, then assign them) vs scikit-learn KMeans with its
      defaults on the same embeddings (time as best of 3, inertia in the embedding space), FAISS both on
      the 1280-d embeddings and with clustering.pca_dim 32; the JSON's FAISS figures are the latter's,
  (f) the input path alone, no model: the pipeline's reading of the large mosaic's first tiles (read,
      decode, assemble uint8 batches at the input size, hand over to the main process) in tiles/s with
      1 and 2 DataLoader workers,
  (g) many files: the small mosaic cut into 10 x 10 files (1000^2 px, tiled like it) against the mosaic,
      200 px tiles (the same tiles in both) at the input size, end-to-end kept tiles/s of each,
  (h) the 64 Mumbai patches (../shared/data/mumbai_train, 600^2 px) as 64 files against one VRT of them,
      50 m tiles at 224 px, end-to-end kept tiles/s of each (skipped where the data is missing),
  (i) ``settlements similar`` on the large mosaic's tiles: exact search (every tile scored) vs the cached
      FAISS IVF index, query times and the index's recall@100 against exact search (benchmarks/similar.py),
  (j) per inference engine and precision (embedding.engine, embedding.precision; every candidate ``auto``
      has on this machine): backbone-only tiles/s on the large run's batches (interleaved rounds, best of
      each) and its ratio to torch fp32, the fidelity gate's figures on the large run's sample (1st
      percentile of the per-tile cosine to torch fp32, share of tiles >= 0.995, k-means ARI, verdict), and
      end-to-end tiles/s of the small mosaic run with that engine and precision (n/a where the gate
      refuses it: such a run embeds with torch fp32),
and ends with one JSON line. The pipeline runs use ``embedding.engine: auto`` (``--engine``) with
engine_min_tiles 0, so (a) and (b) are those of the engine ``auto`` chose (``engine_auto`` in the JSON).
Targets (quiet 2-core CPU): a/b >= 0.85, a/c >= 1.5, the chosen engine's backbone-only speed >= 1.8x torch
fp32's with the gate passed,
RSS(30k) <= 1.2 x RSS(10k) and < 2 GiB, FAISS >= 2x faster than scikit-learn at inertia within 1 %,
input path >= 1,500 tiles/s with one worker and >= 1.8x that with two, files over mosaic >= 0.9,
Mumbai files over VRT >= 0.9.

    python benchmarks/bench.py [--quick] [--workdir /tmp/settlements-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "data" / "swellendam_za" / "3420B_2010_328_RGB_LATLNG.tif"
MUMBAI = ROOT / "data" / "mumbai_train"
BAND_ROWS = 512
#: The many-files case: the small mosaic cut into FILES_PER_SIDE^2 files, tiles that divide a file's side.
FILES_PER_SIDE, FILES_TILE = 10, 200


def mirror_index(n: int, period: int) -> np.ndarray:
    """0..n-1 folded onto 0..period-1 by mirroring, so repeats have no seams."""
    i = np.arange(n) % (2 * period)
    return np.where(i < period, i, 2 * period - 1 - i)


def build_mosaic(path: Path, size: int, source: Path = SOURCE) -> Path:
    """A size x size RGB tiled GeoTIFF of mirror-repeated real pixels, written one band of rows at a time."""
    import rasterio
    from rasterio.transform import Affine

    if path.exists():
        with rasterio.open(path) as ds:
            if ds.width == size and ds.height == size:
                return path
    with rasterio.open(source) as src:
        pixels = src.read([1, 2, 3])  # the source photo is small (1098 x 3039)
        t, crs = src.transform, src.crs
    # a pixel grid of the source's resolution anchored at its origin
    profile = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs=crs,
                   transform=Affine(t.a, 0, t.c, 0, t.e, t.f), tiled=True, blockxsize=512, blockysize=512,
                   compress="deflate", zlevel=1, BIGTIFF="IF_SAFER", NUM_THREADS="ALL_CPUS")
    cols = mirror_index(size, pixels.shape[2])
    tmp = path.with_suffix(".tmp.tif")
    with rasterio.open(tmp, "w", **profile) as dst:
        for r0 in range(0, size, BAND_ROWS):
            h = min(BAND_ROWS, size - r0)
            rows = mirror_index(r0 + h, pixels.shape[1])[r0:]
            dst.write(pixels[:, rows][:, :, cols], window=((r0, r0 + h), (0, size)))
    tmp.rename(path)
    return path


def extent_region(mosaic: Path) -> dict:
    """One region: the mosaic's extent (its CRS is EPSG:4326)."""
    import rasterio

    with rasterio.open(mosaic) as ds:
        b = ds.bounds
    wkt = f"POLYGON (({b.left} {b.bottom}, {b.right} {b.bottom}, {b.right} {b.top}, {b.left} {b.top}, " \
          f"{b.left} {b.bottom}))"
    return {"wkt": wkt, "crs": "EPSG:4326"}


def pipeline_yaml(workdir: Path, mosaic: Path | str, name: str, args: argparse.Namespace,
                  regions: dict | None = None, tile: str | None = None) -> Path:
    """A pipeline over ``mosaic`` (a file, or a glob of files); regions: the mosaic's extent unless given."""
    import yaml

    regions = regions or extent_region(Path(mosaic))
    cfg = {
        "name": name,
        "rasters": [{"path": str(mosaic), "bands": [1, 2, 3], "scaling": {"method": "dtype"}}],
        "regions": regions,
        "tiling": {"tile_size": tile or f"{args.tile}px"},
        "embedding": {"backbone": args.backbone, "input_size": args.input_size, "batch_size": args.batch_size,
                      "num_workers": "auto", "precision": args.precision, "engine": args.engine,
                      "engine_min_tiles": 0},
        "clustering": {"k": 8, "seed": 0},
        "output": {"dir": str(workdir / "outputs" / name), "work_dir": str(workdir / "work" / name)},
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def cut_files(mosaic: Path, folder: Path, per_side: int) -> Path:
    """``mosaic`` cut into per_side^2 GeoTIFFs with its own block size (once); their glob pattern."""
    import rasterio

    sys.path.insert(0, str(ROOT))
    from tests.many_files import cut_chips

    with rasterio.open(mosaic) as ds:
        side, block = ds.width // per_side, ds.block_shapes[0][0]
    if len(list(folder.glob("chip_*.tif"))) != per_side ** 2:
        subprocess.run(["rm", "-rf", str(folder)], check=True)
        cut_chips(mosaic, folder, side, side, block=block)
    return folder / "chip_*.tif"


def mumbai_vrt(workdir: Path) -> Path:
    """One VRT of the 64 Mumbai patches (alpha 0 in the gaps between them)."""
    sys.path.insert(0, str(ROOT))
    from tests.many_files import write_vrt

    return write_vrt(workdir / "mumbai.vrt", sorted((MUMBAI / "patches").glob("*_image.tif")), alpha=True)


# ---------------------------------------------------------------------------------------- child

def _chooser(cfg):  # noqa: ANN001, ANN202
    """The engine chooser of a finished run (its sample, exports and gate verdicts in its work folder)."""
    from settlements.embedding.backbones import build_backbone
    from settlements.rasters import load_infos
    from settlements.stages.embed import engine_chooser, inference_settings
    from settlements.store import workspace

    e = cfg.embedding
    ws = workspace(cfg)
    return engine_chooser(cfg, ws, build_backbone(e.backbone, e.layer, e.weights), load_infos(ws),
                          pd_read(ws.tiles), inference_settings(cfg))


def pd_read(path: Path):  # noqa: ANN201
    import pandas as pd

    return pd.read_parquet(path)


def _backbone_rates(cfg, n_batches: int, pairs: list[tuple[str, str]], rounds: int = 2) -> dict[str, float]:  # noqa: ANN001
    """Forward tiles/s of each (engine, precision) on in-memory real tiles, with the pipeline's settings;
    ``rounds`` interleaved rounds, the best of each kept (the machine may be shared).

    Up to 16 distinct batches (tiles spread over the raster, model inputs made beforehand) are cycled:
    one batch repeated would stay in the CPU's cache, which the pipeline's fresh batches never do.
    """
    import numpy as np

    from settlements.embedding.infer import TileBlocks
    from settlements.rasters import load_infos
    from settlements.store import workspace

    e = cfg.embedding
    chooser = _chooser(cfg)
    device = chooser.device
    ws = workspace(cfg)
    info = load_infos(ws)[0]
    tiles = pd_read(ws.tiles)
    distinct = min(n_batches, 16)
    pick = tiles.iloc[np.linspace(0, len(tiles) - 1, distinct * e.batch_size).astype(int)]
    w = pick[["tile_col", "tile_row", "tile_w", "tile_h"]].to_numpy()
    ds = TileBlocks(info, w, w, e.input_size, e.batch_size)
    batches = [ds.inputs(ds[i], device) for i in range(len(ds))]
    runners = {f"{en} {p}": chooser.runner(en, p) for en, p in pairs}
    best = dict.fromkeys(runners, 0.0)
    for run in runners.values():
        for x in batches[:2]:  # warm-up
            run(x)
    for _ in range(rounds):
        for name, run in runners.items():
            _sync(device)
            t0 = time.perf_counter()
            for i in range(n_batches):
                run(batches[i % len(batches)])
            _sync(device)
            best[name] = max(best[name], n_batches * e.batch_size / (time.perf_counter() - t0))
    return best


def _sync(device) -> None:  # noqa: ANN001
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def _chosen(cfg) -> tuple[str, str, dict]:  # noqa: ANN001
    """The engine and precision a finished run embedded with, and its embedding.json."""
    meta = json.loads((cfg.work_dir / "embedding.json").read_text())
    return meta["engine"], meta["precision"], meta


def _backbone_only(cfg, n_batches: int) -> float:  # noqa: ANN001
    """Forward tiles/s of the engine and precision the run embedded with, on in-memory real tiles."""
    engine, precision, _ = _chosen(cfg)
    return _backbone_rates(cfg, n_batches, [(engine, precision)], rounds=1)[f"{engine} {precision}"]


def engines_compare(cfg, n_batches: int) -> dict:  # noqa: ANN001
    """Every candidate engine and precision of this machine on a finished run: backbone-only tiles/s
    (interleaved) and the fidelity gate's figures on the run's sample."""
    from settlements.embedding.engines import candidates

    chooser = _chooser(cfg)
    pairs = candidates(chooser.device, "auto", "auto")
    if ("torch", "fp32") not in pairs:
        pairs.insert(0, ("torch", "fp32"))
    rates = _backbone_rates(cfg, n_batches, pairs)
    out = {}
    for engine, precision in pairs:
        gate = None if (engine, precision) == ("torch", "fp32") else chooser.gate(engine, precision).as_dict()
        out[f"{engine} {precision}"] = {"engine": engine, "precision": precision,
                                        "backbone_tiles_per_s": rates[f"{engine} {precision}"], "gate": gate}
    return out


def _naive(cfg, n_tiles: int, device: str = "cpu") -> float:  # noqa: ANN001
    """Read one window, preprocess, fp32 forward at batch 1, in a loop."""
    import pandas as pd
    import rasterio
    import torch
    from rasterio.windows import Window

    from settlements.embedding.backbones import build_backbone
    from settlements.embedding.infer import to_model_input
    from settlements.rasters import load_infos, read_tile
    from settlements.store import workspace

    e = cfg.embedding
    ws = workspace(cfg)
    info = load_infos(ws)[0]
    tiles = pd.read_parquet(ws.tiles)
    tiles = tiles.sample(min(n_tiles, len(tiles)), random_state=0)
    n_tiles = len(tiles)
    model = build_backbone(e.backbone, e.layer, e.weights).model.eval().to(device)
    with torch.inference_mode(), rasterio.open(info.path) as src:
        model(torch.zeros(1, 3, e.input_size, e.input_size, device=device))
        t0 = time.perf_counter()
        for c, r, w, h in tiles[["tile_col", "tile_row", "tile_w", "tile_h"]].itertuples(index=False):
            px, _ = read_tile(src, info, Window(c, r, w, h))
            model(to_model_input(px, e.input_size)[None].to(device)).cpu()
        return n_tiles / (time.perf_counter() - t0)


def child(config: Path, measure: bool, n_batches: int, n_naive: int) -> dict:
    """One pipeline run in this process; its times and peak RSS."""
    from settlements.config import load_config
    from settlements.pipeline import stage_cluster, stage_embed, stage_export, stage_tile

    cfg = load_config(config)
    times = {}
    t0 = time.perf_counter()
    for name, stage in (("tile", stage_tile), ("embed", stage_embed), ("cluster", stage_cluster),
                        ("export", stage_export)):
        t = time.perf_counter()
        out = stage(cfg)
        times[name] = time.perf_counter() - t
        if name == "tile":
            n_tiles = out["tiles"]
        if name == "embed":
            counts = out
    total = time.perf_counter() - t0
    rss_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss_workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result = {"tiles": n_tiles, "embedded": counts["tiles_embedded"], "kept": counts["tiles_kept"],
              "seconds": total, "stages": times, "e2e_tiles_per_s": n_tiles / total,
              "kept_tiles_per_s": counts["tiles_kept"] / total, "rss_main_mib": rss_self,
              "rss_workers_mib": rss_workers, "embeddings": str(cfg.work_dir / "embeddings.npy")}
    engine, precision, meta = _chosen(cfg)
    result.update({"engine": engine, "precision": precision, "engine_gate": meta.get("engine_gate"),
                   "engine_reason": meta.get("engine_reason"), "engine_rates": meta.get("engine_rates"),
                   "engine_choice_s": float(meta.get("engine_choice_seconds") or 0.0)})
    if measure:
        rates = _backbone_rates(cfg, n_batches, list(dict.fromkeys([(engine, precision), ("torch", "fp32")])))
        result["backbone_tiles_per_s"] = rates[f"{engine} {precision}"]
        result["backbone_torch_fp32_tiles_per_s"] = rates["torch fp32"]
        result["naive_tiles_per_s"] = _naive(cfg, n_naive)
    return result


def input_only(config: Path, workers: int, n_tiles: int, channels_last: bool) -> dict:
    """The pipeline's input path alone over a finished run's first ``n_tiles`` tiles: read, decode and
    assemble uint8 batches at the input size in ``workers`` DataLoader workers, handed to this process.
    ``channels_last``: read as a CPU run does (the file's pixel-interleaved layout), else as a GPU run
    does (band by band)."""
    import pandas as pd

    from settlements.config import load_config
    from settlements.embedding.infer import TileStream, iter_batches
    from settlements.rasters import load_infos
    from settlements.store import workspace
    from settlements.tiling import WINDOW_COLUMNS

    cfg = load_config(config)
    ws = workspace(cfg)
    tiles = pd.read_parquet(ws.tiles).head(n_tiles)
    windows = tiles[WINDOW_COLUMNS].to_numpy()
    stream = TileStream(load_infos(ws), tiles["raster"].to_numpy(), windows[:, :4], windows[:, 4:],
                        cfg.embedding.input_size, cfg.embedding.batch_size)
    n = 0
    t = time.perf_counter()
    for batch in iter_batches(stream, workers, channels_last=channels_last):
        assert all(p.pixels.dtype == __import__("torch").uint8 for p in batch.parts)
        n += len(batch.index)
    seconds = time.perf_counter() - t
    return {"tiles": n, "workers": workers, "channels_last": channels_last, "seconds": seconds,
            "tiles_per_s": n / seconds}


def run_child(config: Path, *flags: str) -> dict:
    """``child`` (or another child mode) in a fresh process, so that each run's peak RSS is its own."""
    cmd = [sys.executable, __file__, "--child", str(config), *flags]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if out.returncode != 0:
        sys.exit(f"run of {config.name} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fresh(workdir: Path, name: str) -> None:
    """Remove a pipeline's work and output folders: every run embeds from scratch."""
    for folder in (workdir / "work" / name, workdir / "outputs" / name):
        subprocess.run(["rm", "-rf", str(folder)], check=True)


def pair(workdir: Path, runs: list[tuple[str, Path | str, dict | None, str]], args: argparse.Namespace) -> dict:
    """End-to-end runs of the same tiles from differently stored rasters; each run's figures by name."""
    out = {}
    for name, rasters, regions, tile in runs:
        fresh(workdir, name)
        r = run_child(pipeline_yaml(workdir, rasters, name, args, regions=regions, tile=tile))
        print(f"    {name}: {r['kept']} kept of {r['tiles']} tiles in {r['seconds']:.1f} s = "
              f"{r['kept_tiles_per_s']:.1f} kept tiles/s (embed {r['stages']['embed']:.1f} s)", flush=True)
        out[name] = r
    return out


# ------------------------------------------------------------------------------------ k-means

def partition_inertia(x: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Sum of squared distances of the points to the mean of their cluster, in the embedding space.

    The same measure for every method, whatever space it clustered in (PCA or not).
    """
    sums = np.zeros((k, x.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, x)
    means = (sums / np.maximum(np.bincount(labels, minlength=k), 1)[:, None]).astype(np.float32)
    return float(sum(((x[s: s + 8192] - means[labels[s: s + 8192]]) ** 2).sum(dtype=np.float64)
                     for s in range(0, len(x), 8192)))


def best_of(repeats: int, run: Callable[[], object]) -> tuple[float, object]:
    """Shortest wall time of ``repeats`` identical runs (seeded, so the same result), and the result."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - t)
    return best, result


def kmeans_compare(path: Path, k: int = 8, seed: int = 0, pca_dim: int = 32, repeats: int = 3) -> dict:
    """The pipeline's FAISS k-means on all points (fit and assign) vs scikit-learn's KMeans with its defaults.

    FAISS runs twice: on the 1280-d embeddings, and with ``clustering.pca_dim`` (a PCA basis from an
    explicit sample, then k-means on all projected points). Inertia is measured in the embedding space.
    Each method's time is its best of ``repeats`` runs (this machine is shared and noisy).
    """
    from sklearn.cluster import KMeans

    from settlements.clustering import KMeansClusterer

    x = np.ascontiguousarray(np.load(path), dtype=np.float32)
    out: dict = {"points": len(x), "dim": x.shape[1], "k": k, "pca_dim": pca_dim, "repeats": repeats}
    out["sklearn_s"], sk = best_of(repeats, lambda: KMeans(n_clusters=k, random_state=seed).fit(x))
    out["sklearn_iter"] = int(sk.n_iter_)
    out["inertia_sklearn"] = partition_inertia(x, sk.labels_, k)
    for name, dim in (("faiss", None), ("faiss_pca", pca_dim)):
        def fit_assign(dim: int | None = dim) -> np.ndarray:
            return KMeansClusterer(k=k, seed=seed, sample_size=len(x), pca_dim=dim, use_gpu=False).fit(x).predict(x)[0]

        out[f"{name}_s"], labels = best_of(repeats, fit_assign)
        out[f"inertia_{name}"] = partition_inertia(x, labels, k)
        out[f"{name}_speedup"] = out["sklearn_s"] / out[f"{name}_s"]
        out[f"{name}_inertia_rel_diff"] = (out[f"inertia_{name}"] - out["inertia_sklearn"]) / out["inertia_sklearn"]
    return out


# -------------------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4k^2 and 8k^2 mosaics, shorter measurements")
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "settlements-bench")
    ap.add_argument("--sizes", type=int, nargs=2, default=None, help="small and large mosaic side in pixels")
    ap.add_argument("--tile", type=int, default=224, help="tile size in pixels")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--engine", default="auto", help="embedding.engine of the pipeline runs (default auto)")
    ap.add_argument("--no-engines", action="store_true", help="skip (j), the per-engine comparison")
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--input-tiles", type=int, default=8000, help="tiles read by the input-only measurement")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--input-only", type=int, default=None, help=argparse.SUPPRESS)  # workers
    ap.add_argument("--channels-last", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engines-of", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    n_batches, n_naive = (10, 40) if args.quick else (40, 150)
    if args.child:
        if args.engines_of:
            from settlements.config import load_config

            result = engines_compare(load_config(args.child), n_batches)
        elif args.input_only is not None:
            result = input_only(args.child, args.input_only, args.input_tiles, args.channels_last)
        else:
            result = child(args.child, args.measure, n_batches, n_naive)
        print(json.dumps(result))
        return
    small, large = args.sizes or ((4000, 8000) if args.quick else (10_000, 30_000))
    if args.quick:
        args.input_tiles = min(args.input_tiles, 1000)
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"benchmark in {args.workdir}: mosaics {small}^2 and {large}^2 px of {SOURCE.name}, "
          f"{args.tile} px tiles at {args.input_size} px, {args.backbone}, batch {args.batch_size}, "
          f"engine {args.engine}, precision {args.precision}, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}", flush=True)
    runs, mosaics, configs = {}, {}, {}
    for size in (small, large):
        t = time.perf_counter()
        mosaic = mosaics[size] = build_mosaic(args.workdir / f"mosaic_{size}.tif", size)
        print(f"mosaic {size}^2: {mosaic} ({mosaic.stat().st_size / 2**20:.0f} MiB, {time.perf_counter() - t:.0f} s)",
              flush=True)
        name = f"bench{size}"
        config = configs[size] = pipeline_yaml(args.workdir, mosaic, name, args)
        fresh(args.workdir, name)
        runs[size] = run_child(config, *(["--measure"] if size == large else []))
        r = runs[size]
        print(f"{size}^2: {r['tiles']} tiles in {r['seconds']:.1f} s = {r['e2e_tiles_per_s']:.1f} tiles/s "
              f"(stages: {', '.join(f'{k} {v:.1f} s' for k, v in r['stages'].items())}); peak RSS main "
              f"{r['rss_main_mib']:.0f} MiB, DataLoader worker {r['rss_workers_mib']:.0f} MiB", flush=True)
    r = runs[large]
    a, b, c = r["e2e_tiles_per_s"], r["backbone_tiles_per_s"], r["naive_tiles_per_s"]
    gate = r["engine_gate"] or {}
    speedup = b / r["backbone_torch_fp32_tiles_per_s"]
    print(f"engine: {r['engine']} {r['precision']} ({r['engine_reason']}); backbone only {b:.1f} tiles/s = "
          f"{speedup:.2f}x torch fp32's {r['backbone_torch_fp32_tiles_per_s']:.1f} (interleaved; target >= 1.8)"
          + (f"; gate: cosine 1st percentile {gate['cosine_p01']:.5f}, ARI {gate['ari']:.3f}" if gate else ""),
          flush=True)
    # the child's own peak (ru_maxrss); its forked DataLoader worker shares most pages, so it is shown apart
    rss = {s: runs[s]["rss_main_mib"] for s in runs}
    print(f"(a) end-to-end {a:.1f} tiles/s; (b) backbone only {b:.1f} tiles/s; (c) naive loop {c:.1f} tiles/s")
    steady = r["tiles"] / max(r["seconds"] - r["engine_choice_s"], 1e-9)
    print(f"a/b = {a / b:.3f} (target >= 0.85); a/c = {a / c:.2f} (target >= 1.5 on CPU, >= 20 on GPU); "
          f"the engine's choice (export, calibration, gates; once per work folder) took {r['engine_choice_s']:.1f} s "
          f"of the run: without it a/b = {steady / b:.3f}")
    print(f"(d) peak RSS of the run's process {small}^2: {rss[small]:.0f} MiB, {large}^2: {rss[large]:.0f} MiB, "
          f"ratio {rss[large] / rss[small]:.3f} (target <= 1.2, and < 2048 MiB)", flush=True)
    km = kmeans_compare(Path(r["embeddings"]))
    print(f"(e) k-means, k={km['k']}, on all {km['points']} x {km['dim']} embeddings (fit + assign every point): "
          f"scikit-learn KMeans (defaults: k-means++, to convergence, {km['sklearn_iter']} iterations) "
          f"{km['sklearn_s']:.2f} s, inertia {km['inertia_sklearn']:.5g}")
    for name, what in (("faiss", f"FAISS on the {km['dim']}-d embeddings"),
                       ("faiss_pca", f"FAISS with clustering.pca_dim: {km['pca_dim']}")):
        print(f"    {what}: {km[name + '_s']:.2f} s ({km[name + '_speedup']:.1f}x faster), inertia "
              f"{km['inertia_' + name]:.5g} ({100 * km[name + '_inertia_rel_diff']:+.2f} % vs scikit-learn)")
    inputs = {(w, cl): run_child(configs[large], "--input-only", str(w), "--input-tiles", str(args.input_tiles),
                                 *(["--channels-last"] if cl else []))["tiles_per_s"]
              for cl in (False, True) for w in (1, 2)}
    i1, i2 = inputs[1, False], inputs[2, False]
    print(f"(f) input path alone ({args.input_tiles} tiles of the {large}^2 mosaic, {args.tile} px at "
          f"{args.input_size} px, uint8 batches of {args.batch_size}), read as a GPU run reads (band by band): "
          f"1 worker {i1:.0f} tiles/s (target >= 1500), 2 workers {i2:.0f} tiles/s = {i2 / i1:.2f}x (target >= 1.8); "
          f"as a CPU run reads (pixel-interleaved, as stored): 1 worker {inputs[1, True]:.0f}, "
          f"2 workers {inputs[2, True]:.0f} tiles/s", flush=True)
    print(f"(g) {FILES_PER_SIDE ** 2} files cut from the {small}^2 mosaic vs the mosaic, {FILES_TILE} px tiles:",
          flush=True)
    files = cut_files(mosaics[small], args.workdir / f"files_{small}", FILES_PER_SIDE)
    extent = extent_region(mosaics[small])
    many = pair(args.workdir, [("mosaic_tiles", mosaics[small], extent, f"{FILES_TILE}px"),
                               ("many_files", files, extent, f"{FILES_TILE}px")], args)
    many_ratio = many["many_files"]["kept_tiles_per_s"] / many["mosaic_tiles"]["kept_tiles_per_s"]
    assert many["many_files"]["kept"] == many["mosaic_tiles"]["kept"], "the files and the mosaic gave other tiles"
    print(f"    files over mosaic: {many_ratio:.3f} (target >= 0.9)", flush=True)
    mumbai_ratio = None
    if (MUMBAI / "patches.gpkg").exists():
        print("(h) the 64 Mumbai patches as 64 files vs one VRT, 50 m tiles:", flush=True)
        regions = {"path": str(MUMBAI / "patches.gpkg"), "id_field": "patch", "name_field": "patch"}
        mum = pair(args.workdir, [("mumbai_vrt", mumbai_vrt(args.workdir), regions, "50m"),
                                  ("mumbai_files", MUMBAI / "patches" / "*_image.tif", regions, "50m")], args)
        assert mum["mumbai_files"]["kept"] == mum["mumbai_vrt"]["kept"], "the patches and the VRT kept other tiles"
        mumbai_ratio = mum["mumbai_files"]["kept_tiles_per_s"] / mum["mumbai_vrt"]["kept_tiles_per_s"]
        print(f"    files over VRT: {mumbai_ratio:.3f} (target >= 0.9)", flush=True)
    else:
        print(f"(h) {MUMBAI} missing (make data): Mumbai files vs VRT not measured")
    per_engine = {} if args.no_engines else compare_engines(args, configs, mosaics, small, large)
    from similar import index_compare  # benchmarks/similar.py, beside this file

    search = index_compare(Path(r["embeddings"]))
    print(json.dumps({
        "similar_exact_query_s": round(search["exact_query_s"], 4),
        "similar_index_query_s": round(search["index_query_s"], 4),
        "similar_index_recall_at_100": round(search["recall_at_100_mean"], 4),
        "e2e_over_backbone": round(a / b, 4), "e2e_over_naive": round(a / c, 4),
        "e2e_over_backbone_without_engine_choice": round(steady / b, 4),
        "engine_choice_s": round(r["engine_choice_s"], 2),
        "rss_ratio_30k_10k": round(rss[large] / rss[small], 4), "rss_30k_mib": round(rss[large], 1),
        "faiss_speedup_vs_sklearn": round(km["faiss_pca_speedup"], 3),
        "inertia_rel_diff": round(abs(km["faiss_pca_inertia_rel_diff"]), 5),
        "faiss_config": f"pca_dim {km['pca_dim']}", "faiss_full_dim_speedup": round(km["faiss_speedup"], 3),
        "faiss_full_dim_inertia_rel_diff": round(abs(km["faiss_inertia_rel_diff"]), 5),
        "input_only_tiles_per_s_1w": round(i1, 1), "input_only_tiles_per_s_2w": round(i2, 1),
        "input_only_2w_over_1w": round(i2 / i1, 3),
        "input_only_cpu_layout_tiles_per_s_1w": round(inputs[1, True], 1),
        "input_only_cpu_layout_tiles_per_s_2w": round(inputs[2, True], 1),
        "many_files_over_mosaic": round(many_ratio, 4),
        "mumbai_files_over_vrt": None if mumbai_ratio is None else round(mumbai_ratio, 4),
        "engine_auto": f"{r['engine']} {r['precision']}",
        "engine_speedup_vs_torch_fp32": round(speedup, 3),
        "engine_cosine_p01": None if not gate else round(gate["cosine_p01"], 6),
        "engine_ari": None if not gate else round(gate["ari"], 4),
        "engines": {name: {"backbone_tiles_per_s": round(v["backbone_tiles_per_s"], 1),
                           "e2e_tiles_per_s": None if v["e2e_tiles_per_s"] is None else round(v["e2e_tiles_per_s"], 1),
                           "cosine_p01": None if v["gate"] is None else round(v["gate"]["cosine_p01"], 6),
                           "ari": None if v["gate"] is None or v["gate"]["ari"] != v["gate"]["ari"]
                           else round(v["gate"]["ari"], 4),
                           "passed": None if v["gate"] is None else v["gate"]["passed"]}
                    for name, v in per_engine.items()},
    }, allow_nan=False))


def compare_engines(args: argparse.Namespace, configs: dict, mosaics: dict, small: int, large: int) -> dict:
    """(j): every candidate engine and precision: backbone only and the gate on the large run, end to end on
    the small mosaic with that setting (a fresh work folder each: export, calibration and gate included)."""
    cmd = [sys.executable, __file__, "--child", str(configs[large]), "--engines-of",
           *(["--quick"] if args.quick else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if out.returncode != 0:
        sys.exit(f"engine comparison failed:\n{out.stderr[-4000:]}")
    found = json.loads(out.stdout.strip().splitlines()[-1])
    torch_rate = found["torch fp32"]["backbone_tiles_per_s"]
    print(f"(j) engines and precisions on this machine ({args.tile} px tiles at {args.input_size} px, batch "
          f"{args.batch_size}): backbone only on the {large}^2 run's batches (interleaved), the fidelity gate on its "
          f"sample, end to end on the {small}^2 mosaic with that setting:", flush=True)
    for name, v in found.items():
        gate = v["gate"]
        v["e2e_tiles_per_s"] = None
        if gate is None or gate["passed"]:
            run_name = f"engine_{v['engine']}_{v['precision']}"
            fresh(args.workdir, run_name)
            ns = argparse.Namespace(**{**vars(args), "engine": v["engine"], "precision": v["precision"]})
            e2e = run_child(pipeline_yaml(args.workdir, mosaics[small], run_name, ns))
            if (e2e["engine"], e2e["precision"]) == (v["engine"], v["precision"]):
                v["e2e_tiles_per_s"] = e2e["e2e_tiles_per_s"]
        figures = ("reference" if gate is None else
                   f"cosine 1st percentile {gate['cosine_p01']:.5f}, >= 0.995 for {gate['cosine_share']:.1%}, "
                   f"ARI {gate['ari']:.3f}: {'passed' if gate['passed'] else 'REFUSED'}")
        e2e_text = f"{v['e2e_tiles_per_s']:.1f}" if v["e2e_tiles_per_s"] is not None else \
            "n/a (refused: such a run embeds with torch fp32)"
        rate = v["backbone_tiles_per_s"]
        print(f"    {name:18s} backbone {rate:7.1f} tiles/s ({rate / torch_rate:.2f}x), end to end {e2e_text}; "
              f"{figures}", flush=True)
    return found


if __name__ == "__main__":
    main()
