"""GPU check: the pipeline on a large mosaic with ResNet-50 and MobileNetV2 on CUDA, in under 5 minutes.

For each backbone it runs the tile, embed and cluster stages and prints tiles/s (end to end over those
stages, the embed stage alone, and the input path alone: reading into uint8 batches with the run's
workers, no model), GPU utilisation sampled during embedding, backbone-only and naive
(read, preprocess, fp32 batch-1 forward per tile) tiles/s and their ratios, the cosine similarity of the
fast path (fp16 autocast, channels_last) to fp32 on the same GPU, and k-means times: FAISS on the GPU
where faiss-gpu is installed, else FAISS on the CPU and a torch k-means on the GPU, said so.
It also runs the inference-engine choice on CUDA (``embedding.engine``, ``--engine``, default auto): each
candidate this machine has (torch fp32 and fp16; ONNX Runtime's CUDA provider in fp32 and its TensorRT
provider in fp16 where onnxruntime-gpu and TensorRT are installed) with its backbone-only tiles/s and the
fidelity gate's figures on the run's tiles, and which one ``auto`` chose; the pipeline run uses it.
Weights: real ones where the torch hub cache (or the MobileNetV2 weights package) has them, else random
initialisation, said so: throughput does not depend on the weight values (the gate's figures do not
need real ones either: both sides run the same network).
Without CUDA it prints one line saying so and exits 0.

    python benchmarks/gpu_check.py [--size 30000] [--source .whl/source.tif]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  (benchmarks/bench.py: mosaic builder, naive and backbone-only loops)


class UtilSampler(threading.Thread):
    """GPU utilisation (%) every 0.2 s while running, via NVML through torch."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[float] = []
        self._halt = threading.Event()

    def run(self) -> None:
        import torch

        while not self._halt.is_set():
            try:
                self.samples.append(float(torch.cuda.utilization()))
            except Exception:  # no NVML: nothing to sample
                return
            time.sleep(0.2)

    def stop(self) -> dict[str, float]:
        self._halt.set()
        self.join(timeout=2)
        s = np.asarray(self.samples or [np.nan])
        return {"gpu_util_mean": float(np.nanmean(s)), "gpu_util_max": float(np.nanmax(s)),
                "samples": len(self.samples)}


def weights_for(name: str, workdir: Path) -> tuple[Path | None, str]:
    """Real weights if this machine has them; else a random-init state dict saved once."""
    import torch
    import torchvision

    from settlements.embedding.backbones import resolve_weights
    from settlements.errors import WeightsError

    try:
        w = resolve_weights(name, None, allow_download=False)
        return None, f"real ImageNet weights ({w.source})"
    except WeightsError:
        path = workdir / f"{name}-random-init.pth"
        if not path.exists():
            torch.manual_seed(0)
            torch.save(torchvision.models.get_model(name, weights=None).state_dict(), path)
        return path, "RANDOM-INIT weights (no weights file on this machine; throughput is the same)"


def torch_kmeans(x: np.ndarray, k: int, niter: int, seed: int = 0) -> tuple[float, float]:
    """Lloyd's k-means on the GPU with torch (random init like FAISS); seconds and inertia."""
    import torch

    xt = torch.from_numpy(x).cuda()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    g = torch.Generator(device="cpu").manual_seed(seed)
    c = xt[torch.randperm(len(xt), generator=g)[:k].cuda()].clone()
    for _ in range(niter):
        lab = torch.cdist(xt, c).argmin(1)
        sums = torch.zeros_like(c).index_add_(0, lab, xt)
        cnt = torch.bincount(lab, minlength=k).clamp_min(1).unsqueeze(1)
        c = sums / cnt
    d = torch.cdist(xt, c).min(1).values
    inertia = float((d.double() ** 2).sum())
    torch.cuda.synchronize()
    return time.perf_counter() - t0, inertia


def fidelity(cfg, n: int = 256) -> tuple[float, float]:  # noqa: ANN001
    """Min cosine similarity of the fast path's embeddings (fp16 autocast, channels_last) to plain fp32
    ones, on real tiles; and the largest difference between model inputs made on the GPU (the
    pipeline's way there) and on the CPU."""
    import pandas as pd
    import torch

    from settlements.embedding.backbones import build_backbone
    from settlements.embedding.infer import TileBlocks, embed_batch, prepare_model
    from settlements.rasters import load_infos
    from settlements.store import workspace

    e = cfg.embedding
    ws = workspace(cfg)
    tiles = pd.read_parquet(ws.tiles).sample(n, random_state=0).sort_values("tile_id")
    w = tiles[["tile_col", "tile_row", "tile_w", "tile_h"]].to_numpy()
    ds = TileBlocks(load_infos(ws)[0], w, w, e.input_size, n)
    item = ds[0]
    x = ds.inputs(item)
    dev = torch.device("cuda")
    input_diff = float((ds.inputs(item, dev).cpu() - x).abs().max())
    model = build_backbone(e.backbone, e.layer, e.weights).model
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.inference_mode():
        plain = model.to(dev).eval().to(memory_format=torch.contiguous_format)
        ref = plain(x.contiguous().to(dev)).float().cpu().numpy()
    fast = embed_batch(prepare_model(model, dev, torch.float16), x, dev, torch.float16)
    cos = (fast * ref).sum(1) / np.linalg.norm(fast, axis=1) / np.linalg.norm(ref, axis=1)
    return float(np.nanmin(cos)), input_diff


def check(backbone: str, mosaic: Path, workdir: Path, args: argparse.Namespace) -> dict:
    import torch

    from settlements.clustering import gpu_available
    from settlements.config import load_config
    from settlements.pipeline import stage_cluster, stage_embed, stage_tile

    weights, weights_note = weights_for(backbone, workdir)
    ns = argparse.Namespace(tile=args.tile, input_size=args.input_size, batch_size=args.batch_size,
                            precision="auto", backbone=backbone)
    config = bench.pipeline_yaml(workdir, mosaic, f"gpu_{backbone}", ns)
    import yaml

    data = yaml.safe_load(config.read_text())
    workers = args.workers if args.workers == "auto" else int(args.workers)
    data["embedding"].update({"num_workers": workers, "device": "cuda",  # auto: one per core but one
                              "engine": args.engine, "engine_min_tiles": 0})
    if weights is not None:
        data["embedding"]["weights"] = str(weights)
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    cfg = load_config(config)
    for stale in cfg.work_dir.glob("*"):
        os.system(f"rm -rf '{stale}'")
    print(f"\n== {backbone}: {weights_note}", flush=True)
    t0 = time.perf_counter()
    n_tiles = stage_tile(cfg)["tiles"]
    t_tile = time.perf_counter() - t0
    sampler = UtilSampler()
    sampler.start()
    t = time.perf_counter()
    stage_embed(cfg)
    t_embed = time.perf_counter() - t
    util = sampler.stop()
    t = time.perf_counter()
    stage_cluster(cfg)
    t_cluster = time.perf_counter() - t
    total = time.perf_counter() - t0
    a = n_tiles / total
    b = bench._backbone_only(cfg, args.backbone_batches)
    c = bench._naive(cfg, args.naive_tiles, device="cuda")
    cos, input_diff = fidelity(cfg)
    from settlements.embedding.infer import InferenceSettings

    workers = InferenceSettings(num_workers=cfg.embedding.num_workers).workers_for(torch.device("cuda"))
    # the input path alone (read, decode, uint8 batches in the ring), as this run read it: an upper bound
    inputs = bench.input_only(config, workers, n_tiles, channels_last=False)["tiles_per_s"]
    print(f"{n_tiles} tiles at {args.input_size} px, batch {args.batch_size}, {workers} DataLoader workers, "
          f"fp16 autocast + channels_last on {torch.cuda.get_device_name()}")
    print(f"input path alone (no model), {workers} workers: {inputs:.0f} tiles/s")
    print(f"stages: tile {t_tile:.1f} s, embed {t_embed:.1f} s ({n_tiles / t_embed:.0f} tiles/s), "
          f"cluster {t_cluster:.1f} s")
    print(f"(a) end-to-end (tile+embed+cluster) {a:.0f} tiles/s; (b) backbone only {b:.0f} tiles/s; "
          f"(c) naive {c:.1f} tiles/s")
    print(f"a/b = {a / b:.3f}; a/c = {a / c:.1f} (target >= 20 on GPU)")
    print(f"GPU utilisation while embedding: mean {util['gpu_util_mean']:.0f} %, max {util['gpu_util_max']:.0f} % "
          f"({util['samples']} samples)")
    print(f"fast path (fp16, channels_last) vs plain fp32 on the GPU: min cosine {cos:.5f}; "
          f"model inputs made on the GPU vs the CPU: max abs diff {input_diff:.2g}")
    engine, precision, _ = bench._chosen(cfg)
    engines = bench.engines_compare(cfg, args.backbone_batches)
    torch_rate = engines["torch fp32"]["backbone_tiles_per_s"]
    print(f"engines on CUDA (auto chose {engine} {precision}; the run embedded with it):")
    for name, v in engines.items():
        g = v["gate"]
        verdict = "reference" if g is None else (f"cosine 1st percentile {g['cosine_p01']:.5f}, ARI {g['ari']:.3f}: "
                                                 f"{'passed' if g['passed'] else 'REFUSED'}")
        print(f"    {name:18s} backbone {v['backbone_tiles_per_s']:8.0f} tiles/s "
              f"({v['backbone_tiles_per_s'] / torch_rate:.2f}x torch fp32); {verdict}")
    emb = np.load(cfg.work_dir / "embeddings.npy")
    km = {}
    import faiss

    for gpu in ([True] if gpu_available() else []) + [False]:
        t = time.perf_counter()
        k = faiss.Kmeans(emb.shape[1], 8, niter=25, seed=0, gpu=gpu, max_points_per_centroid=len(emb), verbose=False)
        k.train(np.ascontiguousarray(emb, dtype=np.float32))
        km["faiss_gpu_s" if gpu else "faiss_cpu_s"] = time.perf_counter() - t
    km["torch_gpu_s"], _ = torch_kmeans(emb, 8, 25)
    km["torch_gpu_s"], km["torch_gpu_inertia"] = torch_kmeans(emb, 8, 25)  # second run: no CUDA warm-up
    note = ("FAISS on the GPU" if gpu_available()
            else "faiss-gpu not installed here: FAISS on the CPU and torch on the GPU")
    print(f"k-means on {emb.shape[0]} x {emb.shape[1]} (k=8, 25 iterations), {note}: " +
          ", ".join(f"{k} {v:.2f}" for k, v in km.items() if k.endswith("_s")))
    return {"backbone": backbone, "weights": weights_note, "tiles": n_tiles, "e2e_tiles_per_s": a,
            "embed_tiles_per_s": n_tiles / t_embed, "backbone_tiles_per_s": b, "naive_tiles_per_s": c,
            "input_only_tiles_per_s": inputs,
            "e2e_over_backbone": a / b, "e2e_over_naive": a / c, **util, "fp16_min_cosine": cos,
            "gpu_cpu_input_max_diff": input_diff, **km, "engine_auto": f"{engine} {precision}",
            "engines": {k: {"backbone_tiles_per_s": v["backbone_tiles_per_s"], "gate": v["gate"]}
                        for k, v in engines.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=30_000, help="mosaic side in pixels")
    ap.add_argument("--source", type=Path, default=None, help="real photo to repeat (default: the Swellendam one)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/settlements-gpu"))
    ap.add_argument("--tile", type=int, default=224)
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", default="auto", help="DataLoader workers (auto: the pipeline's default)")
    ap.add_argument("--backbones", nargs="+", default=["mobilenet_v2", "resnet50"])
    ap.add_argument("--backbone-batches", type=int, default=20)
    ap.add_argument("--naive-tiles", type=int, default=300)
    ap.add_argument("--engine", default="auto", help="embedding.engine of the runs (default auto)")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch (torch.cuda.is_available() is False): nothing to check; "
              "run this on a machine with an NVIDIA GPU")
        return 0
    torch.zeros(1, device="cuda")  # create the CUDA context once, before any timing (as a long job pays it once)
    args.workdir.mkdir(parents=True, exist_ok=True)
    source = args.source or next((p for p in (Path(".whl/source.tif"), bench.SOURCE) if p.exists()), bench.SOURCE)
    t = time.perf_counter()
    mosaic = bench.build_mosaic(args.workdir / f"mosaic_{args.size}.tif", args.size, source)
    print(f"mosaic {args.size}^2 px of {source.name} in {time.perf_counter() - t:.0f} s; "
          f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {os.cpu_count()} CPUs", flush=True)
    results = [check(b, mosaic, args.workdir, args) for b in args.backbones]
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
