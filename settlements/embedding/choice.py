"""Which engine and precision embed a run: the setting, the fidelity gate, and ``auto``'s measurement.

* ``engine: torch`` at fp32 (its ``auto`` precision on a CPU without native fp16) is the reference: no gate.
* Any other engine or precision is gated first on a sample of the run's own tiles
  (:mod:`settlements.embedding.fidelity`); refused, the run says so in one warning line and embeds with
  torch fp32.
* ``engine: auto`` (or an engine at ``precision: auto``) times every installed candidate once per machine
  and model on the run's sample, remembers the tiles/s in this machine's cache
  (:func:`~settlements.config.user_cache_dir` ``/engines.json``, keyed by the machine: host name, CPU,
  cores, device, torch and engine versions; and the model: backbone, weights SHA-256, layer, input size,
  batch size), then takes the fastest candidate the gate passes (torch fp32 always passes). Speeds
  measured on a busy machine (load above :data:`BUSY_LOAD_PER_CORE` per core) are measured again once it is
  quieter than it was then. Runs of
  fewer than ``embedding.engine_min_tiles`` tiles keep torch: there exporting, calibrating and gating
  would cost more than they save.

A gate's verdict is kept in the work folder's ``engines/gate.json`` by what it compared (the network's
SHA-256, the sample's tiles and their preprocessing, the clustering settings), so a rerun that embeds
nothing new reads no pixels for it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import (
    CALIBRATION_TILES,
    GATE_ARI,
    GATE_COSINE,
    GATE_TILE_SHARE,
    GATE_TILES,
    REFERENCE_ENGINE,
    REFERENCE_PRECISION,
    SAMPLE_BYTES,
    Clustering,
    Embedding,
    user_cache_dir,
)
from ..rasters import RasterInfo
from ..store import read_json_if, settings_key, write_json
from . import engines
from .backbones import Backbone
from .fidelity import GateReport, allowed_misses, cosines, judge, refused_early
from .infer import TileStream, available_cores

log = logging.getLogger(__name__)

#: The machine's memory of measured tiles/s, under :func:`~settlements.config.user_cache_dir`.
MEMORY_FILE = "engines.json"
#: Timed passes per candidate (interleaved; the best counts: the machine may be shared), each over the first
#: MEASURE_TILES tiles of the sample (in the run's batches).
MEASURE_ROUNDS = 2
MEASURE_TILES = 128
#: A remembered measurement taken while the load average per core was above this is measured again once the
#: machine is quieter than it was then: tiles/s measured on a busy machine rank engines by how they share
#: the cores, not by how fast they are.
BUSY_LOAD_PER_CORE = 1.0
#: Gate verdicts kept in a work folder's ``engines/gate.json``.
GATE_VERDICTS_KEPT = 64


@dataclass
class EngineChoice:
    """The engine and precision that embed a run, the network they run, and why."""

    engine: str
    precision: str
    requested: str  # the setting, e.g. "auto auto", "onnxruntime int8"
    reason: str
    exported: engines.Exported | None = None
    gate: GateReport | None = None
    refused: list[GateReport] = field(default_factory=list)
    rates: dict[str, float] = field(default_factory=dict)
    warning: str | None = None
    seconds: float = 0.0  # spent choosing: exports, calibration, measurement, gates (once per work folder)

    @property
    def name(self) -> str:
        return f"{self.engine} {self.precision}"

    @property
    def model_sha256(self) -> str | None:
        return None if self.exported is None else self.exported.sha256

    def record(self) -> dict[str, Any]:
        """For ``embedding.json`` and the runs table."""
        return {"engine": self.engine, "precision": self.precision, "engine_requested": self.requested,
                "engine_reason": self.reason, "engine_model_sha256": self.model_sha256,
                "engine_gate": None if self.gate is None else self.gate.as_dict(),
                "engine_refused": [g.as_dict() for g in self.refused], "engine_rates": self.rates,
                "engine_warning": self.warning, "engine_choice_seconds": round(self.seconds, 2)}


class Sample:
    """The run's sample: evenly spread tiles, two in three compared by the gate (and timed), the others
    for int8's calibration; read only when first needed, with the run's preprocessing and batch size."""

    def __init__(self, infos: list[RasterInfo], raster: np.ndarray, windows: np.ndarray, keys: list[str],
                 e: Embedding, min_valid: float, device: torch.device) -> None:
        per_tile = 3 * e.input_size ** 2 * 4
        n_gate = int(np.clip(SAMPLE_BYTES // per_tile, 8, GATE_TILES))
        n_cal = int(np.clip(SAMPLE_BYTES // per_tile, 8, CALIBRATION_TILES))
        n = len(windows)
        pick = np.unique(np.linspace(0, n - 1, min(n, n_gate + n_cal)).round().astype(np.int64)) if n else \
            np.empty(0, np.int64)
        calibrate = np.zeros(len(pick), bool)
        calibrate[1::3] = True
        if len(pick) < 3 * 8:  # a small run: the gate sees every tile, the calibration too
            calibrate[:] = False
        self.gate_at, self.calibration_at = pick[~calibrate], pick[calibrate] if calibrate.any() else pick
        self.infos, self.raster, self.windows = infos, raster, windows
        self.e, self.min_valid, self.device = e, min_valid, device
        used = sorted(set(raster[pick].tolist()))
        self.fingerprint = settings_key({"keys": [keys[r] for r in used], "windows": windows[pick].tolist(),
                                         "calibration": self.calibration_at.tolist()})

    def _inputs(self, at: np.ndarray) -> Iterator[torch.Tensor]:
        """Model inputs of the tiles at ``at`` with enough valid pixels, in the run's batches."""
        ds = TileStream(self.infos, self.raster[at], self.windows[at, :4], self.windows[at, 4:], self.e.input_size,
                        self.e.batch_size)
        try:
            for i in range(len(ds)):
                b = ds[i]
                kept = np.asarray(b.valid_tile) >= self.min_valid - 1e-9
                if kept.any():
                    yield ds.inputs(b, self.device, None if kept.all() else kept)
        finally:
            ds.close()

    @functools.cached_property
    def gate_inputs(self) -> list[torch.Tensor]:
        return list(self._inputs(self.gate_at))

    def calibration_batches(self) -> Iterator[np.ndarray]:
        for x in self._inputs(self.calibration_at):
            yield np.ascontiguousarray(x.cpu().numpy(), dtype=np.float32)

    @property
    def n_calibration(self) -> int:
        return len(self.calibration_at)


class Chooser:
    """Chooses for one run (see the module's docstring); builds exports and runners as they are needed."""

    def __init__(self, e: Embedding, clustering: Clustering, backbone: Backbone, device: torch.device,
                 torch_precision: str, sample: Sample, root: Path) -> None:
        self.e, self.clustering, self.backbone, self.device = e, clustering, backbone, device
        self.torch_precision = torch_precision  # torch's own ``auto`` rule, resolved for the device
        self.sample, self.root = sample, root
        self._exports: dict[str, engines.Exported] = {}
        self._reference: list[np.ndarray] = []  # torch fp32 on the gate's batches, as far as compared
        self._reference_runner: engines.Runner | None = None

    # the networks
    def exported(self, precision: str) -> engines.Exported:
        """The ONNX network for ``precision`` (int8: quantised; others: the fp32 export)."""
        kind = "int8" if precision == "int8" else "fp32"
        if kind not in self._exports:
            self.root.mkdir(parents=True, exist_ok=True)
            fp32 = self._exports.get("fp32") or engines.export_onnx(self.backbone, self.e.input_size, self.root)
            self._exports["fp32"] = fp32
            if kind == "int8":
                self._exports["int8"] = engines.quantize_int8(fp32, self.sample.calibration_batches,
                                                              self.sample.n_calibration, self.sample.fingerprint)
        return self._exports[kind]

    def runner(self, engine: str, precision: str) -> engines.Runner:
        if engine == REFERENCE_ENGINE:
            return engines.make_runner(engine, precision, self.device, model=self.backbone.model)
        return engines.make_runner(engine, precision, self.device, path=self.exported(precision).path)

    def embed_sample(self, runner: engines.Runner) -> np.ndarray:
        out = [runner(x).float().cpu().numpy() for x in self.sample.gate_inputs]
        return np.concatenate(out) if out else np.empty((0, self.backbone.dim), np.float32)

    # the gate
    def _gate_key(self, engine: str, precision: str) -> str:
        network = (self.exported(precision).sha256 if engine != REFERENCE_ENGINE
                   else self.backbone.weights.sha256 + self.backbone.layer)
        c = self.clustering
        return settings_key({"engine": engine, "precision": precision, "network": network,
                             "sample": self.sample.fingerprint, "device": self.device.type,
                             "clustering": [c.k, c.seed, c.niter, c.nredo, c.l2_normalize]})

    def gate(self, engine: str, precision: str) -> GateReport:
        """The gate's verdict on ``engine`` at ``precision`` for this run's sample (kept in the work folder)."""
        path = self.root / "gate.json"
        key = self._gate_key(engine, precision)
        known = read_json_if(path) or {}
        if isinstance(known.get(key), dict):
            try:
                return GateReport.from_dict(known[key])
            except (KeyError, TypeError):
                pass
        report = self._compare(engine, precision)
        log.info("fidelity gate, %s %s: %s: %s", engine, precision, report.figures(),
                 "passed" if report.passed else "refused")
        self.root.mkdir(parents=True, exist_ok=True)
        kept = list(known.items())[-(GATE_VERDICTS_KEPT - 1):]  # the latest verdicts; older samples are gone
        write_json(path, {**dict(kept), key: report.as_dict()})
        return report

    def _reference_batch(self, i: int) -> np.ndarray:
        if self._reference_runner is None:
            self._reference_runner = self.runner(REFERENCE_ENGINE, REFERENCE_PRECISION)
        while len(self._reference) <= i:
            x = self.sample.gate_inputs[len(self._reference)]
            self._reference.append(self._reference_runner(x).float().cpu().numpy())
        return self._reference[i]

    def _compare(self, engine: str, precision: str) -> GateReport:
        """Both engines on the sample, batch by batch; refused as soon as more tiles miss the cosine than the
        whole sample may (a refused candidate then costs about one batch, not the sample)."""
        inputs = self.sample.gate_inputs
        allowed = allowed_misses(sum(len(x) for x in inputs))
        runner = self.runner(engine, precision)
        ref: list[np.ndarray] = []
        got: list[np.ndarray] = []
        misses = 0
        for i, x in enumerate(inputs):
            ref.append(self._reference_batch(i))
            got.append(runner(x).float().cpu().numpy())
            misses += int((cosines(ref[-1], got[-1]) < GATE_COSINE).sum())
            if misses > allowed and i + 1 < len(inputs):
                return refused_early(engine, precision, np.concatenate(ref), np.concatenate(got))
        empty = np.empty((0, self.backbone.dim), np.float32)
        return judge(engine, precision, np.concatenate(ref) if ref else empty, np.concatenate(got) if got else empty,
                     self.clustering)

    # auto's measurement
    def rates(self, pairs: list[tuple[str, str]]) -> dict[str, float]:
        """Tiles/s of each pair on this machine and model: remembered, else measured now and remembered."""
        memory_path = user_cache_dir() / MEMORY_FILE
        key, described = self._memory_key()
        from filelock import FileLock

        try:
            memory_path.parent.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(memory_path) + ".lock", timeout=600)
            lock.acquire()
        except OSError as exc:  # no writable cache here: measure for this run only
            log.warning("%s: cannot keep the engines' speeds (%s); measuring them for this run only", memory_path,
                        exc.strerror or exc)
            return self.measure(pairs)
        try:
            memory = read_json_if(memory_path)
            memory = memory if isinstance(memory, dict) else {}  # a damaged file is measured over
            found = memory.get(key)
            entry: dict[str, Any] = found if isinstance(found, dict) else {}
            rates_found = entry.get("rates")
            known: dict[str, Any] = rates_found if isinstance(rates_found, dict) else {}
            names = [f"{e} {p}" for e, p in pairs]
            load_now = load_per_core()
            then = entry.get("load_per_core")
            stale = not isinstance(then, int | float) or (then > BUSY_LOAD_PER_CORE and load_now < then)
            if all(isinstance(known.get(n), int | float) and known[n] >= 0 for n in names) and not stale:
                log.info("engine speeds of this machine and model from %s (measured %s)", memory_path,
                         entry.get("measured_utc"))
                return {n: float(known[n]) for n in names}
            if known and stale:
                log.info("engine speeds of this machine and model measured again: the remembered ones were taken "
                         "at a load of %s per core, now %.2f", "unknown" if then is None else f"{then:.2f}", load_now)
                known = {}
            rates = self.measure(pairs)
            memory[key] = {**described, "rates": {**known, **rates}, "load_per_core": round(load_now, 3),
                           "measured_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            write_json(memory_path, memory)
        finally:
            lock.release()
        return rates

    def measure(self, pairs: list[tuple[str, str]]) -> dict[str, float]:
        """Backbone-only tiles/s of each pair on the sample's inputs, in the run's batches: one warm-up
        batch, then :data:`MEASURE_ROUNDS` interleaved passes, the best kept."""
        runners = {}
        for e, p in pairs:
            try:
                runners[f"{e} {p}"] = self.runner(e, p)
            except Exception as exc:  # an engine that cannot run this network here is no candidate
                log.info("engine %s %s left out: %s", e, p, str(exc).splitlines()[0] if str(exc) else exc)
        inputs, n = [], 0
        for x in self.sample.gate_inputs:
            if n >= MEASURE_TILES:
                break
            inputs.append(x)
            n += len(x)
        best = {name: 0.0 for name in runners}
        if not inputs:
            return best
        for run in runners.values():
            run(inputs[0])
        for _ in range(MEASURE_ROUNDS):
            for name, run in runners.items():
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                t = time.perf_counter()
                for x in inputs:
                    run(x)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                best[name] = max(best[name], n / (time.perf_counter() - t))
        log.info("engine speeds measured on %d tiles (tiles/s): %s", n,
                 ", ".join(f"{k} {v:.0f}" for k, v in sorted(best.items(), key=lambda kv: -kv[1])))
        return best

    def _memory_key(self) -> tuple[str, dict[str, Any]]:
        """The key of this machine and model in the memory, and what it is made of."""
        machine = {"host": platform.node(), "cpu": _cpu_name(), "cores": available_cores(),
                   "threads": torch.get_num_threads(), "device": self.device.type,
                   "gpu": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
                   "torch": torch.__version__, **engines.versions()}
        b = self.backbone
        model = {"backbone": b.name, "weights_sha256": b.weights.sha256, "layer": b.layer,
                 "input_size": self.e.input_size, "batch_size": self.e.batch_size}
        return settings_key({"machine": machine, "model": model}), {"machine": machine, "model": model}

    # the choice
    def choose(self, n_tiles: int) -> EngineChoice:
        e = self.e
        requested = f"{e.engine} {e.precision}"
        if e.engine == "auto" and n_tiles < e.engine_min_tiles:
            return self._settle([(REFERENCE_ENGINE, self.torch_precision)], requested,
                                f"{n_tiles} tiles, fewer than embedding.engine_min_tiles ({e.engine_min_tiles})")
        if e.engine == REFERENCE_ENGINE:
            precision = self.torch_precision if e.precision == "auto" else e.precision
            return self._settle([(REFERENCE_ENGINE, precision)], requested, "the setting")
        if e.precision != "auto" and e.engine != "auto":
            engines.require(e.engine, e.precision)
            return self._settle([(e.engine, e.precision)], requested, "the setting")
        if e.engine != "auto":
            engines.require(e.engine)
        pairs = engines.candidates(self.device, e.engine, e.precision)
        if not pairs:
            return self._settle([], requested, "no candidate")
        rates = self.rates(pairs)
        ordered = sorted(pairs, key=lambda p: -rates.get(f"{p[0]} {p[1]}", 0.0))
        choice = self._settle(ordered, requested, "the fastest that passed the gate")
        choice.rates = {f"{p[0]} {p[1]}": round(rates.get(f"{p[0]} {p[1]}", 0.0), 1) for p in ordered}
        return choice

    def _settle(self, ordered: list[tuple[str, str]], requested: str, reason: str) -> EngineChoice:
        """The first of ``ordered`` the gate passes (the reference needs none), else torch fp32 with a warning."""
        refused: list[GateReport] = []
        for engine, precision in ordered:
            if (engine, precision) == (REFERENCE_ENGINE, REFERENCE_PRECISION):
                return EngineChoice(engine, precision, requested, reason, refused=refused)
            report = self.gate(engine, precision)
            if report.passed:
                exported = None if engine == REFERENCE_ENGINE else self.exported(precision)
                return EngineChoice(engine, precision, requested, reason, exported, report, refused)
            refused.append(report)
        warning = None
        if refused:
            first = refused[0]
            more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
            warning = (f"embedding: the fidelity gate refused {first.engine} {first.precision}{more} on this run's "
                       f"tiles ({first.figures()}; needs {GATE_TILE_SHARE:.0%} and ARI {GATE_ARI}): "
                       "embedding with torch fp32")
            log.warning("%s", warning)
        return EngineChoice(REFERENCE_ENGINE, REFERENCE_PRECISION, requested, "fallback: the gate refused",
                            refused=refused, warning=warning)


def load_per_core() -> float:
    """The 1-minute load average per core (0 where the system does not say)."""
    try:
        return os.getloadavg()[0] / max(available_cores(), 1)
    except OSError:
        return 0.0


@functools.lru_cache(maxsize=1)
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(choice: EngineChoice) -> str:
    """One line for the log: what embeds the run and why."""
    extra = f"; gate: {choice.gate.figures()}" if choice.gate is not None else ""
    rates = f"; measured tiles/s {json.dumps(choice.rates)}" if choice.rates else ""
    return f"embedding with {choice.name} ({choice.reason}){extra}{rates}"
