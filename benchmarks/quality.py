"""Cluster quality against hand-made references: the Mumbai masks and the Olinda spectral rule.

For each setting (embedding and clustering settings over the pipeline's defaults) it runs the
pipeline's own stages on

  * ``data/mumbai_train``: the 64 hand-labelled 0.5 m Pleiades patches, tile_size 50m, k=8; reference per
    tile from the masks (``training.labels`` ``source: raster``): informal if informal settlements cover
    >= 50 %; formal if built-up + impervious >= 50 % and informal < 10 %; not built up if vegetation +
    barren + water >= 50 % and informal < 10 %; else mixed (left out);
  * ``data/olinda_brazil``: the demo scene (8px tiles of 28.5 m Landsat, k=8) against the NIR/NDVI rule
    (``source: spectral``: water, vegetation, built-up);

and prints, per scene and setting: the F1 of each reference class when every cluster is named by its
majority reference class, NMI and ARI (min and max over k-means seeds 0-4), the same for k-means on
colour statistics (per band mean, std, 8-bin histogram), the agreement (ARI) of the k-means restarts
with the kept one, the blocked 5-fold cross-validated F1 of the top model and of the fine-tuned model
(the top model first, then the last two blocks at a small learning rate with flips, rotations and
shifts; fine tuned once per CNN, so settings that differ only in clustering share the figure), and
the CNN's tiles/s, timed on one batch with the settings interleaved, as a ratio to ``before`` (the
machine is shared: ratios within one run are what to compare). Embeddings are computed once per CNN
(the pipeline's embedding cache); k-means runs per seed on them. It ends with one JSON line: the
``defaults`` on Mumbai against the issue's targets, ``before``, and Olinda.

Time: about 45 minutes on a shared, loaded 2-core CPU (fine tuning is most of it: ``--no-finetune`` or ``--quick``
for a first look, ``--finetune-epochs`` / ``--finetune-max-tiles`` to bound it).

With ``--engine ENGINE[:PRECISION]`` (e.g. ``auto``, ``openvino:bf16``) every setting embeds with that
inference engine (``embedding.engine``, ``embedding.engine_min_tiles: 0`` so ``auto`` chooses even on these
small scenes; a setting the fidelity gate refuses falls back to torch fp32, as a run would); each line and
the JSON say which engine embedded. Compare with a run without it (torch fp32 on a CPU).

    .venv/bin/python benchmarks/quality.py [--quick] [--workdir DIR] [--setting NAME:key=value,...] [--engine E]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
SEEDS = range(5)
MUMBAI = ROOT / "data" / "mumbai_train"
OLINDA = ROOT / "data" / "olinda_brazil"

MUMBAI_LABELS = {
    "source": "raster", "path": str(MUMBAI / "patches" / "*_mask.tif"),
    "classes": {1: "informal", 2: "built-up", 3: "impervious", 4: "vegetation", 5: "barren", 6: "water"},
    "ignore": [0], "min_share": 0.5,
    "groups": {"informal": {"classes": ["informal"]},
               "formal": {"classes": ["built-up", "impervious"], "below": {"informal": 0.1}},
               "not built up": {"classes": ["vegetation", "barren", "water"], "below": {"informal": 0.1}}},
}

#: Settings compared, as overrides of the pipeline's defaults. ``before``: the defaults before issue 16 (the
#: final 1280-d feature map, no L2, one k-means run, tiles alone); the others change one thing of the defaults.
SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "before": {"embedding": {"input_size": 96, "layer": "final"},
               "clustering": {"nredo": 1, "l2_normalize": False, "neighbour_weight": 0},
               "training": {"top_model": {"neighbours": False}}},
    "defaults": {},
    "no neighbours": {"clustering": {"neighbour_weight": 0}, "training": {"top_model": {"neighbours": False}}},
    "neighbours 0.5": {"clustering": {"neighbour_weight": 0.5}},
    "final layer": {"embedding": {"layer": "final"}},
    "no L2": {"clustering": {"l2_normalize": False}},
    "nredo 1": {"clustering": {"nredo": 1}},
    "input 128": {"embedding": {"input_size": 128}},
}
#: Measured too, but 5x the CNN's cost (so not run by default): ``--setting "final 224:embedding.layer=final,
#: embedding.input_size=224"``.


@dataclass(frozen=True)
class Scene:
    name: str
    base: dict[str, Any]
    labels: dict[str, Any]
    classes: tuple[str, ...]  # the reference classes reported by F1, first is the headline


def scenes() -> list[Scene]:
    mumbai = {"rasters": [{"path": str(MUMBAI / "patches" / "*_image.tif")}],
              "regions": {"path": str(MUMBAI / "patches.gpkg"), "id_field": "patch"},
              "tiling": {"tile_size": "50m"}, "clustering": {"k": 8}}
    olinda = {"rasters": [{"path": str(OLINDA / "L7_ETMs.tif"), "bands": [3, 2, 1],
                           "scaling": {"method": "percentile", "low": 2, "high": 98}}],
              "regions": {"path": str(OLINDA / "olinda1.shp"), "id_field": "CD_GEOCODI", "name_field": "NM_BAIR"},
              "tiling": {"tile_size": "8px"}, "clustering": {"k": 8}}
    return [Scene("mumbai", mumbai, MUMBAI_LABELS, ("informal", "formal", "not built up")),
            Scene("olinda", olinda, {"source": "spectral"}, ("built-up", "vegetation", "water"))]


def parse_setting(text: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """``NAME:section.key=value,...`` (values parsed as YAML) -> name and overrides."""
    name, _, body = text.partition(":")
    out: dict[str, dict[str, Any]] = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        section, _, leaf = key.strip().partition(".")
        out.setdefault(section, {})[leaf] = yaml.safe_load(value)
    return name, out


def pipeline_yaml(path: Path, scene: Scene, overrides: dict[str, dict[str, Any]], finetune: dict[str, Any],
                  folds: int, work_dir: Path, out_dir: Path) -> Path:
    """Write the scene's pipeline with ``overrides`` to ``path``: one config file per scene, rewritten for
    each setting, so its work folder (and the embedding cache in it) stays that one pipeline's."""
    data: dict[str, Any] = {"name": scene.name, **{k: dict(v) if isinstance(v, dict) else v
                                                     for k, v in scene.base.items()}}
    data["training"] = {"labels": scene.labels, "finetune": finetune,
                        "evaluation": {"folds": folds, "finetune": bool(finetune.get("enabled"))}}
    for section, values in overrides.items():
        data[section] = {**data.get(section, {}), **values}
    data["output"] = {"dir": str(out_dir), "work_dir": str(work_dir)}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cnn_key(scene: Scene, overrides: dict[str, dict[str, Any]]) -> tuple[str, str, int]:
    """The CNN a setting embeds with: backbone, the layer it is cut at, input size."""
    from settlements.config import Embedding
    from settlements.embedding.backbones import resolve_layer

    e = Embedding(**{**scene.base.get("embedding", {}), **overrides.get("embedding", {})})
    return e.backbone, resolve_layer(e.backbone, e.layer), e.input_size


@dataclass
class Result:
    scene: str
    setting: str
    tiles: int = 0
    labelled: int = 0
    tiles_per_s: float = float("nan")  # the embed stage, when this setting embedded its tiles (not from cache)
    forward_per_s: float = float("nan")  # the CNN alone, timed interleaved with the other settings
    engine: str = "torch fp32"  # what embedded the tiles (embedding.json), and the gate's 1st-percentile cosine
    engine_cosine_p01: float = float("nan")
    cluster_s: float = float("nan")
    cnn: pd.DataFrame = field(default_factory=pd.DataFrame)
    colour: pd.DataFrame = field(default_factory=pd.DataFrame)
    supervised: dict[str, float] = field(default_factory=dict)
    fine_tuned_as: str | None = None  # the setting of the same CNN whose fine tuning this one shares


def seed_scores(features: np.ndarray, y: np.ndarray, classes: tuple[str, ...], clustering: Any,
                near: np.ndarray, pca: bool = True) -> pd.DataFrame:
    """Per seed: majority-named F1 of each class, NMI, ARI, purity of k-means on ``features`` (each row
    averaged with its neighbours ``near`` as the clustering settings say, as the pipeline does)."""
    from settlements.clustering import KMeansClusterer
    from settlements.neighbours import with_neighbours
    from settlements.supervised.evaluation import class_scores, cluster_quality, majority_mapping

    has = pd.notna(y)
    truth = y[has].astype(str)
    features = with_neighbours(features, near, clustering.neighbour_weight, clustering.l2_normalize)
    rows = []
    for seed in SEEDS:
        km = KMeansClusterer(k=clustering.k, seed=seed, sample_size=clustering.sample_size, niter=clustering.niter,
                             nredo=clustering.nredo, pca_dim=clustering.pca_dim if pca else None,
                             l2_normalize=clustering.l2_normalize)
        labels = km.fit(features).predict(features)[0][has]
        mapping, fallback = majority_mapping(labels, truth)
        named = np.asarray([mapping.get(int(c), fallback) for c in labels], dtype=object).astype(str)
        f1 = class_scores(truth, named, list(classes)).set_index("class")["f1"]
        restarts = km.restart_agreement_ or {}
        rows.append({"seed": seed, **{f"f1_{c}": float(f1[c]) for c in classes}, **cluster_quality(truth, labels),
                     "restart_ari_min": restarts.get("min"), "restart_ari_mean": restarts.get("mean")})
    return pd.DataFrame(rows)


def evaluate_setting(config: Path, scene: Scene, colour_cache: dict[str, np.ndarray]) -> Result:
    """Run the stages, then k-means per seed, colour k-means and the blocked cross-validation."""
    from settlements.config import load_config
    from settlements.neighbours import tile_neighbours
    from settlements.pipeline import door, stage_cluster, stage_embed, stage_tile
    from settlements.products import outputs
    from settlements.rasters import load_infos
    from settlements.store import workspace
    from settlements.supervised.evaluation import standardise
    from settlements.supervised.train import _class_column, blocked_tiles, colour_features, evaluate
    from settlements.supervised.training_labels import tile_labels

    cfg = load_config(config)
    ws = workspace(cfg)
    stage_tile(cfg)
    t0 = time.perf_counter()
    counts = stage_embed(cfg)
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    stage_cluster(cfg, refit=True)
    cluster_s = time.perf_counter() - t0
    infos = load_infos(ws)
    tiles = blocked_tiles(cfg, ws, infos)
    emb = np.load(ws.embeddings)
    assert cfg.training is not None
    y = _class_column(tiles, tile_labels(cfg, cfg.training.labels))
    res = Result(scene.name, config.stem, tiles=len(tiles), labelled=int(pd.notna(y).sum()), cluster_s=cluster_s)
    if counts["tiles_embedded"]:
        res.tiles_per_s = counts["tiles_embedded"] / seconds
    meta = json.loads(ws.embed_meta.read_text())
    res.engine = f"{meta.get('engine', 'torch')} {meta.get('precision', 'fp32')}"
    res.engine_cosine_p01 = float((meta.get("engine_gate") or {}).get("cosine_p01", float("nan")))
    near = tile_neighbours(tiles, infos)
    res.cnn = seed_scores(emb, y, scene.classes, cfg.clustering, near)
    if scene.name not in colour_cache:
        colour_cache[scene.name] = standardise(colour_features(infos, tiles))
    res.colour = seed_scores(colour_cache[scene.name], y, scene.classes, cfg.clustering, near, pca=False)
    with door(cfg) as committed:  # the evaluation files, written as `settlements train` writes them
        evaluate(cfg, committed, infos, tiles, emb, y, y)
    scores = pd.read_csv(outputs(cfg).evaluation)
    for method in ("top_model", "fine_tuned", "kmeans"):
        s = scores[scores["method"] == method].set_index("class")["f1"]
        if len(s):
            res.supervised[method] = float(s[scene.classes[0]])
            res.supervised[f"{method}_macro"] = float(s["macro avg"])
    return res


def forward_rates(embeddings: dict[str, Any], tile_px: int, rounds: int = 10, batch: int = 64) -> dict[str, float]:
    """Tiles/s of each setting's CNN (its ``embedding`` settings) on one batch of ``tile_px`` tiles: best of
    ``rounds``, the settings interleaved, so the load of a shared machine weighs on all alike (settings of
    one CNN share a figure)."""
    import torch

    from settlements.embedding.backbones import build_backbone
    from settlements.embedding.infer import forward, prepare_model, to_model_input

    cpu = torch.device("cpu")
    models: dict[tuple[str, str, int], tuple[Any, torch.Tensor]] = {}
    which = {}
    raw = torch.rand(batch, 3, tile_px, tile_px)
    for name, e in embeddings.items():
        bb = build_backbone(e.backbone, e.layer, e.weights, allow_download=False)
        key = (bb.name, bb.layer, e.input_size)
        which[name] = key
        if key not in models:
            models[key] = (prepare_model(bb.model, cpu, None), to_model_input(raw, e.input_size))
    best = dict.fromkeys(models, float("inf"))
    for _ in range(rounds):
        for key, (model, x) in models.items():
            t = time.perf_counter()
            forward(model, x, cpu, None)
            best[key] = min(best[key], time.perf_counter() - t)
    return {name: batch / best[key] for name, key in which.items()}


def spread(frame: pd.DataFrame, column: str) -> str:
    values = frame[column].dropna()
    return f"{values.min():.3f}-{values.max():.3f}" if len(values) else "-"


def report(results: list[Result]) -> None:
    for scene in dict.fromkeys(r.scene for r in results):
        rows = [r for r in results if r.scene == scene]
        base = next((r.forward_per_s for r in rows if r.setting == "before"), float("nan"))
        classes = [c.removeprefix("f1_") for c in rows[0].cnn.columns if c.startswith("f1_")]
        print(f"\n{scene}: {rows[0].tiles} tiles, {rows[0].labelled} with a reference class; min-max over seeds "
              f"{SEEDS.start}-{SEEDS.stop - 1}; clusters named by their majority reference class")
        head = (f"{'setting':<12} {'features':<8} " + " ".join(f"{'F1 ' + c:<13}" for c in classes)
                + f" {'NMI':<13} {'ARI':<13} {'restart ARI':<13} {'top model':<9} {'fine-tuned':<10} "
                "CNN tiles/s (ratio)")
        print(head)
        for r in rows:
            sup = r.supervised
            for what, frame in (("cnn", r.cnn), ("colour", r.colour)):
                cells = " ".join(f"{spread(frame, 'f1_' + c):<13}" for c in classes)
                extra = (f" {spread(frame, 'restart_ari_mean'):<13} {sup.get('top_model', float('nan')):<9.3f} "
                         f"{sup.get('fine_tuned', float('nan')):<10.3f} {r.forward_per_s:.0f} "
                         f"({r.forward_per_s / base:.2f})") if what == "cnn" else ""
                print(f"{r.setting if what == 'cnn' else '':<12} {what:<8} {cells} {spread(frame, 'nmi'):<13} "
                      f"{spread(frame, 'ari'):<13}{extra}")
        shared = [f"{r.setting} = {r.fine_tuned_as}" for r in rows if r.fine_tuned_as]
        print(f"(restart ARI: mean agreement of the k-means restarts with the kept one; top model / fine-tuned: "
              f"blocked 5-fold cross-validated F1 of {classes[0]!r}"
              + (f", fine tuned once per CNN ({'; '.join(shared)})" if shared else "")
              + "; k-means labels on the same folds: "
              + ", ".join(f"{r.setting} {r.supervised.get('kmeans', float('nan')):.3f}" for r in rows) + ")")


def closing(results: list[Result]) -> dict[str, Any]:
    """The JSON line: the defaults on Mumbai (minimum over seeds), the colour baseline, models, cost, Olinda."""
    mumbai = {r.setting: r for r in results if r.scene == "mumbai"}
    olinda = {r.setting: r for r in results if r.scene == "olinda"}
    out: dict[str, Any] = {}
    if "defaults" in mumbai:
        d = mumbai["defaults"]
        out = {
            "informal_f1_min": round(float(d.cnn["f1_informal"].min()), 4),
            "formal_f1_min": round(float(d.cnn["f1_formal"].min()), 4),
            "nmi_min": round(float(d.cnn["nmi"].min()), 4),
            "colour_informal_f1": round(float(d.colour["f1_informal"].max()), 4),
            "colour_formal_f1": round(float(d.colour["f1_formal"].max()), 4),
            "colour_nmi": round(float(d.colour["nmi"].max()), 4),
            "top_model_informal_f1": round(d.supervised.get("top_model", float("nan")), 4),
            "fine_tuned_informal_f1": round(d.supervised.get("fine_tuned", float("nan")), 4),
            "tiles_per_s": round(d.tiles_per_s, 2),
            "cnn_tiles_per_s": round(d.forward_per_s, 1),
            "restart_ari_mean_min": round(float(d.cnn["restart_ari_mean"].min()), 4),
            "engine": d.engine, "engine_cosine_p01": round(d.engine_cosine_p01, 6),
        }
        if "before" in mumbai:
            b = mumbai["before"]
            out.update(before_informal_f1_min=round(float(b.cnn["f1_informal"].min()), 4),
                       before_formal_f1_min=round(float(b.cnn["f1_formal"].min()), 4),
                       before_nmi_min=round(float(b.cnn["nmi"].min()), 4),
                       before_top_model_informal_f1=round(b.supervised.get("top_model", float("nan")), 4),
                       before_tiles_per_s=round(b.tiles_per_s, 2),
                       cnn_tiles_per_s_ratio=round(d.forward_per_s / b.forward_per_s, 3))
        if "defaults" in olinda:
            o = olinda["defaults"]
            out.update(olinda_nmi_min=round(float(o.cnn["nmi"].min()), 4),
                       olinda_colour_nmi=round(float(o.colour["nmi"].max()), 4),
                       olinda_cnn_tiles_per_s_ratio=round(o.forward_per_s / olinda["before"].forward_per_s, 3)
                       if "before" in olinda else None)
            if "before" in olinda:
                out["olinda_before_nmi_min"] = round(float(olinda["before"].cnn["nmi"].min()), 4)
        out["targets_met"] = {
            "informal_f1_min >= 0.90": out["informal_f1_min"] >= 0.90,
            "formal_f1_min >= 0.80": out["formal_f1_min"] >= 0.80,
            "nmi_min >= 0.40": out["nmi_min"] >= 0.40,
            "above colour": (out["informal_f1_min"] > out["colour_informal_f1"]
                             and out["formal_f1_min"] > out["colour_formal_f1"] and out["nmi_min"] > out["colour_nmi"]),
            "top_model_informal_f1 >= 0.95": out["top_model_informal_f1"] >= 0.95,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only the settings 'before' and 'defaults', no fine tuning")
    ap.add_argument("--workdir", type=Path, default=None, help="keep work and outputs here (default: a temporary "
                    "folder; an existing one reuses its embedding cache, so tiles/s are then not measured)")
    ap.add_argument("--setting", action="append", default=[], metavar="NAME:section.key=value,...",
                    help="add a setting, e.g. 'l13:embedding.layer=features.13,clustering.nredo=10'")
    ap.add_argument("--only", nargs="*", default=None, help="run only these settings")
    ap.add_argument("--scenes", nargs="*", default=["mumbai", "olinda"])
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--finetune-max-tiles", type=int, default=400, help="training tiles per fold")
    ap.add_argument("--finetune-scenes", nargs="*", default=["mumbai"],
                    help="scenes to fine tune on (Olinda's reference is a spectral rule; its top model suffices)")
    ap.add_argument("--no-finetune", action="store_true")
    ap.add_argument("--engine", default=None, metavar="ENGINE[:PRECISION]",
                    help="embed every setting with this engine (auto, torch, onnxruntime, openvino) and precision")
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings = dict(SETTINGS)
    settings.update(parse_setting(s) for s in args.setting)
    if args.quick:
        settings = {k: v for k, v in settings.items() if k in ("before", "defaults")}
    if args.only:
        settings = {k: v for k, v in settings.items() if k in args.only or k == "before"}
    if args.engine:
        engine, _, precision = args.engine.partition(":")
        chosen_engine = {"engine": engine, "precision": precision or "auto", "engine_min_tiles": 0}
        settings = {k: {**v, "embedding": {**v.get("embedding", {}), **chosen_engine}} for k, v in settings.items()}
    chosen = [s for s in scenes() if s.name in args.scenes]
    for s in chosen:
        probe = Path(s.base["rasters"][0]["path"]).parent
        if not probe.exists():
            raise SystemExit(f"{probe}: missing; run `make data`")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="settlements-quality-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"quality benchmark in {workdir}: settings {', '.join(settings)}; scenes {', '.join(s.name for s in chosen)}",
          flush=True)
    from settlements.config import load_config

    results: list[Result] = []
    colour_cache: dict[str, np.ndarray] = {}
    for scene in chosen:
        embeddings: dict[str, Any] = {}  # each setting's embedding settings, for the CNN's tiles/s
        tuned: dict[tuple[str, str, int], Result] = {}  # per CNN (backbone, layer, input size): its fine tuning
        for name, overrides in settings.items():
            cnn = cnn_key(scene, overrides)
            # fine tuning (the slow part on a CPU) once per CNN: settings that only cluster otherwise share it
            tune = cnn not in tuned and scene.name in args.finetune_scenes and not (args.quick or args.no_finetune)
            # one pipeline per scene: its work folder (and embedding cache) is shared by the settings, each
            # setting has an output folder of its own
            config = pipeline_yaml(workdir / f"{scene.name}.yaml", scene, overrides,
                                   {"enabled": tune, "epochs": args.finetune_epochs, "patience": 1,
                                    "max_tiles": args.finetune_max_tiles},
                                   folds=5, work_dir=workdir / "work" / scene.name,
                                   out_dir=workdir / "outputs" / name.replace(" ", "_").replace(",", "") / scene.name)
            embeddings[name] = load_config(config).embedding
            t = time.perf_counter()
            res = evaluate_setting(config, scene, colour_cache)
            res.setting = name
            if tune:
                tuned[cnn] = res
            elif cnn in tuned and "fine_tuned" in tuned[cnn].supervised:
                res.supervised["fine_tuned"] = tuned[cnn].supervised["fine_tuned"]
                res.fine_tuned_as = tuned[cnn].setting
            results.append(res)
            head = f"f1_{scene.classes[0]}"
            gated = f" (gate: cosine 1st percentile {res.engine_cosine_p01:.5f})" \
                if res.engine_cosine_p01 == res.engine_cosine_p01 else ""
            print(f"{scene.name} / {name}: {time.perf_counter() - t:.0f} s; F1 {scene.classes[0]} "
                  f"{spread(res.cnn, head)}, NMI {spread(res.cnn, 'nmi')}, "
                  f"top model {res.supervised.get('top_model')}; embedded with {res.engine}{gated}", flush=True)
        tile_px = int(pd.read_parquet(workdir / "work" / scene.name / "tiles.parquet")["tile_w"].median())
        for name, rate in forward_rates(embeddings, tile_px).items():
            next(r for r in results if r.scene == scene.name and r.setting == name).forward_per_s = rate
    report(results)
    out = closing(results)
    if out:  # figures not measured (an embedding from the cache, no fine tuning) are null, not NaN
        print(json.dumps({k: None if isinstance(v, float) and v != v else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
