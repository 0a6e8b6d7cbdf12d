"""Throughput and memory benchmark: the pipeline on large mosaics of real pixels.

Builds tiled GeoTIFF mosaics (10k^2 and 30k^2 pixels; --quick: 4k^2 and 8k^2) by mirror-repeating the
Swellendam aerial photo from ../shared/data, written band by band (never the whole raster in memory),
then prints, on this machine:
  (a) end-to-end tiles/s of the pipeline (tile, embed, cluster, export; each size in a child process),
  (b) backbone-only forward tiles/s on in-memory tensors of the same size and the same model settings,
  (c) a naive loop: read one window, preprocess, fp32 forward at batch 1,
  (d) peak RSS of each size's child process (ru_maxrss; its DataLoader worker's shown apart),
  (e) FAISS k-means on all points vs scikit-learn KMeans on the same embeddings (time, inertia),
and ends with one JSON line. Targets (quiet 2-core CPU): a/b >= 0.85, a/c >= 1.5,
RSS(30k) <= 1.2 x RSS(10k) and < 2 GiB, FAISS >= 2x faster than scikit-learn at inertia within 1 %.

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
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "data" / "swellendam_za" / "3420B_2010_328_RGB_LATLNG.tif"
BAND_ROWS = 512


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
                   compress="deflate", zlevel=1, BIGTIFF="IF_SAFER")
    cols = mirror_index(size, pixels.shape[2])
    tmp = path.with_suffix(".tmp.tif")
    with rasterio.open(tmp, "w", **profile) as dst:
        for r0 in range(0, size, BAND_ROWS):
            h = min(BAND_ROWS, size - r0)
            rows = mirror_index(r0 + h, pixels.shape[1])[r0:]
            dst.write(pixels[:, rows][:, :, cols], window=((r0, r0 + h), (0, size)))
    tmp.rename(path)
    return path


def pipeline_yaml(workdir: Path, mosaic: Path, name: str, args: argparse.Namespace) -> Path:
    import rasterio
    import yaml

    with rasterio.open(mosaic) as ds:
        b = ds.bounds
    wkt = f"POLYGON (({b.left} {b.bottom}, {b.right} {b.bottom}, {b.right} {b.top}, {b.left} {b.top}, " \
          f"{b.left} {b.bottom}))"
    cfg = {
        "name": name,
        "rasters": [{"path": str(mosaic), "bands": [1, 2, 3], "scaling": {"method": "dtype"}}],
        "regions": {"wkt": wkt, "crs": "EPSG:4326"},
        "tiling": {"tile_size": f"{args.tile}px"},
        "embedding": {"backbone": args.backbone, "input_size": args.input_size, "batch_size": args.batch_size,
                      "num_workers": 1, "precision": args.precision},
        "clustering": {"k": 8, "seed": 0},
        "output": {"dir": str(workdir / "outputs" / name), "work_dir": str(workdir / "work" / name)},
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------- child

def _backbone_only(cfg, n_batches: int) -> float:  # noqa: ANN001
    """Forward tiles/s on in-memory real tiles, with the pipeline's model settings."""
    import pandas as pd

    from settlements.embedding.backbones import build_backbone
    from settlements.embedding.infer import InferenceSettings, TileBlocks, embed_batch, prepare_model
    from settlements.pipeline import load_infos, workspace

    e = cfg.embedding
    settings = InferenceSettings(e.device, e.precision, e.batch_size, e.num_workers)
    device = settings.torch_device()
    amp = settings.autocast_dtype(device)
    ws = workspace(cfg)
    info = load_infos(ws)[0]
    tiles = pd.read_parquet(ws.tiles).head(e.batch_size)
    w = tiles[["tile_col", "tile_row", "tile_w", "tile_h"]].to_numpy()
    x = TileBlocks(info, w, w, e.input_size, e.batch_size)[0][1]
    model = prepare_model(build_backbone(e.backbone, e.layer, e.weights).model, device)
    embed_batch(model, x, device, amp)  # warm-up
    t0 = time.perf_counter()
    for _ in range(n_batches):
        embed_batch(model, x, device, amp)
    return n_batches * len(x) / (time.perf_counter() - t0)


def _naive(cfg, n_tiles: int, device: str = "cpu") -> float:  # noqa: ANN001
    """Read one window, preprocess, fp32 forward at batch 1, in a loop."""
    import pandas as pd
    import rasterio
    import torch
    from rasterio.windows import Window

    from settlements.embedding.backbones import build_backbone
    from settlements.embedding.infer import to_model_input
    from settlements.pipeline import load_infos, workspace
    from settlements.rasters import read_tile

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
    result = {"tiles": n_tiles, "embedded": counts["tiles_embedded"], "seconds": total, "stages": times,
              "e2e_tiles_per_s": n_tiles / total, "rss_main_mib": rss_self, "rss_workers_mib": rss_workers,
              "embeddings": str(cfg.work_dir / "embeddings.npy")}
    if measure:
        result["backbone_tiles_per_s"] = _backbone_only(cfg, n_batches)
        result["naive_tiles_per_s"] = _naive(cfg, n_naive)
    return result


# ------------------------------------------------------------------------------------ k-means

def kmeans_compare(path: Path, k: int = 8, niter: int = 25, seed: int = 0) -> dict:
    """FAISS k-means (the pipeline's) vs scikit-learn KMeans on all points: time and inertia."""
    import faiss
    from sklearn.cluster import KMeans

    x = np.ascontiguousarray(np.load(path), dtype=np.float32)

    def inertia(centroids: np.ndarray) -> float:
        index = faiss.IndexFlatL2(x.shape[1])
        index.add(np.ascontiguousarray(centroids, dtype=np.float32))
        d, _ = index.search(x, 1)
        return float(d.astype(np.float64).sum())

    t = time.perf_counter()
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, max_points_per_centroid=len(x), verbose=False)
    km.train(x)
    t_faiss = time.perf_counter() - t
    t = time.perf_counter()
    sk = KMeans(n_clusters=k, n_init=1, max_iter=niter, random_state=seed).fit(x)
    t_sk = time.perf_counter() - t
    i_f, i_s = inertia(km.centroids), inertia(sk.cluster_centers_)
    return {"points": len(x), "dim": x.shape[1], "faiss_s": t_faiss, "sklearn_s": t_sk, "inertia_faiss": i_f,
            "inertia_sklearn": i_s, "speedup": t_sk / t_faiss, "inertia_rel_diff": abs(i_f - i_s) / i_s}


# -------------------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4k^2 and 8k^2 mosaics, shorter measurements")
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "settlements-bench")
    ap.add_argument("--sizes", type=int, nargs=2, default=None, help="small and large mosaic side in pixels")
    ap.add_argument("--tile", type=int, default=224, help="tile size in pixels")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    n_batches, n_naive = (10, 40) if args.quick else (40, 150)
    if args.child:
        print(json.dumps(child(args.child, args.measure, n_batches, n_naive)))
        return
    small, large = args.sizes or ((4000, 8000) if args.quick else (10_000, 30_000))
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"benchmark in {args.workdir}: mosaics {small}^2 and {large}^2 px of {SOURCE.name}, "
          f"{args.tile} px tiles at {args.input_size} px, {args.backbone}, batch {args.batch_size}, "
          f"precision {args.precision}, {os.cpu_count()} CPUs", flush=True)
    runs = {}
    for size in (small, large):
        t = time.perf_counter()
        mosaic = build_mosaic(args.workdir / f"mosaic_{size}.tif", size)
        print(f"mosaic {size}^2: {mosaic} ({mosaic.stat().st_size / 2**20:.0f} MiB, {time.perf_counter() - t:.0f} s)",
              flush=True)
        name = f"bench{size}"
        config = pipeline_yaml(args.workdir, mosaic, name, args)
        for stale in (args.workdir / "work" / name).glob("*"):  # every run embeds from scratch
            subprocess.run(["rm", "-rf", str(stale)], check=True)
        cmd = [sys.executable, __file__, "--child", str(config)] + (["--measure"] if size == large else [])
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if out.returncode != 0:
            sys.exit(f"run on the {size}^2 mosaic failed:\n{out.stderr[-4000:]}")
        runs[size] = json.loads(out.stdout.strip().splitlines()[-1])
        r = runs[size]
        print(f"{size}^2: {r['tiles']} tiles in {r['seconds']:.1f} s = {r['e2e_tiles_per_s']:.1f} tiles/s "
              f"(stages: {', '.join(f'{k} {v:.1f} s' for k, v in r['stages'].items())}); peak RSS main "
              f"{r['rss_main_mib']:.0f} MiB, DataLoader worker {r['rss_workers_mib']:.0f} MiB", flush=True)
    r = runs[large]
    a, b, c = r["e2e_tiles_per_s"], r["backbone_tiles_per_s"], r["naive_tiles_per_s"]
    # the child's own peak (ru_maxrss); its forked DataLoader worker shares most pages, so it is shown apart
    rss = {s: runs[s]["rss_main_mib"] for s in runs}
    print(f"(a) end-to-end {a:.1f} tiles/s; (b) backbone only {b:.1f} tiles/s; (c) naive loop {c:.1f} tiles/s")
    print(f"a/b = {a / b:.3f} (target >= 0.85); a/c = {a / c:.2f} (target >= 1.5 on CPU, >= 20 on GPU)")
    print(f"(d) peak RSS of the run's process {small}^2: {rss[small]:.0f} MiB, {large}^2: {rss[large]:.0f} MiB, "
          f"ratio {rss[large] / rss[small]:.3f} (target <= 1.2, and < 2048 MiB)", flush=True)
    km = kmeans_compare(Path(r["embeddings"]))
    print(f"(e) k-means on {km['points']} x {km['dim']}: FAISS {km['faiss_s']:.2f} s, "
          f"scikit-learn {km['sklearn_s']:.2f} s "
          f"({km['speedup']:.1f}x); inertia {km['inertia_faiss']:.4g} vs {km['inertia_sklearn']:.4g} "
          f"(rel. diff {km['inertia_rel_diff']:.4f})")
    print(json.dumps({
        "e2e_over_backbone": round(a / b, 4), "e2e_over_naive": round(a / c, 4),
        "rss_ratio_30k_10k": round(rss[large] / rss[small], 4), "rss_30k_mib": round(rss[large], 1),
        "faiss_speedup_vs_sklearn": round(km["speedup"], 3), "inertia_rel_diff": round(km["inertia_rel_diff"], 5),
    }))


if __name__ == "__main__":
    main()
